"""An activation store: stream chosen hooks' activations over a token corpus to sharded safetensors,
resumably, and read them back as shuffled batches for training.

Shard ``i`` holds the activations of sequences ``[i * sequences_per_shard, (i + 1) * sequences_per_shard)``
(flattened to ``[row d]`` rows, one tensor per hook). A shard is written to a temporary name and
renamed when complete, so after a kill every shard on disk is whole; a resumed run starts at the
first shard that is missing. Only one shard's activations are held in memory.
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def stop_layer_for(hooks: Sequence[str], n_layers: int) -> int | None:
    """The block to stop before so that every hook still runs (None: the whole model is needed)."""
    layers = [_LAYER.match(h) for h in hooks]
    if not all(layers):
        return None
    last = max(int(m.group(1)) for m in layers if m)
    return last + 1 if last + 1 < n_layers else None


def harvest_activations(
    model: Any, tokens: Tensor, hooks: Sequence[str], out_dir: str | Path, *, batch_size: int = 8,
    sequences_per_shard: int = 64, dtype: torch.dtype = torch.float32, progress: bool = True,
    drop_first_position: bool = False, shards: Sequence[int] | None = None,
) -> Path:
    """Write the activations of ``hooks`` over ``tokens [sequence pos]`` to ``out_dir``; resumes a
    partial run there (same tokens, hooks and shard size, else a ValueError says what differs).

    The model runs only up to the last block the hooks need (``stop_at_layer``).
    ``drop_first_position`` leaves out position 0 (the BOS token's outlier activations).
    ``shards`` writes only those shard indices, leaving the rest to other processes
    (``hooked_attn.scale.harvest_to_store`` deals them out to torchrun ranks).
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    model.resolve_hook_names(list(hooks))  # unknown names fail here, naming the closest ones
    n_seq = tokens.shape[0]
    n_shards = -(-n_seq // sequences_per_shard)
    manifest = {"hooks": list(hooks), "n_sequences": n_seq, "n_pos": tokens.shape[1],
                "sequences_per_shard": sequences_per_shard, "n_shards": n_shards, "dtype": str(dtype),
                "drop_first_position": drop_first_position,
                "tokens_sha256": hashlib.sha256(tokens.long().cpu().numpy().tobytes()).hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds a different harvest; differing (on disk, now): {diff}")
    else:
        _atomic_write_text(path, json.dumps(manifest, indent=2))
    todo = [i for i in (range(n_shards) if shards is None else shards) if not (out / shard_name(i)).exists()]
    # Another process may be writing the shards not ours: remove only our own leftovers.
    stale = out.glob("*.tmp") if shards is None else [out / (shard_name(i) + ".tmp") for i in todo]
    for path in stale:
        path.unlink(missing_ok=True)
    stop = stop_layer_for(hooks, model.cfg.n_layers)
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), disable=not progress, desc="harvest", unit="shard")
    with torch.no_grad():
        for index in todo:
            parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
            start, end = index * sequences_per_shard, min((index + 1) * sequences_per_shard, n_seq)
            for lo in range(start, end, batch_size):
                # Stored on the CPU as made: a model on GPUs never holds a shard's activations.
                _, cache = model.run_with_cache(tokens[lo:min(lo + batch_size, end)], names_filter=list(hooks),
                                                stop_at_layer=stop, return_type=None, device="cpu")
                for h in hooks:
                    act = cache[h][:, 1:] if drop_first_position else cache[h]
                    parts[h].append(act.reshape(-1, act.shape[-1]).to(dtype))
            tmp = out / (shard_name(index) + ".tmp")
            save_file({h: torch.cat(v).contiguous() for h, v in parts.items()}, tmp)
            os.replace(tmp, out / shard_name(index))
            bar.update(1)
    bar.close()
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ActivationReader:
    """Shuffled batches ``[batch_size d]`` of one hook's stored activations.

    Each pass visits the shards in a random order, ``shards_in_memory`` at a time, and serves the
    rows of those shards in a random order: every row once per pass, memory bounded by that many
    shards.
    """

    def __init__(self, out_dir: str | Path, hook: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 shards_in_memory: int = 2, device: str = "cpu") -> None:
        self.dir = Path(out_dir)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        if hook not in self.manifest["hooks"]:
            raise KeyError(f"{hook!r} was not harvested in {self.dir}; hooks there: {self.manifest['hooks']}")
        missing = [i for i in range(self.manifest["n_shards"]) if not (self.dir / shard_name(i)).exists()]
        if missing:
            raise ValueError(f"{self.dir} is incomplete: shards {missing} are missing (resume the harvest)")
        self.hook, self.batch_size, self.shuffle = hook, batch_size, shuffle
        self.shards_in_memory, self.device = shards_in_memory, device
        self.gen = torch.Generator().manual_seed(seed)

    def _load(self, index: int) -> Tensor:
        with safe_open(self.dir / shard_name(index), framework="pt") as f:
            return f.get_tensor(self.hook)

    @property
    def n_rows(self) -> int:
        total = 0
        for i in range(self.manifest["n_shards"]):
            with safe_open(self.dir / shard_name(i), framework="pt") as f:
                total += f.get_slice(self.hook).get_shape()[0]
        return total

    def __iter__(self) -> Iterator[Tensor]:
        n = self.manifest["n_shards"]
        order = torch.randperm(n, generator=self.gen).tolist() if self.shuffle else list(range(n))
        leftover: Tensor | None = None
        for lo in range(0, n, self.shards_in_memory):
            rows = torch.cat([self._load(i) for i in order[lo:lo + self.shards_in_memory]])
            if self.shuffle:
                rows = rows[torch.randperm(rows.shape[0], generator=self.gen)]
            if leftover is not None:
                rows = torch.cat([leftover, rows])
            n_full = rows.shape[0] // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                yield rows[start:start + self.batch_size].to(self.device)
            leftover = rows[n_full:]
        if leftover is not None and leftover.shape[0]:
            yield leftover.to(self.device)
