"""The ``hooked-attn`` command: argument parsing and printing around ``hooked_attn.verify``.

Exit status: 0 on success, 1 when ``verify`` finds a difference above ``--atol`` (or ``hooks --filter``
matches nothing), 2 for a usage error or a model that cannot be loaded.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import transformers

from hooked_attn.verify import (
    DEFAULT_ATOL, DEFAULT_PROMPT, DTYPES, USER_ERRORS, HookTable, RunResult, VerifyReport, list_hooks,
    verify_model,
)

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
        return _hooks(args)
    except USER_ERRORS as err:
        if args.verbose:
            logging.getLogger(__name__).exception("%s failed", args.command)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hooked-attn", description="Check hooked_attn's conversion of a model and list its hook points.",
        epilog="exit status: 0 ok, 1 verify found a difference above --atol (or hooks --filter matched "
               "nothing), 2 usage error or a model that cannot be loaded",
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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
