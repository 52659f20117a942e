"""One transformer block: norms, attention and MLP around the residual stream, sequential or parallel."""

from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.components.attention import Attention, AttendMask
from hooked_attn.components.mlp import MLP
from hooked_attn.components.norms import Norm
from hooked_attn.components.rotary import RopeTables
from hooked_attn.config import ModelConfig
from hooked_attn.hook_points import HookPoint


class TransformerBlock(nn.Module):
    """``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``.

    With ``parallel_attn_mlp`` both sublayers read ``resid_pre`` and ``hook_resid_mid`` does not exist.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.parallel = cfg.parallel_attn_mlp
        self.ln1 = Norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.ln2 = Norm(cfg.norm, cfg.d_model)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if not self.parallel:
            self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], attend: AttendMask | None, positions: Tensor,
        rope_cache: RopeTables,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), attend, positions, rope_cache))
        if self.parallel:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)
