"""SAELens 6.x running on hooked_attn: ``hooked_attn.install_as_transformer_lens()`` first, then SAELens'
``HookedSAETransformer`` splices an SAE into SmolLM2-135M, and its training runner with ``override_model=``
trains a small SAE on that model's activations.

Run in the side venv of scripts/ci_extra/60_saelens.sh (SAELens pins transformer-lens<4, so it cannot share
the main environment); the hub is never contacted:

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD OMP_NUM_THREADS=1 $VENV/bin/python \\
        scripts/saelens_interop/saelens_on_hooked_attn.py [--write-docs docs/transformerlens.md]

It prints the measured numbers as JSON; with ``--write-docs`` it rewrites the page's section
"SAELens on hooked_attn" (the page's other sections are scripts/tl_conformance.py's and stay as they are).
The tests beside it (test_saelens_on_hooked_attn.py) assert on the same functions.
"""

import hooked_attn

hooked_attn.install_as_transformer_lens()  # before anything imports sae_lens (it imports transformer_lens)

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens import (  # noqa: E402
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    StandardTrainingSAEConfig,
)
from sae_lens.evals import EvalConfig, run_evals  # noqa: E402
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402

from hooked_attn.default_model import resolve_default_model  # noqa: E402

SECTION = "## SAELens on hooked_attn"
HOOK = "blocks.3.hook_resid_post"  # a residual hook early enough that the store stops the model at layer 4
# Training text: the long descriptions (READMEs) of two packages pinned by exact version in the CI leg, so
# the same text, and the same numbers, on every run.
TEXT_SOURCES = ("torch", "sae-lens")


def load_model() -> HookedSAETransformer:
    """SAELens' HookedSAETransformer built by hooked_attn's loader from the local SmolLM2-135M folder."""
    return HookedSAETransformer.from_pretrained(str(resolve_default_model()))


def paragraphs() -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs of at least 200 characters; every tenth one is held out."""
    text = "\n\n".join(importlib.metadata.metadata(name).get_payload() for name in TEXT_SOURCES)
    found = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 200]
    return [p for i, p in enumerate(found) if i % 10], [p for i, p in enumerate(found) if not i % 10]


@dataclass
class Training:
    sae: Any                   # the SAELens TrainingSAE the runner returned
    initial_sae: Any           # a copy of it as SAELens initialised it, before the first step
    runner: LanguageModelSAETrainingRunner
    step_losses: list[float]   # SAELens' own training loss, one per optimiser step
    seconds: float


def train_sae(model: HookedSAETransformer, texts: list[str], output_path: Path | None = None,
              steps: int = 40, d_sae: int = 512, seed: int = 0) -> Training:
    """SAELens' LanguageModelSAETrainingRunner with ``override_model=model`` and an in-memory text dataset.

    The loss of every step is read from the SAE's own ``training_forward_pass`` (the runner logs it only
    to wandb, which is off here).
    """
    batch_tokens = 128
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=d_sae, l1_coefficient=1.0),
        model_name="SmolLM2-135M-Instruct", hook_name=HOOK, dataset_path="in-memory", is_dataset_tokenized=False,
        streaming=False, context_size=32, store_batch_size_prompts=8, n_batches_in_buffer=4,
        train_batch_size_tokens=batch_tokens, training_tokens=batch_tokens * steps, lr=1e-3, device="cpu",
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=None if output_path is None else str(output_path), seed=seed, verbose=False,
    )
    torch.manual_seed(seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=Dataset.from_dict({"text": texts}),
                                            override_model=model)
    losses: list[float] = []
    forward = runner.sae.training_forward_pass

    def recording(step_input: Any) -> Any:
        out = forward(step_input)
        losses.append(out.loss.item())
        return out

    initial = copy.deepcopy(runner.sae)
    runner.sae.training_forward_pass = recording
    start = time.perf_counter()
    sae = runner.run()
    return Training(sae=sae, initial_sae=initial, runner=runner, step_losses=losses,
                    seconds=time.perf_counter() - start)


def held_out_activations(model: HookedSAETransformer, texts: list[str], n_texts: int = 8,
                         n_pos: int = 32) -> torch.Tensor:
    """Our model's activations at HOOK on held-out text, ``[tokens d_model]``."""
    rows = [model.to_tokens(t, prepend_bos=False)[0, :n_pos] for t in texts[:n_texts]]
    tokens = torch.stack([r for r in rows if r.shape[0] == n_pos])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=int(HOOK.split(".")[1]) + 1)
    return cache[HOOK].flatten(0, 1)


def reconstruction_mse(sae: Any, acts: torch.Tensor) -> float:
    """Mean over tokens of the summed squared reconstruction error (SAELens' MSE loss term)."""
    with torch.no_grad():
        return (sae.decode(sae.encode(acts)) - acts).pow(2).sum(-1).mean().item()


def evaluate(sae: Any, training: Training, model: HookedSAETransformer) -> dict[str, Any]:
    """SAELens' run_evals on our model: CE loss with the SAE spliced in, KL, explained variance, L0."""
    metrics, _ = run_evals(
        sae=sae, activation_store=training.runner.activations_store, model=model, activation_scaler=ActivationScaler(),
        eval_config=EvalConfig(batch_size_prompts=4, n_eval_reconstruction_batches=2, compute_kl=True,
                               compute_ce_loss=True, n_eval_sparsity_variance_batches=2, compute_l2_norms=True,
                               compute_sparsity_metrics=True, compute_variance_metrics=True),
        exclude_special_tokens=False)
    return metrics


def measure() -> dict[str, Any]:
    """Everything the docs section reports, measured now."""
    start = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - start
    train_texts, held_out = paragraphs()
    acts = held_out_activations(model, held_out)
    training = train_sae(model, train_texts)
    metrics = evaluate(training.sae, training, model)
    losses = training.step_losses
    return {
        "versions": {name: importlib.metadata.version(name) for name in ("sae-lens", "torch", "transformers")},
        "hook": HOOK, "model_load_s": round(load_s, 1), "train_s": round(training.seconds, 1),
        "steps": len(losses), "loss_first5": sum(losses[:5]) / 5, "loss_last5": sum(losses[-5:]) / 5,
        "held_out_mse_untrained": reconstruction_mse(training.initial_sae, acts),
        "held_out_mse_trained": reconstruction_mse(training.sae, acts),
        "ce_loss_without_sae": metrics["model_performance_preservation"]["ce_loss_without_sae"],
        "ce_loss_with_sae": metrics["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_loss_with_ablation": metrics["model_performance_preservation"]["ce_loss_with_ablation"],
        "explained_variance": metrics["reconstruction_quality"]["explained_variance"],
        "l0": metrics["sparsity"]["l0"],
    }


EXAMPLE = """\
import hooked_attn
hooked_attn.install_as_transformer_lens()  # first: SAELens imports transformer_lens when it loads
from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from hooked_attn.default_model import resolve_default_model

model = HookedSAETransformer.from_pretrained(str(resolve_default_model()))  # SmolLM2-135M, a local folder
sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=256,
                                    metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post")))
tokens = model.to_tokens("Sparse autoencoders read the residual stream.", prepend_bos=False)
logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
features = cache["blocks.3.hook_resid_post.hook_sae_acts_post"]
assert features.shape == (1, tokens.shape[1], 256) and model.acts_to_saes == {}  # detached again after the run
"""


def section(n: dict[str, Any], command: str) -> str:
    """The page section "SAELens on hooked_attn", with the numbers ``measure()`` returned."""
    v = n["versions"]
    return f"""{SECTION}

SAELens {v["sae-lens"]} runs on hooked_attn when `hooked_attn.install_as_transformer_lens()` is called
before SAELens is imported: its `HookedSAETransformer` is then a subclass of hooked_attn's
`HookedTransformer`, and its `SAE` classes are hooked_attn `HookedRootModule`s. SAELens pins
`transformer-lens<4`, so it lives in an environment of its own (scripts/ci_extra/60_saelens.sh builds
one: `torch==2.13.0` first, then `sae-lens=={v["sae-lens"]}`); the real TransformerLens it installs there
is not imported. This block runs in that environment (scripts/saelens_interop/test_saelens_on_hooked_attn.py):

```python saelens
{EXAMPLE}```

What runs, each checked on SmolLM2-135M (fp32, `atol=rtol=1e-4`) by
`scripts/saelens_interop/test_saelens_on_hooked_attn.py`:

| SAELens API | on hooked_attn |
|---|---|
| `HookedSAETransformer.from_pretrained(folder)` | hooked_attn's loader, the model built through `HookedSAETransformer.__init__` (its `mlp.hook_in` points fire) |
| `run_with_cache_with_saes`, `run_with_saes`, `add_sae` / `reset_saes`, `saes()` | an SAE on `{n["hook"]}` (random, and one the runner trained): cached `hook_sae_acts_post` equal `sae.encode` of the clean residual, logits equal a manual splice with `run_with_hooks`; the hook point is back after the run |
| `use_error_term=True` | the logits of the model without the SAE |
| `exclude_special_tokens=True` | the SAE is bypassed at BOS |
| `attn.hook_z` SAEs (`reshape_activations="hook_z"`) and `Transcoder` (`ln2.hook_normalized` to `hook_mlp_out`) | features and logits as a manual splice |
| `run_with_saes` on `hook_attn_out`, `mlp.hook_post`, `hook_mlp_out`, `ln2.hook_scale` | logits as a manual splice (attention on its fused path; at sites the forward pass checks before calling them, such as `hook_scale` or `hook_pattern`, a module swapped in for the HookPoint counts as hooked) |
| `LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=...)` | trains on our model's activations (the store's activations equal our `run_with_cache`), saves an SAE that `SAE.load_from_disk` reads back |
| the same runner without `override_model=`, `model_name=folder` | SAELens loads our model itself (`HookedTransformer.from_pretrained_no_processing(model_name=..., center_writing_weights=False)`) and trains |
| `sae_lens.evals.run_evals` | CE loss and KL with the SAE spliced into our model |

Measured by `{command}` (a standard SAE, `d_sae=512`, {n["steps"]} steps of 128 tokens on `{n["hook"]}`, in-memory
text: the package descriptions of torch and sae-lens):

| quantity | value |
|---|---|
| training loss, mean of the first 5 steps | {n["loss_first5"]:.0f} |
| training loss, mean of the last 5 steps | {n["loss_last5"]:.0f} |
| held-out reconstruction MSE, before / after training | {n["held_out_mse_untrained"]:.0f} / {n["held_out_mse_trained"]:.0f} |
| CE loss: model / with the SAE / residual zero-ablated (`run_evals`) | {n["ce_loss_without_sae"]:.2f} / {n["ce_loss_with_sae"]:.2f} / {n["ce_loss_with_ablation"]:.2f} |
| explained variance, L0 (`run_evals`) | {n["explained_variance"]:.2f}, {n["l0"]:.0f} of 512 |

A few dozen steps show the loop works; they do not make a useful SAE (L0 stays high).

Not run here: anything that downloads (hub model names, `SAE.from_pretrained(release, sae_id)`,
wandb logging); `compile_llm` / `compile_sae`; `SAETransformerBridge` (it needs TransformerLens 4's `model_bridge`,
which this layer does not provide). SAELens' runner defaults to
`model_from_pretrained_kwargs={{"center_writing_weights": False}}`: to use an SAE trained that way, load
the model with `HookedSAETransformer.from_pretrained(folder, center_writing_weights=False)`.
"""


def write_section(page: Path, text: str) -> None:
    """Replace ``page``'s SECTION (from its heading to the next ``## `` heading) with ``text``, or append it."""
    lines = page.read_text().splitlines()
    new = text.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == SECTION]
    if not starts:
        out = [*lines, "", *new] if lines and lines[-1] else [*lines, *new]
    else:
        start = starts[0]
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        out = [*lines[:start], *new, *([""] if end < len(lines) else []), *lines[end:]]
    page.write_text("\n".join(out) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", type=Path, default=None, help="rewrite this page's SAELens section")
    args = parser.parse_args()
    numbers = measure()
    print(json.dumps(numbers, indent=1))
    if args.write_docs is not None:
        command = ("HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python scripts/saelens_interop/saelens_on_hooked_attn.py "
                   "--write-docs docs/transformerlens.md")
        write_section(args.write_docs, section(numbers, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
