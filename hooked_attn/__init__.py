"""hooked_attn: HuggingFace transformers rebuilt in plain PyTorch, every activation a named hook point."""

from hooked_attn import analysis, utils
from hooked_attn.architectures.base import StateDictError, UnknownArchitectureError, UnsupportedConfigError
from hooked_attn.cache import ActivationCache
from hooked_attn.compat import install_as_transformer_lens
from hooked_attn.components.masked_softmax import masked_softmax
from hooked_attn.components.scoring import AdditiveAttention, DotProductAttention
from hooked_attn.config import ModelConfig
from hooked_attn.encoder import HookedEncoder
from hooked_attn.hook_points import HookedRootModule, HookPoint, NonFiniteActivationError
from hooked_attn.memory import keep_freed_memory
from hooked_attn.model import HookedTransformer
from hooked_attn.processing import ProcessingError
from hooked_attn.saes import SAE, SAEConfig
from hooked_attn.wrap import unwrap, wrap

__all__ = [
    "ActivationCache", "HookPoint", "HookedEncoder", "HookedRootModule", "HookedTransformer", "ModelConfig", "ProcessingError",
    "StateDictError", "UnknownArchitectureError", "UnsupportedConfigError", "analysis", "utils",
    "AdditiveAttention", "DotProductAttention", "masked_softmax", "unwrap", "wrap", "NonFiniteActivationError",
    "keep_freed_memory", "SAE", "SAEConfig", "install_as_transformer_lens",
]
__version__ = "0.1.0"
