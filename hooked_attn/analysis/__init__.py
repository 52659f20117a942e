"""Attention analysis: pure functions over pattern tensors, head scores over a model, and views of them.

``patterns`` (rows, top-k, averages, entropy, the row-sum check) and ``heads`` (previous-token,
first-token, duplicate-token and induction scores, and a detector for any target pattern) need only
torch; ``text`` draws a pattern for a terminal; ``plot_attention`` (matplotlib, the ``plots`` extra,
imported when called) draws a picture; ``attention_viewer`` writes a self-contained HTML page.
See docs/attention.md.
"""

from hooked_attn.analysis.heads import (
    attention_patterns, detect_heads, duplicate_token_scores, duplicate_token_target, first_token_scores,
    first_token_target, induction_scores, induction_target, pattern_scores, previous_token_scores,
    previous_token_target, repeated_random_tokens,
)
from hooked_attn.analysis.patterns import (
    AttendedKey, RowSumCheck, attendable, check_row_sums, entropy, head_mean, layer_mean, query_all_heads,
    pattern_names, query_distribution, stack_patterns, top_k_keys, top_k_per_head,
)
from hooked_attn.analysis.plots import plot_attention  # imports matplotlib only when called
from hooked_attn.analysis.text import text_heatmap, top_k_table, visible_token
from hooked_attn.analysis.viewer import AttentionViewer, attention_viewer


__all__ = [
    "AttendedKey", "AttentionViewer", "RowSumCheck", "attendable", "attention_patterns", "attention_viewer",
    "check_row_sums", "detect_heads", "duplicate_token_scores", "duplicate_token_target", "entropy",
    "first_token_scores", "first_token_target", "head_mean", "induction_scores", "induction_target", "layer_mean",
    "pattern_names", "pattern_scores", "plot_attention", "previous_token_scores", "previous_token_target", "query_all_heads",
    "query_distribution", "repeated_random_tokens", "stack_patterns", "text_heatmap", "top_k_keys",
    "top_k_per_head", "top_k_table", "visible_token",
]
