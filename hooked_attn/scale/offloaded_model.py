"""Running a model saved by ``save_offloaded``: built on meta, every unit left on disk and read by
accelerate's offload hooks while the forward reaches it. Apart from ``offload.py`` because it builds a
``HookedTransformer``, which ``model.py`` (through ``dispatch``) must be able to import without it.
"""

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from hooked_attn.model import HookedTransformer
from hooked_attn.scale.dispatch import dispatch
from hooked_attn.scale.offload import MANIFEST, TOKENIZER, _decode
from hooked_attn.scale.placement import Device, placement_units


def load_offloaded(folder: str | Path, execution_device: Device | torch.device = "cpu") -> nn.Module:
    """The model saved in ``folder``, built without reading any weight: every unit stays on disk and is
    read, one unit at a time, while the forward reaches it. Computation runs on ``execution_device``.

    Peak memory is about the largest unit (a block, or the embedding) twice over, plus activations.
    Weight properties (``model.W_Q``...) read from outside a forward are on the ``meta`` device.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{str(folder)!r} holds no offloaded model ({MANIFEST} is missing)")
    manifest = json.loads(manifest_path.read_text())
    cfg = _decode(manifest["config"])
    dtypes = {info["dtype"] for info in manifest["weights"].values()}
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER) if (folder / TOKENIZER).is_dir() else None
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    if len(dtypes) == 1:  # accelerate casts what it reads to the parameter's dtype: build in the saved one
        model.to(getattr(torch, dtypes.pop()))
    return dispatch(model, {unit: "disk" for unit in placement_units(model)}, offload_folder=folder,
                    execution_device=execution_device)
