"""What every benchmark shares: timing by median, the machine's description, the model shapes, peak RSS.

Benchmarks measure and never assert. Each ratio is taken side by side in one process (or, for loading,
in fresh processes started one after another), so that both sides see the same machine state.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5,
                min_run_time: float | None = None) -> dict[str, float]:
    """Median wall time of each of ``fns``, taken over ``rounds`` rounds that time every one in turn (the
    order rotating each round), so that a slow spell of the machine falls on every side alike.

    With ``min_run_time``, a round times each function over blocks filling that long and keeps their
    median (for calls well under a second); without, a round makes one call of each, after one
    warm-up call each (for long calls).
    """
    names = list(fns)
    if min_run_time is None:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if min_run_time is not None:
                timer = benchmark.Timer(stmt="fn()", globals={"fn": fns[name]})
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
            else:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def median_of_runs(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call (for runs too long to block)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_results(name: str, records: list[dict]) -> None:
    """benchmarks/results/NAME.json: the machine and the records."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"env": machine(), "records": records}, indent=1))


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()}


def shapes() -> dict[str, transformers.PretrainedConfig]:
    """Randomly initialised models with the shapes of GPT-2 small and of SmolLM2-135M (a LLaMA)."""
    return {
        "gpt2-small-shape": transformers.GPT2Config(),
        "llama-shape": transformers.LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    }


def smollm2_folder() -> Path:
    """The real SmolLM2-135M that setup prepares (see hooked_attn.default_model)."""
    from hooked_attn.default_model import prepare_smollm2

    return Path(prepare_smollm2())


def save_shape(name: str, folder: Path) -> Path:
    """Save the random-init model ``name`` (with the GPT-2 tokenizer) as an HF folder, once."""
    from hooked_attn.default_model import gpt2_tokenizer

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(shapes()[name])
        model.save_pretrained(folder)
        gpt2_tokenizer().save_pretrained(folder)
    return folder


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) for this process, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: list[str], python: str = sys.executable, timeout: float = 1200) -> dict:
    """Run ``python args...`` in a fresh process and return the JSON object it prints last."""
    return run_child_records(args, python, timeout)[-1]


def run_child_records(args: list[str], python: str = sys.executable, timeout: float = 1200) -> list[dict]:
    """Run ``python args...`` in a fresh process and return every JSON record it prints, one per line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
