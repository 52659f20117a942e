"""Every benchmark in one command: JSON into benchmarks/results/ and the tables in docs/benchmarks.md.

    python -m benchmarks.run_all              # hooked_attn vs HF, plus the peers when installed
    bash scripts/setup_peers.sh               # once, to install TransformerLens 3.9 and 4.3 for the peer columns
    python -m benchmarks.run_all --quick      # small sizes only, a few minutes

Each figure is a ratio (or a rate) taken side by side in the same run on the same machine, from medians
of several repeats. Measures, never asserts: the targets in docs/benchmarks.md are read, not checked.
"""

import argparse
import json
import subprocess
import time

import torch

from benchmarks import bench_forward, bench_generate, bench_load, bench_patching
from benchmarks.common import RESULTS, ROOT, machine, save_shape

VENVS = ROOT / "benchmarks" / ".venvs"
PEERS = {"tl39": ("hooked", "TransformerLens 3.9 HookedTransformer"), "tl43": ("bridge", "TransformerLens 4.3 TransformerBridge")}


def peers(sizes: str, threads: int) -> dict[str, dict]:
    """Run benchmarks/peers/tl_bench.py in each installed peer environment on the GPT-2-small shape."""
    out = {}
    folder = save_shape("gpt2-small-shape", RESULTS / "models" / "gpt2-small-shape")
    for venv, (api, label) in PEERS.items():
        python = VENVS / venv / "bin" / "python"
        if not python.is_file():
            print(f"{label}: not installed (bash scripts/setup_peers.sh); its column stays empty", flush=True)
            continue
        target = RESULTS / f"peer_{venv}.json"
        try:
            args = [str(python), "benchmarks/peers/tl_bench.py", "--api", api, "--model-dir", str(folder), "--hf-name",
                    "gpt2", "--sizes", sizes, "--threads", str(threads), "--out", str(target)]
            done = subprocess.run(args, capture_output=True, text=True, timeout=3600, cwd=ROOT)
            if done.returncode:
                raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
            out[venv] = {"label": label, **json.loads(target.read_text())}
        except Exception as err:  # a peer that fails is reported in the page, not hidden
            out[venv] = {"label": label, "error": f"{type(err).__name__}: {str(err)[-500:]}"}
        print(json.dumps({venv: out[venv].get("error", "done")}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1x32 and 4x128 only, fp32 and bf16, fewer repeats")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--only", help="re-run these sections (forward,load,generate,patching,peers) and keep the "
                                       "others from the last benchmarks/results/all.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = "1x32,4x128" if args.quick else "1x32,4x128,8x512"
    started = time.time()
    only = set(args.only.split(",")) if args.only else None
    last = RESULTS / "all.json"
    results = json.loads(last.read_text()) if only and last.is_file() else {}
    command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "")
    results.update({"env": machine(), "command": command, "date": time.strftime("%Y-%m-%d")})
    sections = {
        "forward": lambda: bench_forward.run_both(["gpt2-small-shape", "llama-shape", "smollm2-135m"],
                                             bench_forward.parse_sizes(sizes), [torch.float32, torch.bfloat16],
                                             min_run_time=0.5 if args.quick else 1.0),
        "load": lambda: bench_load.run(["gpt2-small-shape", "smollm2-135m"], ["float32", "bfloat16"],
                                       repeats=1 if args.quick else 3),
        "generate": lambda: bench_generate.run(["gpt2-small-shape", "smollm2-135m"], repeats=1 if args.quick else 5),
        "patching": lambda: bench_patching.run(["gpt2-small-shape"], n_pos=16, repeats=1 if args.quick else 3),
        "peers": lambda: {} if args.no_peers else peers("4x128", args.threads),
    }
    for name, run in sections.items():
        if only is None or name in only:
            results[name] = run()
    if only:  # the page says which sections came from a later run
        results["rerun"] = sorted(set(results.get("rerun", [])) | only)
        results["rerun_minutes"] = (time.time() - started) / 60
    else:
        results["minutes"] = (time.time() - started) / 60
        results.pop("rerun", None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "all.json").write_text(json.dumps(results, indent=1))
    from benchmarks.report import write_page

    write_page(results, ROOT / "docs" / "benchmarks.md")
    print(f"wrote {RESULTS / 'all.json'} and docs/benchmarks.md in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
