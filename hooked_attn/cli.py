"""The ``hooked-attn`` command: argument parsing and printing around ``hooked_attn.verify`` and
``hooked_attn.analysis``.

Exit status: 0 on success, 1 when ``verify`` finds a difference above ``--atol`` (or ``hooks --filter``
matches nothing), 2 for a usage error or a model that cannot be loaded.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor

from hooked_attn.architectures.base import UnknownArchitectureError
from hooked_attn.model import HookedTransformer
from hooked_attn.verify import (
    DEFAULT_ATOL, DEFAULT_PROMPT, DTYPES, USER_ERRORS, HookTable, RunResult, VerifyError, VerifyReport,
    list_hooks, resolve_source, verify_model,
)

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")
MODEL_HELP = ("a local HF model folder, a .gguf file or a hub id; by default the embedded "
              "SmolLM2-135M-Instruct (prepared once into ~/.cache/hooked_attn)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default) and return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        return int(exit_.code or 0)
    _configure_logging(args.verbose)
    try:
        if args.command == "verify":
            return _verify(args)
        if args.command == "attention":
            return _attention(args)
        if args.command == "doctor":
            return _doctor(args)
        return _hooks(args)
    except (*USER_ERRORS, ImportError) as err:  # ImportError: --png without matplotlib
        if args.verbose:
            logging.getLogger(__name__).exception("%s failed", args.command)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hooked-attn", description="Check hooked_attn's conversion of a model, list its hook points, "
                                        "show its attention patterns and check every family (doctor).",
        epilog="exit status: 0 ok, 1 verify found a difference above --atol (or hooks --filter matched "
               "nothing, or a doctor row is not ok), 2 usage error or a model that cannot be loaded",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify", help="compare a model's unprocessed and processed loads with the HF eager model",
        description="Load MODEL with from_pretrained_no_processing and from_pretrained, and as the HF eager "
                    "model; compare logits, log-probs and the residual stream. Exits 1 when the unprocessed "
                    "logit diff or the processed log-prob diff exceeds --atol.",
    )
    verify.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    verify.add_argument("--dtype", choices=list(DTYPES), default="float32", help="of all three models")
    verify.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"input text (default {DEFAULT_PROMPT!r}); "
                                                                 "ignored by models without a tokenizer")
    verify.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"largest allowed difference (default {DEFAULT_ATOL:.0e}); bfloat16 rounding "
                             "alone reaches about 0.5 on SmolLM2-135M, so pass about --atol 1 there")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    hooks = commands.add_parser("hooks", help="list every hook point with its shape",
                                description="Run one short forward caching every hook (hook_result included) "
                                            "and print one line per hook: name, shape, axes.")
    hooks.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    hooks.add_argument("--filter", metavar="SUBSTRING", help="only hooks whose name contains SUBSTRING")

    attention = commands.add_parser(
        "attention", help="show one head's attention pattern on a text (terminal, PNG, HTML)",
        description="Run MODEL on TEXT caching the attention patterns; print head HEAD of layer LAYER as a "
                    "text heatmap and the top keys of one query, and optionally write a PNG picture and a "
                    "self-contained interactive HTML viewer (every layer and head). With one positional "
                    "argument, it is TEXT and the default model is used.",
    )
    attention.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    attention.add_argument("text", metavar="TEXT", help="the input text")
    attention.add_argument("--layer", type=int, default=0, help="layer to show (default 0; negative counts from the end)")
    attention.add_argument("--head", type=int, default=0, help="head to show (default 0; negative counts from the end)")
    attention.add_argument("--query", type=int, default=-1,
                           help="query position of the top-k table (default -1, the last token)")
    attention.add_argument("--top-k", type=int, default=5, metavar="K", help="keys in the top-k table (default 5)")
    attention.add_argument("--max-tokens", type=int, default=40, metavar="N",
                           help="draw at most the last N queries and keys (default 40)")
    attention.add_argument("--color", action="store_true", help="shade the heatmap with ANSI colours")
    attention.add_argument("--png", metavar="FILE", help="write the head's heatmap as a picture (.png, .svg, .pdf; "
                                                         "needs matplotlib, the `plots` extra)")
    attention.add_argument("--all-heads", action="store_true", help="with --png, draw every head of the layer")
    attention.add_argument("--html", metavar="FILE", help="write the interactive viewer of every layer and head")
    attention.add_argument("--tokenizer", metavar="PATH", help="a tokenizer folder, for a MODEL without one")
    attention.add_argument("--prepend-bos", action="store_true",
                           help="put the BOS token first even where the tokenizer does not add it")

    doctor = commands.add_parser(
        "doctor", help="convert every family's tiny configs under the installed transformers and compare with HF",
        description="For the installed torch and transformers, convert every registered family's tiny random "
                    "configs and print one row per family and variant: the largest difference from HF, "
                    "unprocessed (logits) and processed (log-probs), or the refusal and its reason. Exits 1 "
                    "when any row is not ok.",
    )
    doctor.add_argument("--family", action="append", metavar="HF_CLASS",
                        help="only this HF class (e.g. LlamaForCausalLM); repeatable")
    doctor.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _doctor(args: argparse.Namespace) -> int:
    from hooked_attn.doctor import format_rows, run_doctor

    rows = run_doctor(args.family)
    print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) if args.json else format_rows(rows))
    return 0 if all(r.status == "ok" for r in rows) else 1


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _verify(args: argparse.Namespace) -> int:
    report = verify_model(args.model, DTYPES[args.dtype], args.prompt)
    if args.json:
        print(json.dumps(report.to_dict(args.atol), indent=2))
    else:
        print(format_report(report, args.atol))
    return 1 if report.failures(args.atol) else 0


def format_report(report: VerifyReport, atol: float) -> str:
    """The verify table: one row per model, then the residual stream per layer, then the verdict."""
    if report.prompt is None:
        source = f"{len(report.token_ids)} fixed random token ids (the model has no tokenizer)"
    else:
        source = f"{report.prompt!r} ({len(report.token_ids)} tokens)"
    lines = [
        f"model        {report.source}",
        (f"             {report.hf_architecture}, {report.n_layers} layers, "
         f"{report.n_hook_points} hook points, {report.dtype}"),
        f"input        {source}: {report.token_ids}",
        "",
        (f"{'':<12} {'max|logit diff|':>15} {'max|log-prob diff|':>18}  {'load':>8} {'forward':>9}  "
         "next token"),
    ]
    runs = {"HF eager": report.hf, "unprocessed": report.unprocessed, "processed": report.processed}
    for name, run in runs.items():
        agrees = "" if run is report.hf or run.next_token == report.hf.next_token else "  DIFFERS FROM HF"
        lines.append(f"{name:<12} {_diff(run.max_logit_diff):>15} {_diff(run.max_log_prob_diff):>18}  "
                     f"{run.load_s:>6.2f} s {run.forward_s * 1e3:>6.1f} ms  {_token(run)}{agrees}")
    lines += ["", "residual stream, unprocessed vs HF hidden_states[L]:",
              f"  {'hook':<26} {'max|diff|':>9} {'max|HF|':>9}"]
    lines += [f"  {f'blocks.{layer}.hook_resid_pre':<26} {_diff(diff)} {scale:>9.1f}"
              for layer, (diff, scale) in enumerate(zip(report.resid_diffs, report.resid_scales))]
    failures = report.failures(atol)
    verdict = (f"FAIL (atol {atol:.0e}): " + "; ".join(failures)) if failures else (
        f"PASS (atol {atol:.0e}): unprocessed max|logit diff| {report.unprocessed.max_logit_diff:.1e}, "
        f"processed max|log-prob diff| {report.processed.max_log_prob_diff:.1e}")
    return "\n".join([*lines, "", verdict])


def _diff(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.1e}"


def _token(run: RunResult) -> str:
    token = run.next_token
    return f"{token.id}" if token.text is None else f"{token.text!r} ({token.id})"


def _hooks(args: argparse.Namespace) -> int:
    table = list_hooks(args.model, contains=args.filter)
    print(format_hooks(table, args.filter))
    if not table.hooks:
        print(f"no hook name contains {args.filter!r}", file=sys.stderr)
        return 1
    return 0


def format_hooks(table: HookTable, contains: str | None = None) -> str:
    """Two ``#`` header lines (source and axis sizes), then one ``name  shape  axes`` line per hook."""
    shown = "" if contains is None else f", {len(table.hooks)} contain {contains!r}"
    sizes = " ".join(f"{axis}={size}" for axis, size in table.sizes.items())
    lines = [f"# {table.hf_architecture} from {table.source}: {table.n_hook_points} hook points{shown}",
             f"# axis sizes on this forward: {sizes}"]
    width = max((len(h.name) for h in table.hooks), default=0)
    shapes = {h.name: "not fired" if h.shape is None else str(h.shape) for h in table.hooks}
    shape_width = max((len(s) for s in shapes.values()), default=0)
    lines += [f"{h.name:<{width}}  {shapes[h.name]:<{shape_width}}  {h.axes or '?'}".rstrip()
              for h in table.hooks]
    return "\n".join(lines)


def _in_range(value: int, size: int, flag: str, what: str) -> int:
    if not -size <= value < size:
        raise VerifyError(f"{flag} {value} is out of range: the model has {size} {what} (0..{size - 1})")
    return value % size


def _attention_on_wrapped_hf(source: str | os.PathLike, text: str, tokenizer: str | os.PathLike | None,
                             prepend_bos: bool) -> tuple[Any, Tensor, list[str], Any, str]:
    """``hooked-attn attention`` on a family with no converter: (model, tokens, str_tokens, pattern
    cache, description), the HF model wrapped and run on ``text`` with its own (or ``tokenizer``'s) tokenizer.

    Raises:
        VerifyError: no tokenizer is found, or the model makes no attention call.
    """
    import transformers

    from hooked_attn.wrap.fallback import wrap_hf

    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer if tokenizer is not None else source)
    except (OSError, ValueError) as err:
        raise VerifyError(f"{source} has no tokenizer: pass --tokenizer PATH (a folder holding one)") from err
    model = wrap_hf(source)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if prepend_bos and tok.bos_token_id is not None:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
    if not model.attention_layers:
        raise VerifyError(f"{source}: the model made no scaled_dot_product_attention call")
    name = type(model.module).__name__
    description = (f"{name}, not converted: the HF model wrapped, {len(model.attention_layers)} attention layers "
                   f"({model.attention_layers[0]}, ...)")
    return model, ids, tok.convert_ids_to_tokens(ids[0].tolist()), cache, description


def _attention(args: argparse.Namespace) -> int:
    from hooked_attn.analysis import attention_viewer, plot_attention, text_heatmap, top_k_table

    if args.top_k < 1 or args.max_tokens < 1:
        raise VerifyError(f"--top-k and --max-tokens must be at least 1, got {args.top_k} and {args.max_tokens}")
    if not args.text:
        raise VerifyError("TEXT is empty: give the text to run")
    if args.png and Path(args.png).suffix.lower() not in PICTURE_SUFFIXES:
        raise VerifyError(f"--png {args.png!r}: the file name must end in one of {', '.join(PICTURE_SUFFIXES)}")
    source = resolve_source(args.model)
    try:
        model = HookedTransformer.from_pretrained_no_processing(source, tokenizer=args.tokenizer)
    except UnknownArchitectureError:  # a family with no converter: the HF model itself, wrapped
        model, tokens, str_tokens, cache, description = _attention_on_wrapped_hf(source, args.text, args.tokenizer,
                                                                          args.prepend_bos)
        n_layers, n_heads = len(model.attention_layers), cache["pattern", 0].shape[1]
    else:
        if model.tokenizer is None:
            raise VerifyError(f"{source} has no tokenizer: pass --tokenizer PATH (a folder holding one)")
        cfg = model.cfg
        n_layers, n_heads = cfg.n_layers, cfg.n_heads
        description = f"{cfg.hf_architecture}, {cfg.n_layers} layers, {cfg.n_heads} heads"
        tokens = model.to_tokens(args.text, prepend_bos=True if args.prepend_bos else None)
        str_tokens = model.to_str_tokens(tokens[0])
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    layer = _in_range(args.layer, n_layers, "--layer", "layers")
    head = _in_range(args.head, n_heads, "--head", "heads per layer")
    query = _in_range(args.query, tokens.shape[1], "--query", "tokens in TEXT")
    pattern = cache["pattern", layer]  # [batch head q_pos k_pos]
    print(f"model  {source} ({description})")
    print(f"text   {args.text!r} ({tokens.shape[1]} tokens)")
    print()
    print(text_heatmap(pattern, str_tokens, head=head, max_tokens=args.max_tokens, color=args.color,
                       title=f"layer {layer} head {head}"))
    print()
    print(top_k_table(pattern, query, str_tokens, head=head, k=args.top_k))
    if args.png:
        heads = None if args.all_heads else head
        figure = plot_attention(pattern, str_tokens, heads=heads, layer=layer, path=args.png,
                                title=f"{Path(source).name}: {args.text[:60]!r}")
        import matplotlib.pyplot as plt

        plt.close(figure)
        print(f"wrote {args.png}")
    if args.html:
        attention_viewer(cache, str_tokens, title=f"{Path(source).name}: {args.text[:80]!r}", layer=layer,
                         head=head).save(args.html)
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
