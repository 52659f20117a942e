"""TransformerLens peer benchmark: the operations that hooked_attn's benchmarks time, run in TransformerLens.

Run it with a peer's own interpreter (scripts/setup_peers.sh builds them); it never imports hooked_attn:

    benchmarks/.venvs/tl39/bin/python benchmarks/peers/tl_bench.py --api hooked --model-dir DIR --hf-name gpt2 \\
        --sizes 4x128 --threads 1 --out benchmarks/results/peer_tl39_hooked.json
    benchmarks/.venvs/tl43/bin/python benchmarks/peers/tl_bench.py --api bridge --model-dir DIR --hf-name gpt2 ...

DIR is a local HF folder (config.json, model.safetensors, tokenizer files); NAME (--hf-name) is the hub name that
TransformerLens knows for the architecture. The hub is unreachable, so the script builds a throw-away HF hub cache
in a temp dir (models--<org>--<name>/snapshots/<rev>/ holding symlinks to DIR's files, refs/main naming <rev>),
points HF_HOME / HF_HUB_CACHE at it and sets HF_HUB_OFFLINE=1 before transformers is imported. TransformerLens then
resolves NAME (AutoConfig, AutoModelForCausalLM, AutoTokenizer) from that cache. Every process also refuses
outgoing socket connections, so a load that tried the network fails loudly instead of being timed.

Measures, never asserts. Timings are medians of torch.utils.benchmark blocked_autorange (forward, cache) or of
a few plain runs after a warm-up (generate, patch); HF figures are taken in the same process, side by side.

APIs (--api):
  hooked  HookedTransformer.from_pretrained(NAME) (3.9 only; fold_ln, center_writing_weights, center_unembed and
          fold_value_biases on, as the peer does by default); --no-processing uses from_pretrained_no_processing.
  bridge  TransformerBridge.boot_transformers(NAME) then enable_compatibility_mode() (the peer's documented way to
          get HookedTransformer numerics and hook names, with the same four weight transforms); --no-processing
          skips enable_compatibility_mode() and uses the bridge as booted (raw HF weights).

Output JSON (all names snake_case, times in seconds):
  peer: "transformer-lens"; version: its version; api: "hooked" | "bridge"; processing: whether the in-process
  model had the default weight processing; model_dir, hf_name;
  env: {torch, transformers, transformer_lens, threads, machine, processor, python, cpu_count};
  records: a list of
    {op: "forward", batch, pos, dtype, peer_s, hf_sdpa_s, peer_over_hf, logprob_max_abs_diff}
        model(tokens) without hooks under no_grad; HF is AutoModelForCausalLM(DIR, attn_implementation="sdpa");
        logprob_max_abs_diff is max |log_softmax(peer) - log_softmax(hf)| on those tokens (a check that the
        peer runs DIR's weights; log-probs are invariant to the peer's weight processing).
    {op: "cache_all" | "cache_filtered", batch, pos, dtype, peer_s, peer_forward_s, over_forward, hf_sdpa_s,
     over_hf, n_cached}
        run_with_cache(tokens) of every hook, or with names_filter = names ending in "hook_resid_pre";
        n_cached is the number of cache entries (names; the bridge also lists alias names).
    {op: "load", processing, peer_s, hf_s, peer_over_hf, peer_peak_rss_growth_bytes, hf_peak_rss_growth_bytes,
     param_bytes, hf_param_bytes, repeats, call}
        median over `repeats` fresh processes (after importing torch, transformers, the HF model class and the
        peer's class) of the load call's wall time, and of peak RSS growth = ru_maxrss after the call minus RSS
        just before it. The peer's load includes its tokenizer; HF's is AutoModelForCausalLM.from_pretrained(DIR)
        alone. param_bytes counts each distinct parameter storage of the loaded object once.
    {op: "generate", prompt_pos, new_tokens, peer_s, peer_tok_s, hf_s, hf_tok_s, peer_over_hf, repeats}
        greedy decoding of 64 tokens from a 1x32 prompt, median of --repeats runs after a 4-token warm-up: peer
        generate(do_sample=False, stop_at_eos=False, use_past_kv_cache=True) beside HF generate(max_new_tokens=64,
        min_new_tokens=64, do_sample=False).
    {op: "patch_resid_pre", seconds, n_layers, n_pos, n_runs, seconds_per_run, repeats} or
    {op: "patch_resid_pre", unsupported: reason}
        transformer_lens.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit-difference metric)
        on a 1x16 prompt pair; n_runs = n_layers * n_pos patched forward passes; median of --patch-repeats sweeps
        after one patched forward pass as warm-up.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = ("forward", "cache", "load", "generate", "patch")
GENERATE_PROMPT_POS, GENERATE_NEW_TOKENS, WARM_UP_NEW_TOKENS, PATCH_POS = 32, 64, 4, 16


def forbid_network() -> None:
    """Makes every outgoing socket connection raise, so nothing this script times can use the network."""

    def refuse(self: socket.socket, address: object) -> None:
        print(f"tl_bench: refused a network connection to {address!r}", file=sys.stderr)  # seen even if caught
        raise ConnectionRefusedError(f"tl_bench forbids network access (tried to connect to {address!r})")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign,assignment]


# Fields that a family's published hub config.json carries and that TransformerLens reads, but that transformers
# 5's save_pretrained no longer writes: model_type -> {missing field: field whose value it copies}. Added only
# when absent; never changes a value that DIR's config.json has.
HUB_CONFIG_ALIASES = {"gpt2": {"n_ctx": "n_positions"}}  # TL 3.9 reads hf_config.n_ctx for GPT2LMHeadModel


def build_fake_hub(model_dir: Path, hf_name: str, root: Path) -> list[str]:
    """Lays out an offline HF hub cache under ``root`` whose ``hf_name`` repo is ``model_dir``; sets the env vars.

    Returns:
        The config.json fields added from HUB_CONFIG_ALIASES, as "field=value (from source)" strings.
    """
    files = [f for f in model_dir.iterdir() if f.is_file() and not f.name.startswith(".")]
    missing = {"config.json", "model.safetensors"} - {f.name for f in files}
    if missing:
        raise ValueError(f"--model-dir {model_dir} lacks {sorted(missing)}")
    revision = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()
    repo = root / "hub" / ("models--" + hf_name.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in files:
        if f.name != "config.json":
            (snapshot / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    added = []
    for field, source in HUB_CONFIG_ALIASES.get(config.get("model_type"), {}).items():
        if field not in config and source in config:
            config[field] = config[source]
            added.append(f"{field}={config[source]} (from {source})")
    (snapshot / "config.json").write_text(json.dumps(config, indent=1))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    os.environ.update(HF_HOME=str(root), HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1")
    return added


def peer_class(api: str) -> type:
    """Imports the peer's model class (TransformerLens 4 removed HookedTransformer: its ImportError says so)."""
    if api == "hooked":
        from transformer_lens import HookedTransformer

        return HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


def load_peer(api: str, hf_name: str, processing: bool):
    """Loads the peer the way its documentation says, on the CPU, in fp32."""
    cls = peer_class(api)
    if api == "hooked":
        load = cls.from_pretrained if processing else cls.from_pretrained_no_processing
        return load(hf_name, device="cpu")
    bridge = cls.boot_transformers(hf_name, device="cpu")
    if processing:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def load_call(api: str, processing: bool) -> str:
    if api == "hooked":
        return "HookedTransformer.from_pretrained" + ("" if processing else "_no_processing")
    return "TransformerBridge.boot_transformers" + (" + enable_compatibility_mode()" if processing else "")


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, so results name no machine's folders."""
    root = Path(__file__).resolve().parents[2]
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else resolved.name


def load_hf(model_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def param_bytes(model: object) -> int:
    """Bytes of the distinct parameter storages reachable from ``model`` (tied or shared weights counted once)."""
    import torch

    seen: dict[int, int] = {}
    for p in torch.nn.Module.parameters(model):  # the base method: walks every registered submodule
        storage = p.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def load_child(args: argparse.Namespace) -> None:
    """Hidden sub-mode: one load in this fresh process; writes {seconds, peak_rss_growth_bytes, param_bytes}."""
    import psutil
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    # Module imports stay outside the clock: the HF model class, and the peer's class for a peer load.
    for architecture in json.loads((args.model_dir / "config.json").read_text()).get("architectures", []):
        getattr(transformers, architecture)
    if args.load_child != "hf":
        peer_class(args.api)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if args.load_child == "hf":
        model = load_hf(args.model_dir)
    else:
        model = load_peer(args.api, args.hf_name, processing=args.load_child == "peer_processed")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result = {"seconds": seconds, "peak_rss_growth_bytes": peak - rss_before, "param_bytes": param_bytes(model)}
    Path(args.load_result).write_text(json.dumps(result))


def run_load_child(args: argparse.Namespace, kind: str, result: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--api", args.api, "--model-dir", str(args.model_dir),
           "--hf-name", args.hf_name, "--threads", str(args.threads), "--out", os.devnull,
           "--load-child", kind, "--load-result", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"load sub-process {kind!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("tl_bench: refused"):
            print(f"load {kind}: {line}", file=sys.stderr)
    return json.loads(result.read_text())


def bench_load(args: argparse.Namespace, tmp: Path) -> list[dict]:
    runs: dict[str, list[dict]] = {}
    for kind in ("hf", "peer_processed", "peer_raw"):
        runs[kind] = [run_load_child(args, kind, tmp / f"load_{kind}_{i}.json") for i in range(args.load_repeats)]
        print(f"load {kind}: {[round(r['seconds'], 2) for r in runs[kind]]} s", file=sys.stderr)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    records = []
    for processing in (True, False):
        kind = "peer_processed" if processing else "peer_raw"
        records.append({"op": "load", "processing": processing, "peer_s": med(kind, "seconds"),
                        "hf_s": med("hf", "seconds"), "peer_over_hf": med(kind, "seconds") / med("hf", "seconds"),
                        "peer_peak_rss_growth_bytes": int(med(kind, "peak_rss_growth_bytes")),
                        "hf_peak_rss_growth_bytes": int(med("hf", "peak_rss_growth_bytes")),
                        "param_bytes": runs[kind][-1]["param_bytes"],
                        "hf_param_bytes": runs["hf"][-1]["param_bytes"],
                        "repeats": args.load_repeats, "call": load_call(args.api, processing)})
    return records


def timer_median(stmt: str, threads: int, **globals_: object) -> float:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt=stmt, globals=globals_, num_threads=threads)
    return timer.blocked_autorange(min_run_time=1.0).median


def plain_median(fn, warm_up, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one untimed call of the cheaper ``warm_up``."""
    warm_up()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_forward_and_cache(model, hf, args: argparse.Namespace, dtype_name: str, only: set[str]) -> list[dict]:
    import torch

    records: list[dict] = []
    resid_pre = lambda name: name.endswith("hook_resid_pre")
    for size in args.sizes.split(","):
        batch, n_pos = map(int, size.split("x"))
        tokens = torch.randint(0, hf.config.vocab_size, (batch, n_pos), generator=torch.Generator().manual_seed(0))
        peer_s = timer_median("m(t)", args.threads, m=model, t=tokens)
        hf_s = timer_median("m(t)", args.threads, m=hf, t=tokens)
        shape, first = {"batch": batch, "pos": n_pos, "dtype": dtype_name}, len(records)
        if "forward" in only:
            diff = (model(tokens).float().log_softmax(-1) - hf(tokens).logits.float().log_softmax(-1)).abs().max()
            records.append({"op": "forward", **shape, "peer_s": peer_s, "hf_sdpa_s": hf_s,
                            "peer_over_hf": peer_s / hf_s, "logprob_max_abs_diff": diff.item()})
        if "cache" in only:
            for op, kwargs in (("cache_all", {}), ("cache_filtered", {"names_filter": resid_pre})):
                cache_s = timer_median("m.run_with_cache(t, **kw)", args.threads, m=model, t=tokens, kw=kwargs)
                n_cached = len(model.run_with_cache(tokens, **kwargs)[1])
                records.append({"op": op, **shape, "peer_s": cache_s, "peer_forward_s": peer_s,
                                "over_forward": cache_s / peer_s, "hf_sdpa_s": hf_s, "over_hf": cache_s / hf_s,
                                "n_cached": n_cached})
        for rec in records[first:]:
            print(json.dumps(rec), file=sys.stderr)
    return records


def check_generated(who: str, out: object, new_tokens: int) -> None:
    """Raises unless ``out`` is the prompt plus exactly ``new_tokens`` tokens (so tok/s counts what was made)."""
    expected = (1, GENERATE_PROMPT_POS + new_tokens)
    if tuple(getattr(out, "shape", ())) != expected:
        raise RuntimeError(f"{who} generate returned {type(out).__name__} of shape "
                           f"{tuple(getattr(out, 'shape', ()))}, expected {expected}")


def bench_generate(model, hf, args: argparse.Namespace) -> dict:
    import torch

    seed = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, hf.config.vocab_size, (1, GENERATE_PROMPT_POS), generator=seed)
    def peer(new_tokens: int = GENERATE_NEW_TOKENS) -> None:
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False,
                             use_past_kv_cache=True, verbose=False)
        check_generated("peer", out, new_tokens)

    def reference(new_tokens: int = GENERATE_NEW_TOKENS) -> None:
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=hf.config.eos_token_id)
        check_generated("HF", out, new_tokens)

    peer_s = plain_median(peer, lambda: peer(WARM_UP_NEW_TOKENS), args.repeats)
    hf_s = plain_median(reference, lambda: reference(WARM_UP_NEW_TOKENS), args.repeats)
    return {"op": "generate", "prompt_pos": GENERATE_PROMPT_POS, "new_tokens": GENERATE_NEW_TOKENS,
            "peer_s": peer_s, "peer_tok_s": GENERATE_NEW_TOKENS / peer_s, "hf_s": hf_s,
            "hf_tok_s": GENERATE_NEW_TOKENS / hf_s, "peer_over_hf": peer_s / hf_s, "repeats": args.repeats}


def bench_patch(model, args: argparse.Namespace) -> dict:
    import torch
    from transformer_lens import patching

    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (1, PATCH_POS), generator=torch.Generator().manual_seed(2))
    corrupted = clean.clone()
    corrupted[0, PATCH_POS // 2] = (clean[0, PATCH_POS // 2] + 1) % vocab
    answer, wrong = int(clean[0, -1]), int(corrupted[0, -1] + 7) % vocab

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer] - logits[0, -1, wrong]

    _, clean_cache = model.run_with_cache(clean)
    results: list = []

    def sweep() -> None:
        results.append(patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff))

    def warm_up() -> None:  # one patched forward pass, not a whole sweep (192 of them for GPT-2 small)
        model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: act)])

    try:
        seconds = plain_median(sweep, warm_up, args.patch_repeats)
    except Exception as err:  # noqa: BLE001 - the peer's refusal is the finding; it goes in the JSON
        return {"op": "patch_resid_pre", "unsupported": f"{type(err).__name__}: {err}"[:500]}
    n_layers = model.cfg.n_layers
    shape = tuple(getattr(results[-1], "shape", ()))
    if shape != (n_layers, PATCH_POS):
        return {"op": "patch_resid_pre", "unsupported": f"returned {type(results[-1]).__name__} of shape {shape}, "
                                                        f"expected ({n_layers}, {PATCH_POS})"}
    return {"op": "patch_resid_pre", "seconds": seconds, "n_layers": n_layers, "n_pos": PATCH_POS,
            "n_runs": n_layers * PATCH_POS, "seconds_per_run": seconds / (n_layers * PATCH_POS),
            "repeats": args.patch_repeats}


def env_info(threads: int) -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "transformer_lens": importlib.metadata.version("transformer-lens"), "threads": threads,
            "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def run(args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    only = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    records: list[dict] = []
    if "load" in only:
        records += bench_load(args, tmp)
    if only - {"load"}:
        model = load_peer(args.api, args.hf_name, processing=not args.no_processing)
        hf = load_hf(args.model_dir)
        with torch.no_grad():
            if only & {"forward", "cache"}:
                records += bench_forward_and_cache(model, hf, args, "float32", only)
            if "generate" in only:
                records.append(bench_generate(model, hf, args))
                print(json.dumps(records[-1]), file=sys.stderr)
            if "patch" in only:
                records.append(bench_patch(model, args))
                print(json.dumps(records[-1]), file=sys.stderr)
            if "bfloat16" in args.dtypes.split(",") and only & {"forward", "cache"}:
                model.to(torch.bfloat16)
                hf.to(torch.bfloat16)
                records += bench_forward_and_cache(model, hf, args, "bfloat16", only)
    return {"peer": "transformer-lens", "version": importlib.metadata.version("transformer-lens"), "api": args.api,
            "processing": not args.no_processing, "model_dir": repo_relative(args.model_dir), "hf_name": args.hf_name,
            "env": env_info(args.threads), "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=("hooked", "bridge"), required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--hf-name", required=True, help="hub name TransformerLens knows, e.g. gpt2")
    parser.add_argument("--sizes", default="1x32,4x128", help="comma-separated BATCHxPOS for forward and cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32", help="float32 and optionally bfloat16 (forward, cache)")
    parser.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--no-processing", action="store_true", help="in-process model without weight processing")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of generate (after a short warm-up)")
    parser.add_argument("--patch-repeats", type=int, default=1, help="timed sweeps (after one patched forward)")
    parser.add_argument("--load-repeats", type=int, default=2, help="fresh processes per load measurement")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load-child", choices=("hf", "peer_processed", "peer_raw"), help=argparse.SUPPRESS)
    parser.add_argument("--load-result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(OPS)
    if unknown:
        parser.error(f"--only has unknown ops {sorted(unknown)}; choose from {list(OPS)}")
    forbid_network()
    if args.load_child:  # the parent built the hub cache and exported its env vars
        load_child(args)
        return
    with tempfile.TemporaryDirectory(prefix="tl_bench_") as tmp:
        added = build_fake_hub(args.model_dir, args.hf_name, Path(tmp))
        report = run(args, Path(tmp)) | {"hub_config_additions": added}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
