"""Beyond one device and one process: device maps, disk offload, and sweeps split over torchrun ranks.

Built on accelerate (placement, offload hooks) and torch.distributed (process groups); see docs/scale.md.
"""

from hooked_attn.scale.dispatch import device_map_of, dispatch
from hooked_attn.scale.distributed import (
    gather_harvest, harvest_activations, harvest_to_store, init_distributed, sharded_activation_patch,
)
from hooked_attn.scale.folder import OffloadFolderError
from hooked_attn.scale.offload import save_offloaded
from hooked_attn.scale.offloaded_model import load_offloaded
from hooked_attn.scale.placement import plan_device_map
from hooked_attn.weights import weights_loaded

__all__ = ["plan_device_map", "dispatch", "device_map_of", "save_offloaded", "load_offloaded", "weights_loaded", "OffloadFolderError",
           "init_distributed",
           "sharded_activation_patch", "harvest_activations", "gather_harvest", "harvest_to_store"]
