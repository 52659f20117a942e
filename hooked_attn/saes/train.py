"""Training a small SAE (TopK, or ReLU with an L1 penalty) on batches of activations, with metrics per step."""

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attn.saes.config import SAEConfig
from hooked_attn.saes.sae import SAE

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to train: ``topk`` (k features per row) or ``standard`` (ReLU, L1 penalty on
    ``acts * ||W_dec row||``)."""

    architecture: Literal["topk", "standard"]
    d_in: int
    d_sae: int
    n_steps: int
    k: int | None = None                  # topk only
    l1_coefficient: float | None = None   # standard only
    lr: float = 1e-3
    hook_name: str | None = None
    dead_window: int = 100                # a feature that has not fired for this many steps counts as dead
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.architecture == "topk") != (self.k is not None):
            raise ValueError(f"k is required for topk and only for topk (architecture={self.architecture!r}, k={self.k})")
        if (self.architecture == "standard") != (self.l1_coefficient is not None):
            raise ValueError("l1_coefficient is required for standard (ReLU+L1) SAEs and only for them")
        if self.n_steps <= 0:
            raise ValueError(f"n_steps={self.n_steps} must be positive")


def explained_variance(x: Float[Tensor, "row d"], recons: Float[Tensor, "row d"]) -> Tensor:
    """1 - residual variance / total variance (about the batch mean), pooled over all dimensions."""
    return 1 - (x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _init(sae: SAE, first: Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        w_dec = torch.randn(sae.W_dec.shape, generator=gen)
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(first.mean(0))


def train_sae(batches: Iterable[Tensor], cfg: TrainConfig) -> tuple[SAE, list[dict[str, float | int]]]:
    """Train for ``cfg.n_steps`` steps, cycling through ``batches`` (``[row d_in]`` tensors) as needed.

    Returns the SAE (eval mode, ``log_feature_sparsity`` from the last ``dead_window`` steps) and one
    record per step: loss, mse (summed over d_in, mean over rows), l0 (features firing per row),
    explained_variance and dead_features.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(SAEConfig(architecture=cfg.architecture, d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k,
                        hook_name=cfg.hook_name, device=cfg.device))
    stream = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
    first = next(stream).to(cfg.device, torch.float32)
    _init(sae, first, gen)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    fire_counts: list[Tensor] = []
    n_rows: list[int] = []
    history: list[dict[str, float | int]] = []
    batch: Tensor | None = first
    sae.train()
    for step in range(cfg.n_steps):
        x = batch if batch is not None else next(stream).to(cfg.device, torch.float32)
        batch = None
        acts = sae.encode(x)
        recons = sae.decode(acts)
        mse = (recons - x).pow(2).sum(-1).mean()
        loss = mse
        if cfg.architecture == "standard":
            loss = mse + cfg.l1_coefficient * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()  # type: ignore[operator]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.architecture == "topk":
            with torch.no_grad():  # TopK decoders are kept at unit norm (the scale lives in the activations)
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))
        with torch.no_grad():
            fired = (acts > 0).sum(0).cpu()
            last_fired[fired > 0] = step
            fire_counts = (fire_counts + [fired])[-cfg.dead_window:]
            n_rows = (n_rows + [x.shape[0]])[-cfg.dead_window:]
            record = {"step": step, "loss": float(loss), "mse": float(mse), "l0": float((acts > 0).sum(-1).float().mean()),
                      "explained_variance": float(explained_variance(x, recons)),
                      "dead_features": int(((step - last_fired) >= cfg.dead_window).sum()) if step >= cfg.dead_window else 0}
        history.append(record)
        if step % 50 == 0 or step == cfg.n_steps - 1:
            logger.info("step %d: %s", step, record)
    frequency = torch.stack(fire_counts).sum(0).float() / sum(n_rows)
    sae.log_feature_sparsity = torch.log10(frequency + 1e-10)
    return sae.eval(), history
