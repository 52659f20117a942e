"""Where does SmolLM2-135M look up "Paris"? A worked example on the real weights (docs/tutorial.md).

    python scripts/tutorial_factual_recall.py [--out tutorial_out]

Clean prompt "The capital of France is" (answer " Paris"), corrupted "The capital of Italy is"
(" Rome"); the metric is the logit difference Paris - Rome at the last position. The script runs a
logit lens, direct logit attribution per layer and per head, activation patching of the residual
stream, attention and MLP outputs and every head, and attribution patching of the same sites;
it prints what it finds, writes findings.json and, with matplotlib, heatmaps.
"""

import argparse
import json
from pathlib import Path

import torch

from hooked_attn import HookedTransformer
from hooked_attn import patching as P
from hooked_attn.default_model import prepare_smollm2

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"
ANSWER, WRONG = " Paris", " Rome"


def run(out: Path, model: HookedTransformer | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = model or HookedTransformer.from_pretrained(prepare_smollm2())
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    answer, wrong = model.to_single_token(ANSWER), model.to_single_token(WRONG)

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    clean_diff, corrupted_diff = logit_diff(clean_logits).item(), logit_diff(corrupted_logits).item()

    def normalised(values: torch.Tensor) -> torch.Tensor:
        """0 = the corrupted run, 1 = the clean run."""
        return (values - corrupted_diff) / (clean_diff - corrupted_diff)

    # 1. Logit lens: the Paris - Rome difference if the model stopped after each block.
    lens = cache.logit_lens(pos_slice=-1)[:, 0]
    lens_diff = (lens[:, answer] - lens[:, wrong]).tolist()
    first_paris = next((i for i, row in enumerate(lens) if row.argmax().item() == answer), None)

    # 2. Direct logit attribution (exact on this processed model): who writes Paris - Rome.
    components, labels = cache.decompose_resid(apply_ln=True, pos_slice=-1, return_labels=True)
    dla = cache.logit_attrs(components, answer, incorrect_tokens=wrong)[:, 0]
    heads, head_labels = cache.stack_head_results(apply_ln=True, pos_slice=-1, return_labels=True)
    head_dla = cache.logit_attrs(heads, answer, incorrect_tokens=wrong)[:, 0]
    top_heads = [(head_labels[i], round(head_dla[i].item(), 3)) for i in head_dla.abs().argsort(descending=True)[:5]]
    top_components = [(labels[i], round(dla[i].item(), 3)) for i in dla.abs().argsort(descending=True)[:5]]

    # 3. Activation patching (batched sweeps), normalised.
    resid = normalised(P.get_act_patch_resid_pre(model, corrupted, cache, logit_diff, progress=False))
    attn = normalised(P.get_act_patch_attn_out(model, corrupted, cache, logit_diff, progress=False))
    mlp = normalised(P.get_act_patch_mlp_out(model, corrupted, cache, logit_diff, progress=False))
    heads_patch = normalised(P.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, logit_diff,
                                                                   progress=False))
    country = 3  # " France" / " Italy"
    last_country_layer = max(i for i in range(model.cfg.n_layers) if resid[i, country] > 0.5)

    # 4. Attribution patching: the same sites from one forward and one backward.
    attr = P.attribution_patch(model, clean, corrupted, logit_diff, sites=("resid_pre", "attn_out", "mlp_out"))
    agreement = {}
    for site, real in (("resid_pre", resid), ("attn_out", attn), ("mlp_out", mlp)):
        est = attr[site] / (clean_diff - corrupted_diff)
        agreement[site] = torch.corrcoef(torch.stack([est.flatten(), real.flatten().float()]))[0, 1].item()

    findings = {
        "clean_logit_diff": clean_diff, "corrupted_logit_diff": corrupted_diff,
        "logit_lens_diff": lens_diff, "logit_lens_first_layer_with_paris_on_top": first_paris,
        "dla_sum": dla.sum().item(), "dla_top_components": top_components, "dla_top_heads": top_heads,
        "resid_pre_patching": resid.tolist(), "attn_out_patching": attn.tolist(), "mlp_out_patching": mlp.tolist(),
        "head_patching_top": [(f"L{i // model.cfg.n_heads}H{i % model.cfg.n_heads}",
                               round(heads_patch.flatten()[i].item(), 3))
                              for i in heads_patch.flatten().abs().topk(5).indices.tolist()],
        "last_layer_where_the_country_position_carries_the_answer": last_country_layer,
        "attribution_vs_activation_patching_correlation": agreement,
    }
    (out / "findings.json").write_text(json.dumps(findings, indent=1))
    _plot(out, model, resid, attn, mlp, heads_patch)
    return findings


def _plot(out: Path, model: HookedTransformer, *maps: torch.Tensor) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plots are optional: pip install "hooked_attn[plots]"
        return
    tokens = model.to_str_tokens(CORRUPTED)
    titles = ["resid_pre", "attn_out", "mlp_out"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 6), constrained_layout=True)
    for ax, values, title in zip(axes, maps, [*titles, "head output (all positions)"]):
        image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax.set_title(f"patching {title}")
        ax.set_ylabel("layer")
        if title in titles:
            ax.set_xticks(range(len(tokens)), [repr(t) for t in tokens], rotation=45)
        else:
            ax.set_xlabel("head")
    fig.colorbar(image, ax=axes, label="fraction of the clean Paris - Rome logit difference restored")
    fig.savefig(out / "activation_patching.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tutorial_out"))
    findings = run(parser.parse_args().out)
    print(f"logit diff Paris - Rome: clean {findings['clean_logit_diff']:.2f}, "
          f"corrupted {findings['corrupted_logit_diff']:.2f}")
    first = findings["logit_lens_first_layer_with_paris_on_top"]
    where = "the embeddings" if first == 0 else f"the output of block {first - 1}"
    print(f"logit lens: Paris is the top token from {where} on")
    print(f"direct logit attribution sums to {findings['dla_sum']:.2f}; top components "
          f"{findings['dla_top_components']}; top heads {findings['dla_top_heads']}")
    print(f"the country position carries the answer in the residual stream up to layer "
          f"{findings['last_layer_where_the_country_position_carries_the_answer']}")
    print(f"heads whose output matters most when patched: {findings['head_patching_top']}")
    print(f"attribution vs activation patching correlation: {findings['attribution_vs_activation_patching_correlation']}")


if __name__ == "__main__":
    main()
