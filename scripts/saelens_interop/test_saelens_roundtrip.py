"""SAELens interop, checked against the real package (run in a side venv by scripts/ci_extra/60_saelens.sh).

An SAE that SAELens saves loads in hooked_attn with the same feature activations and reconstruction
as SAELens' own ``encode``/``decode``; an SAE hooked_attn saves (random or trained here) loads in SAELens
with the same features.
"""

import sys
from pathlib import Path

import pytest
import sae_lens
import torch
from sae_lens import SAE as LensSAE
from sae_lens.saes.sae import SAEMetadata

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hooked_attn import SAE, SAEConfig  # noqa: E402

D_IN, D_SAE, D_OUT = 24, 64, 20
TOL = dict(atol=1e-5, rtol=1e-5)  # both sides compute the same fp32 matmuls


def lens_cfg(cls_name: str, **kwargs):
    return getattr(sae_lens, cls_name)(**kwargs)


def randomize(sae: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = 0.05 if name in ("r_mag",) else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if name == "threshold":
                p.abs_()


CASES = {
    "standard": ("StandardSAE", "StandardSAEConfig", {}),
    "standard_no_b_dec_in": ("StandardSAE", "StandardSAEConfig", {"apply_b_dec_to_input": False}),
    "standard_layer_norm": ("StandardSAE", "StandardSAEConfig", {"normalize_activations": "layer_norm"}),
    "standard_constant_norm": ("StandardSAE", "StandardSAEConfig", {"normalize_activations": "constant_norm_rescale"}),
    "gated": ("GatedSAE", "GatedSAEConfig", {}),
    "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {}),
    "topk": ("TopKSAE", "TopKSAEConfig", {"k": 5}),
    "topk_rescaled": ("TopKSAE", "TopKSAEConfig", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "transcoder": ("Transcoder", "TranscoderConfig", {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    "skip_transcoder": ("SkipTranscoder", "SkipTranscoderConfig", {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    "jumprelu_transcoder": ("JumpReLUTranscoder", "JumpReLUTranscoderConfig", {"d_out": D_OUT, "apply_b_dec_to_input": False}),
}


def make_lens_sae(case: str):
    sae_cls, cfg_cls, extra = CASES[case]
    meta = SAEMetadata(hook_name="blocks.0.hook_resid_pre", model_name="tiny")
    if "transcoder" in case:
        meta = SAEMetadata(hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out", model_name="tiny")
    cfg = lens_cfg(cfg_cls, d_in=D_IN, d_sae=D_SAE, metadata=meta, **extra)
    sae = getattr(sae_lens, sae_cls)(cfg)
    randomize(sae)
    return sae.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_saved_sae_loads_with_equal_features(case: str, tmp_path: Path) -> None:
    lens = make_lens_sae(case)
    lens.save_model(tmp_path)
    ours = SAE.load_from_disk(tmp_path)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lens_acts = lens.encode(x)
        ours_acts = ours.encode(x)
        torch.testing.assert_close(ours_acts, lens_acts, **TOL)
        assert (ours_acts > 0).any(), "a case where no feature fires proves nothing"
        torch.testing.assert_close(ours.reconstruct(x), lens(x), **TOL)


def test_saelens_hook_z_sae_loads_with_equal_features(tmp_path: Path) -> None:
    n_heads, d_head = 4, 6
    meta = SAEMetadata(hook_name="blocks.0.attn.hook_z", model_name="tiny")
    lens = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=n_heads * d_head, d_sae=D_SAE, metadata=meta,
                                                         reshape_activations="hook_z"))
    randomize(lens)
    lens.save_model(tmp_path)
    ours = SAE.load_from_disk(tmp_path)
    z = torch.randn(2, 5, n_heads, d_head, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(z), lens.encode(z), **TOL)
        torch.testing.assert_close(ours.reconstruct(z), lens(z), **TOL)


def test_saelens_batchtopk_training_sae_saved_for_inference_loads(tmp_path: Path) -> None:
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4,
                                              metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre"))
    lens = sae_lens.BatchTopKTrainingSAE(cfg)
    randomize(lens)
    lens.topk_threshold = torch.tensor(0.2, dtype=torch.double)
    lens.save_inference_model(tmp_path)
    ours = SAE.load_from_disk(tmp_path)
    assert ours.cfg.architecture == "jumprelu"
    back = LensSAE.load_from_disk(tmp_path)
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), back.encode(x), **TOL)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated", "transcoder"])
def test_hooked_attn_saved_sae_loads_in_saelens(arch: str, tmp_path: Path) -> None:
    extra: dict = {"k": 5} if arch == "topk" else {}
    if arch == "transcoder":
        extra = {"d_out": D_OUT, "apply_b_dec_to_input": False, "hook_name_out": "blocks.0.hook_mlp_out"}
    ours = SAE(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, hook_name="blocks.0.hook_resid_pre", **extra))
    randomize(ours, seed=4)
    ours.save_model(tmp_path)
    lens = LensSAE.load_from_disk(tmp_path)
    assert lens.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), ours.encode(x), **TOL)
        torch.testing.assert_close(lens(x), ours.reconstruct(x), **TOL)


def test_hooked_attn_trained_sae_loads_in_saelens(tmp_path: Path) -> None:
    from hooked_attn.saes.train import TrainConfig, train_sae

    gen = torch.Generator().manual_seed(6)
    basis = torch.randn(40, D_IN, generator=gen)
    codes = torch.rand(4096, 40, generator=gen) * (torch.rand(4096, 40, generator=gen) < 0.1)
    data = codes @ basis
    sae, history = train_sae(data.split(256), TrainConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=6,
                                                          lr=3e-3, n_steps=60, hook_name="blocks.0.hook_resid_pre"))
    assert history[-1]["explained_variance"] > history[0]["explained_variance"]
    sae.save_model(tmp_path)
    lens = LensSAE.load_from_disk(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(data[:64]), sae.encode(data[:64]), **TOL)
