"""A patching sweep and activation harvests (in memory, and to the SAE activation store) split over 2
CPU processes (torchrun, gloo) give exactly what one process gives. Run as a script, this file is the
torchrun worker."""

import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
LLAMA = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=53, max_position_embeddings=32)


def run_job(store: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sweep and the harvests (in memory, and to an activation store at ``store``), split over
    however many ranks are running (one without torchrun)."""
    from hooked_attn import HookedTransformer
    from hooked_attn.patching import layer_pos_head_vector_patch_setter
    from hooked_attn.scale.distributed import (
        gather_harvest, harvest_activations, harvest_to_store, sharded_activation_patch,
    )
    from tests.conftest import random_tokens, tiny_hf_model

    model = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))
    clean, corrupted = random_tokens(LLAMA, batch=1, n_pos=6, seed=1), random_tokens(LLAMA, batch=1, n_pos=6, seed=2)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    answer = int(clean[0, -1])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1].log_softmax(-1)[answer]

    # One variant per forward, so every variant runs the same arithmetic however the work is split.
    sweep = sharded_activation_patch(model, corrupted, clean_cache, metric, layer_pos_head_vector_patch_setter,
                                     "z", ["layer", "pos", "head"], batch_size=1)
    rows = random_tokens(LLAMA, batch=8, n_pos=7, seed=3)
    mine = harvest_activations(model, rows, lambda name: name.endswith(("resid_post", "hook_z")), batch_size=2)
    harvest_to_store(model, rows, ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"], store, batch_size=2,
                     sequences_per_shard=2)
    return sweep, gather_harvest(mine)


def test_two_gloo_processes_match_one(tmp_path):
    out = tmp_path / "rank0.pt"
    ranks = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out),
         str(tmp_path / "store_2")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    # The ranks run with one thread each; the reference must too, or the kernels sum in another order
    # (the suite may run with more threads) and "identical" would compare two roundings.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep, harvest = run_job(tmp_path / "store_1")  # one process, no process group, while the ranks run
        _, stderr = ranks.communicate(timeout=300)
    finally:
        torch.set_num_threads(threads)
        if ranks.poll() is None:
            ranks.kill()
    assert ranks.returncode == 0, stderr[-4000:]
    got = torch.load(out)
    assert got["world_size"] == 2
    assert sweep.shape == (3, 6, 4)
    torch.testing.assert_close(got["sweep"], sweep, atol=0, rtol=0)
    assert set(got["harvest"]) == set(harvest) and len(harvest) == 2 * LLAMA.num_hidden_layers
    for name, acts in harvest.items():
        assert acts.shape[0] == 8
        torch.testing.assert_close(got["harvest"][name], acts, atol=0, rtol=0)
    one, two = sorted((tmp_path / "store_1").iterdir()), sorted((tmp_path / "store_2").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 1 + 4  # manifest and 4 shards
    for a, b in zip(one, two):
        if a.suffix == ".json":
            assert a.read_text() == b.read_text()
        else:
            x, y = load_file(a), load_file(b)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    from hooked_attn.scale.distributed import init_distributed

    rank, world = init_distributed()
    sweep, harvest = run_job(Path(sys.argv[2]))
    if rank == 0:
        torch.save({"world_size": world, "sweep": sweep, "harvest": harvest}, sys.argv[1])
    torch.distributed.destroy_process_group()
