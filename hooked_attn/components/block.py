"""One transformer block: norms, attention and MLP around the residual stream, sequential or parallel."""

import einops
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.components.attention import Attention, AttentionContext
from hooked_attn.components.mlp import MLP
from hooked_attn.components.norms import Norm
from hooked_attn.config import ModelConfig
from hooked_attn.hook_points import HookPoint


class TransformerBlock(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``.

    ``cfg.block_norms`` moves the norms: "sandwich" adds ``ln1_post``/``ln2_post`` on the sublayer
    outputs; "output" has only those; "post_residual" normalises after each residual sum;
    "normed_residual" adds each sublayer to its normed input (``resid_mid = ln1(resid_pre) +
    attn_out``). With ``parallel_attn_mlp`` both sublayers read ``resid_pre`` and ``hook_resid_mid``
    does not exist.
    ``hook_attn_out``/``hook_mlp_out`` always hold exactly what is added to the residual stream.

    With ``use_split_qkv_input`` (set by the model, which then adds ``hook_q_input [batch pos head
    d_model]`` and ``hook_k_input``/``hook_v_input [batch pos kv_head d_model]``, ``head`` when the
    attention is ungrouped) each head reads its own copy of the block's attention input, taken before
    ``ln1``, which then normalises each copy (its hooks fire once per input: q, k, v in that order).
    Not with ``block_norms="normed_residual"``, whose residual is ln1's output. Likewise
    ``use_hook_mlp_in`` adds ``hook_mlp_in [batch pos d_model]``, a copy of what the MLP reads.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.parallel = cfg.parallel_attn_mlp
        self.placement = cfg.block_norms
        self.attn_only = cfg.attn_only
        if cfg.block_norms != "output":
            self.ln1 = Norm(cfg.norm, cfg.d_model)
            if not cfg.attn_only:
                self.ln2 = Norm(cfg.norm, cfg.d_model)
        if cfg.post_norm is not None:
            self.ln1_post = Norm(cfg.post_norm, cfg.d_model)
            self.ln2_post = Norm(cfg.post_norm, cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.can_split_qkv_input = cfg.block_norms != "normed_residual"
        self.use_split_qkv_input = False  # the hook points are added by HookedTransformer.set_use_split_qkv_input
        self.can_hook_mlp_in = not cfg.attn_only and cfg.block_norms != "normed_residual"
        self.use_hook_mlp_in = False  # likewise, by set_use_hook_mlp_in
        if cfg.moe is not None:
            from hooked_attn.components.moe import MoEMLP

            self.mlp: nn.Module = MoEMLP(cfg)
        elif not cfg.attn_only:
            self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if not self.parallel and not cfg.attn_only:
            self.hook_resid_mid = HookPoint()
        if not cfg.attn_only:
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def _sublayer(self, x: Tensor, which: int, ctx: AttentionContext | None = None) -> Tensor:
        """A sublayer's contribution to the residual stream, with the norms its placement puts around it."""
        pre = getattr(self, f"ln{which}", None) if self.placement in ("pre", "sandwich") else None
        post = getattr(self, f"ln{which}_post", None)
        if which == 1:
            h = self._attend(x, pre, ctx)
        else:
            if self.use_hook_mlp_in:
                x = self.hook_mlp_in(x.clone())  # a copy: an in-place edit must not reach the residual stream
            h = self.mlp(pre(x) if pre is not None else x)
        return post(h) if post is not None else h

    def _attend(self, x: Float[Tensor, "batch pos d_model"], pre: nn.Module | None, ctx: AttentionContext | None,
                ) -> Float[Tensor, "batch pos d_model"]:
        """Attention on ``pre(x)``, or on one copy of ``x`` per head and input when the inputs are split."""
        norm = pre if pre is not None else (lambda t: t)
        if not self.use_split_qkv_input:
            return self.attn(norm(x), ctx)
        n_kv = self.n_heads if self.attn.ungroup_grouped_query_attention else self.n_kv_heads
        per_head = "batch pos d_model -> batch pos head d_model"
        q_in = self.hook_q_input(einops.repeat(x, per_head, head=self.n_heads))
        k_in = self.hook_k_input(einops.repeat(x, per_head, head=n_kv))
        v_in = self.hook_v_input(einops.repeat(x, per_head, head=n_kv))
        return self.attn(norm(q_in), ctx, norm(k_in), norm(v_in))

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], ctx: AttentionContext
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.placement == "normed_residual":
            return self._normed_residual_forward(resid_pre, ctx)
        attn_out = self.hook_attn_out(self._sublayer(resid_pre, 1, ctx))
        if self.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        if self.parallel:
            mlp_out = self.hook_mlp_out(self._sublayer(resid_pre, 2))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = resid_pre + attn_out
        if self.placement == "post_residual":
            resid_mid = self.ln1(resid_mid)
        resid_mid = self.hook_resid_mid(resid_mid)
        mlp_out = self.hook_mlp_out(self._sublayer(resid_mid, 2))
        resid_post = resid_mid + mlp_out
        if self.placement == "post_residual":
            resid_post = self.ln2(resid_post)
        return self.hook_resid_post(resid_post)

    def _normed_residual_forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], ctx: AttentionContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Each sublayer reads ``ln(x)`` and is added to ``ln(x)``, not to ``x``."""
        normed = self.ln1(resid_pre)
        resid_mid = self.hook_resid_mid(normed + self.hook_attn_out(self.attn(normed, ctx)))
        normed = self.ln2(resid_mid)
        return self.hook_resid_post(normed + self.hook_mlp_out(self.mlp(normed)))
