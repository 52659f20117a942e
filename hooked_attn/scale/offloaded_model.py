"""Running a model saved by ``save_offloaded``: built on meta, every unit left on disk and read by
accelerate's offload hooks while the forward reaches it. Apart from ``offload.py`` because it builds a
``HookedTransformer``, which ``model.py`` (through ``dispatch``) must be able to import without it.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from hooked_attn.model import HookedTransformer
from hooked_attn.scale.dispatch import dispatch
from hooked_attn.scale.folder import TOKENIZER, read_complete
from hooked_attn.scale.offload import read_config
from hooked_attn.scale.placement import Device, placement_units


def load_offloaded(folder: str | Path, execution_device: Device | torch.device = "cpu") -> nn.Module:
    """The model saved in ``folder``, built without reading any weight: every unit stays on disk and is
    read, one unit at a time, while the forward reaches it. Computation runs on ``execution_device``.

    Peak memory is about the largest unit (a block, or the embedding) twice over, plus activations.
    Weight properties (``model.W_Q``...) read from outside a forward are on the ``meta`` device.

    Raises:
        OffloadFolderError: no manifest, an interrupted write, or a file the manifest did not write
            (see ``hooked_attn.scale.folder``).
    """
    folder = Path(folder)
    manifest = read_complete(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER) if manifest["tokenizer"] else None
    with torch.device("meta"):
        model = HookedTransformer(read_config(manifest), tokenizer=tokenizer)
    # accelerate casts what it reads to the parameter's dtype: each parameter gets the dtype it was saved in.
    params = dict(model.named_parameters())
    for name, info in manifest["weights"].items():
        params[name].data = torch.empty_like(params[name], dtype=getattr(torch, info["dtype"]))
    return dispatch(model, {unit: "disk" for unit in placement_units(model)}, offload_folder=folder,
                    execution_device=execution_device)
