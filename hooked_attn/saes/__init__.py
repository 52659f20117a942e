"""Sparse autoencoders and transcoders: SAELens-format loading and saving, splicing into a model,
feature analysis, an activation store and a trainer."""

from hooked_attn.saes.config import SAEConfig, SAEConfigError
from hooked_attn.saes.sae import SAE
from hooked_attn.saes.splice import SAESplicingMixin

__all__ = ["SAE", "SAEConfig", "SAEConfigError", "SAESplicingMixin"]
