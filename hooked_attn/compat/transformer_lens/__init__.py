"""TransformerLens 3.x's public module tree, backed by hooked_attn (see ``hooked_attn.install_as_transformer_lens``)."""

from hooked_attn.compat.transformer_lens import (  # noqa: F401  (submodules TransformerLens users import)
    components, evals, head_detector, hook_points, loading_from_pretrained, patching, train, utils,
)
from hooked_attn.compat.transformer_lens.ActivationCache import ActivationCache
from hooked_attn.compat.transformer_lens.BertNextSentencePrediction import BertNextSentencePrediction
from hooked_attn.compat.transformer_lens.FactoredMatrix import FactoredMatrix
from hooked_attn.compat.transformer_lens.HookedEncoder import HookedEncoder
from hooked_attn.compat.transformer_lens.HookedTransformer import HookedTransformer
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.compat.transformer_lens.hook_points import HookPoint
from hooked_attn.compat.transformer_lens.SVDInterpreter import SVDInterpreter

__all__ = ["ActivationCache", "BertNextSentencePrediction", "FactoredMatrix", "HookPoint", "HookedEncoder", "HookedTransformer",
           "HookedTransformerConfig", "SVDInterpreter", "components", "evals", "head_detector", "hook_points",
           "loading_from_pretrained", "patching", "train", "utils"]
__version__ = "3.9.0+hooked_attn"
