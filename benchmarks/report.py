"""docs/benchmarks.md from a run_all result: one table per benchmark, each figure beside its target."""

from pathlib import Path

HEADER = """# Benchmarks

Every figure on this page comes from one run of

```bash
{command}
```

on {cpu} ({cores} cores, {threads} thread(s) used), Python {python}, torch {torch}, transformers
{transformers}, on {date}; the run took {minutes:.0f} minutes. Each figure is a median of several repeats, and
each ratio is taken side by side in that run (forward, cache and generation: the two sides timed in turn,
round after round). The raw numbers are in `benchmarks/results/all.json`. The
peers' columns need `bash scripts/setup_peers.sh` first (TransformerLens 3.9 and 4.3 in their own virtual
environments). Re-run it to check any number here: the benchmarks measure, they never assert.
"""


def _f(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _peer(results: dict, venv: str, op: str, **match: object) -> dict | None:
    peer = results.get("peers", {}).get(venv, {})
    for rec in peer.get("records", []):
        if rec.get("op") == op and all(rec.get(k) == v for k, v in match.items()):
            return rec
    return None


def _peer_cells(results: dict, rec: dict, op: str, key: str, **match: object) -> str:
    """The TL 3.9 and 4.3 columns for a GPT-2-shape row (the peers run that shape only)."""
    cells = []
    for venv in ("tl39", "tl43"):
        p = _peer(results, venv, op, **match) if rec["model"] == "gpt2-small-shape" else None
        cells.append(_f(p and p.get(key)))
    return " | ".join(cells)


def forward_table(results: dict) -> list[str]:
    lines = ["## 1. Forward pass, no hooks", "",
             "Time of `model(tokens)` over HF's own forward on the same weights (`attn_implementation=\"sdpa\"` and "
             "`\"eager\"`); below 1.00 is faster than HF. Target: at most 1.02 x HF sdpa. The peers' ratios are "
             "over HF sdpa in their own run.", "",
             "| model | dtype | batch x pos | hooked_attn / HF sdpa | hooked_attn / HF eager | TL 3.9 / HF sdpa | "
             "TL 4.3 bridge / HF sdpa |", "|---|---|---|---|---|---|---|"]
    for rec in results["forward"]:
        if rec["op"] != "forward":
            continue
        peers = _peer_cells(results, rec, "forward", "peer_over_hf", batch=rec["batch"], pos=rec["pos"],
                            dtype=rec["dtype"])
        lines.append(f"| {rec['model']} | {rec['dtype']} | {rec['batch']}x{rec['pos']} | "
                     f"{_f(rec['hooked_over_hf_sdpa'])} | {_f(rec['hooked_over_hf_eager'])} | {peers} |")
    return lines


def cache_table(results: dict) -> list[str]:
    lines = ["", "## 2. `run_with_cache`", "",
             "`run_with_cache` of every hook, and of the `hook_resid_pre` of each layer only, over HF's plain forward "
             "(sdpa). Target: everything cached at most 1.10 x HF's forward. Each is measured twice: with glibc's "
             "default settings, which hand a dropped cache's pages back to the OS so that every call faults its "
             "cache in afresh, and in a separate process after `hooked_attn.keep_freed_memory()`, which keeps them "
             "for reuse (see [performance](performance.md)).", "",
             "| model | batch x pos | hooks cached | cache size | all / HF sdpa | all / hooked forward | "
             "resid_pre only / HF sdpa | with keep_freed_memory(): all / HF sdpa | all / hooked forward | "
             "TL 3.9 all / HF | TL 4.3 all / HF |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    records = [rec for rec in results["forward"] if rec["op"] == "run_with_cache"]
    for rec in records:
        if rec.get("keep_freed_memory"):
            continue
        kept = next((r for r in records if r.get("keep_freed_memory") and r["model"] == rec["model"]), {})
        peers = _peer_cells(results, rec, "cache_all", "over_hf", batch=rec["batch"], pos=rec["pos"])
        lines.append(f"| {rec['model']} | {rec['batch']}x{rec['pos']} | {rec['hooks_cached']} | "
                     f"{rec['cache_bytes'] / 2**20:.0f} MiB | {_f(rec['cache_all_over_hf_sdpa'])} | "
                     f"{_f(rec['cache_all_over_hooked'])} | {_f(rec['cache_resid_pre_over_hf_sdpa'])} | "
                     f"{_f(kept.get('cache_all_over_hf_sdpa'))} | {_f(kept.get('cache_all_over_hooked'))} | {peers} |")
    return lines


def load_table(results: dict) -> list[str]:
    lines = ["", "## 3. Loading from a local safetensors folder", "",
             "Wall time over HF's `AutoModelForCausalLM.from_pretrained` of the same folder, and peak RSS growth during "
             "the load over the loaded model's parameter bytes, each in a fresh process. Targets: with processing at "
             "most 1.5 x HF's time and at most 1.3 x the model's size. HF memory-maps the file and, when the dtype "
             "is the file's, reads nothing until the first forward (its growth is then near zero); hooked_attn reads "
             "and processes every weight while loading. So each side's time to its first logits (load, then one "
             "1 x 32 forward) is also given. The last two columns load from an HF model already in memory, "
             "processed: with its weights copied (the default; the HF model stays usable, so the growth is one "
             "more model) and taken (`release_source=True`; only the copies processing needs, such as an untied "
             "`W_U`).", "",
             "| model | dtype | processed: time / HF | processed: first logits / HF's | processed: RSS growth / size "
             "| unprocessed: time / HF | unprocessed: first logits / HF's | unprocessed: RSS growth / size | "
             "HF: seconds | HF: RSS growth / size | TL 3.9 processed: time / HF, growth / size | "
             "in memory, copied: RSS growth / size | in memory, released: RSS growth / size |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in results["load"]:
        p = _peer(results, "tl39", "load", processing=True) if rec["model"] == "gpt2-small-shape" and \
            rec["dtype"] == "float32" else None
        peer = "-" if p is None else (f"{_f(p['peer_s'] / p['hf_s'])}, "
                                      f"{_f(p['peer_peak_rss_growth_bytes'] / p['param_bytes'])}")
        cells = [f"{_f(rec[f'hooked_{kind}_over_hf_seconds'])} | "
                 f"{_f(rec.get(f'hooked_{kind}_over_hf_first_logits_seconds'))} | "
                 f"{_f(rec[f'hooked_{kind}_growth_over_param_bytes'])}" for kind in ("processed", "unprocessed")]
        lines.append(f"| {rec['model']} | {rec['dtype']} | {' | '.join(cells)} | {_f(rec['hf_seconds'])} | "
                     f"{_f(rec['hf_growth_over_param_bytes'])} | {peer} | "
                     f"{_f(rec.get('in_memory_copied_growth_over_param_bytes'))} | "
                     f"{_f(rec.get('in_memory_released_growth_over_param_bytes'))} |")
    return lines


def generate_table(results: dict) -> list[str]:
    lines = ["", "## 4. Greedy generation, 64 new tokens", "",
             "Tokens per second of `model.generate` (KV cache) over HF's `generate` on the same weights, 1 x 32 prompt, "
             "fp32. Target: at least 1.0.", "",
             "| model | hooked_attn tok/s | HF tok/s | hooked_attn / HF | same tokens as HF | TL 3.9 / HF | TL 4.3 / HF |",
             "|---|---|---|---|---|---|---|"]
    for rec in results["generate"]:
        peers = []
        for venv in ("tl39", "tl43"):
            p = _peer(results, venv, "generate") if rec["model"] == "gpt2-small-shape" else None
            peers.append("-" if p is None else _f(p["peer_tok_s"] / p["hf_tok_s"]))
        lines.append(f"| {rec['model']} | {_f(rec['hooked_tok_s'], 1)} | {_f(rec['hf_tok_s'], 1)} | "
                     f"{_f(rec['hooked_over_hf_tok_s'])} | {'yes' if rec['same_tokens_as_hf'] else 'no'} | "
                     f"{' | '.join(peers)} |")
    return lines


def patching_table(results: dict) -> list[str]:
    lines = ["", "## 5. Activation-patching sweep", "",
             "`get_act_patch_resid_pre` over every layer and position of a 1 x 16 prompt (one metric per patch). "
             "Target: at least 3 x faster than TransformerLens 3.9's `get_act_patch_resid_pre`.", "",
             "| model | patches | hooked_attn seconds | TL 3.9 seconds | TL 3.9 / hooked_attn |", "|---|---|---|---|---|"]
    for rec in results["patching"]:
        p = _peer(results, "tl39", "patch_resid_pre")
        tl = None if p is None or "seconds" not in p else p["seconds"]
        lines.append(f"| {rec['model']} | {rec['patches']} | {_f(rec['seconds'])} | {_f(tl)} | "
                     f"{_f(tl / rec['seconds'] if tl else None, 1)} |")
    return lines


def peer_notes(results: dict) -> list[str]:
    lines = ["", "## 6. Peers", ""]
    peers = results.get("peers", {})
    if not peers:
        lines.append("The peers were not run (`--no-peers`, or `scripts/setup_peers.sh` not run).")
    for venv, peer in peers.items():
        if "error" in peer:
            lines.append(f"- {peer['label']}: failed in this run: `{peer['error'][:300]}`")
        else:
            env = peer.get("env", {})
            lines.append(f"- {peer['label']}: transformer-lens {peer.get('version')}, torch {env.get('torch')}, "
                         f"transformers {env.get('transformers')}; GPT-2-small shape, same random weights.")
    return lines


def write_page(results: dict, path: Path) -> None:
    env = results["env"]
    head = HEADER.format(command=results["command"].split(" --only")[0], date=results["date"],
                         minutes=results["minutes"], **env)
    if results.get("rerun"):
        head += (f"\nSections {', '.join(results['rerun'])} were re-run afterwards, on the same machine, with "
                 f"`python -m benchmarks.run_all --only {','.join(results['rerun'])}` "
                 f"({results['rerun_minutes']:.0f} minutes).\n")
    body = [*forward_table(results), *cache_table(results), *load_table(results), *generate_table(results),
            *patching_table(results), *peer_notes(results)]
    path.write_text(head + "\n" + "\n".join(body) + "\n")
