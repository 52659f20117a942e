"""The error the TransformerLens compatibility layer raises (kept outside ``compat.transformer_lens`` so that
every module of that tree can import it without importing the model class)."""


class CompatError(ValueError, AssertionError):
    """A TransformerLens call hooked_attn refuses; an AssertionError too, which is what TransformerLens raises."""
