"""``transformer_lens.train``: a small next-token training loop for toy models, under TransformerLens' names."""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)


@dataclass
class HookedTransformerTrainConfig:
    """Training options. ``device=None`` trains where the model is; ``max_steps`` stops early."""

    num_epochs: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    momentum: float = 0.0
    max_grad_norm: float | None = None
    weight_decay: float | None = None
    optimizer_name: str = "Adam"
    device: str | None = None
    warmup_steps: int = 0
    save_every: int | None = None
    save_dir: str | None = None
    wandb: bool = False
    wandb_project_name: str | None = None
    print_every: int | None = 50
    max_steps: int | None = None


def _optimizer(params: Any, config: HookedTransformerTrainConfig) -> torch.optim.Optimizer:
    decay = config.weight_decay or 0.0
    match config.optimizer_name:
        case "Adam":
            return torch.optim.Adam(params, lr=config.lr, weight_decay=decay)
        case "AdamW":
            return torch.optim.AdamW(params, lr=config.lr, weight_decay=decay)
        case "SGD":
            return torch.optim.SGD(params, lr=config.lr, weight_decay=decay, momentum=config.momentum)
        case other:
            raise ValueError(f"optimizer_name={other!r} is not one of Adam, AdamW, SGD")


def train(model: Any, config: HookedTransformerTrainConfig, dataset: Any) -> Any:
    """Train ``model`` on the ``"tokens"`` of each item of ``dataset`` by next-token loss; returns the model.

    The caller's config is left as it was (the resolved device lives in a copy).
    """
    if config.wandb:
        raise ValueError("wandb logging is not supported by hooked_attn's train(); set wandb=False")
    config = dataclasses.replace(config)
    torch.manual_seed(config.seed)
    device = torch.device(config.device) if config.device is not None else model.device
    model.to(device).train()
    optimizer = _optimizer(model.parameters(), config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    step = 0
    for epoch in range(1, config.num_epochs + 1):
        for batch in loader:
            tokens = (batch["tokens"] if isinstance(batch, dict) else batch).to(device)
            loss = model(tokens, return_type="loss")
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if config.print_every and step % config.print_every == 0:
                logger.info("epoch %d step %d loss %.4f", epoch, step, float(loss))
            if config.save_every and config.save_dir and step % config.save_every == 0:
                torch.save(model.state_dict(), f"{config.save_dir}/model_{step}.pt")
            if config.max_steps is not None and step >= config.max_steps:
                model.eval()
                return model
    model.eval()
    return model


__all__ = ["HookedTransformerTrainConfig", "train"]
