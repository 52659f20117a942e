"""SAE: a sparse autoencoder or transcoder with a HookPoint at every stage, loaded from and saved to
SAELens-format folders (``cfg.json`` + ``sae_weights.safetensors``, optional ``sparsity.safetensors``)."""

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
import einops
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hooked_attn.hook_points import HookedRootModule, HookPoint
from hooked_attn.saes.config import SAEConfig, SAEConfigError, dtype_to_str

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
_LAYER_NORM_EPS = 1e-5  # SAELens' layer_norm input normalization
# encode()'s features carry the normalization statistics of their input under this attribute, so
# decode() de-normalizes them with their own input's statistics, whatever was encoded since.
NORM_STATS_ATTR = "hooked_attn_sae_norm_stats"
NormStats = tuple[Tensor, Tensor]  # layer_norm: (mean, std); constant_norm_rescale: (scale, scale)


def weight_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes a config implies (SAELens' state-dict names)."""
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_output), "b_dec": (cfg.d_output,),
    }
    if cfg.architecture == "gated":
        shapes |= {"b_gate": (cfg.d_sae,), "b_mag": (cfg.d_sae,), "r_mag": (cfg.d_sae,)}
    else:
        shapes["b_enc"] = (cfg.d_sae,)
    if cfg.architecture in ("jumprelu", "jumprelu_transcoder"):
        shapes["threshold"] = (cfg.d_sae,)
    if cfg.architecture == "skip_transcoder":
        shapes["W_skip"] = (cfg.d_output, cfg.d_in)
    return shapes


class SAE(HookedRootModule):
    """A sparse autoencoder (or transcoder) as SAELens defines it, with these hook points:

    ``hook_sae_input`` (``... d_in``, before normalization and the ``b_dec`` shift),
    ``hook_sae_acts_pre`` / ``hook_sae_acts_post`` (``... d_sae``, features before / after the
    activation function), ``hook_sae_recons`` (``... d_out``, before de-normalization),
    ``hook_sae_error`` and ``hook_sae_output`` (the activation's own shape).
    """

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        dtype, device = cfg.torch_dtype, torch.device(cfg.device)
        for name, shape in weight_shapes(cfg).items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
        if cfg.device != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.W_dec)
                self.W_enc.copy_(self.W_dec.T if not cfg.is_transcoder else torch.randn_like(self.W_enc) / cfg.d_in**0.5)
        self.log_feature_sparsity: Tensor | None = None
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self._d_head: int | None = None
        self.setup()

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ---- the computation, in forward order ----
    @property
    def normalizes(self) -> bool:
        """Whether decode() needs its input's normalization statistics to de-normalize."""
        return not self.cfg.is_transcoder and self.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale")

    def _input(self, x: Tensor) -> tuple[Tensor, NormStats | None]:
        """Cast, flatten heads (hook_z SAEs), hook, normalize and subtract b_dec; with the statistics."""
        stats: NormStats | None = None
        x = x.to(self.dtype)
        if self.cfg.reshape_activations == "hook_z":
            self._d_head = x.shape[-1]
            x = einops.rearrange(x, "... head d_head -> ... (head d_head)")
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE for {self.cfg.hook_name!r} expects inputs with d_in={self.cfg.d_in} "
                             f"on the last axis, got shape {tuple(x.shape)}")
        x = self.hook_sae_input(x)
        match self.cfg.normalize_activations:
            case "layer_norm":
                mean = x.mean(-1, keepdim=True)
                std = (x - mean).std(-1, keepdim=True)
                stats = (mean, std)
                x = (x - mean) / (std + _LAYER_NORM_EPS)
            case "constant_norm_rescale":
                scale = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
                stats = (scale, scale)
                x = x * scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, stats

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[... d_sae]`` of an activation ``[... d_in]`` (``[... head d_head]``
        for a hook_z SAE). On a normalizing SAE they carry their input's normalization statistics
        (kept through in-place edits), which ``decode`` uses."""
        acts, stats = self._encode(x)
        if stats is not None:
            setattr(acts, NORM_STATS_ATTR, stats)
        return acts

    def norm_stats(self, x: Tensor) -> NormStats | None:
        """The normalization statistics of an input, for ``decode(acts, norm_stats=...)`` of features
        computed from it but no longer the tensor ``encode`` returned (sliced, scaled, built by hand).
        None on an SAE that does not normalize."""
        with torch.no_grad(), self.hooks_off():
            return self._input(x)[1]

    def _encode(self, x: Tensor) -> tuple[Tensor, NormStats | None]:
        x, stats = self._input(x)
        match self.cfg.architecture:
            case "gated":
                gate = (x @ self.W_enc + self.b_gate) > 0
                magnitude = self.hook_sae_acts_pre(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
                return self.hook_sae_acts_post(gate.to(magnitude.dtype) * magnitude.relu()), stats
            case "jumprelu" | "jumprelu_transcoder":
                pre = self.hook_sae_acts_pre(x @ self.W_enc + self.b_enc)
                return self.hook_sae_acts_post(pre.relu() * (pre > self.threshold).to(pre.dtype)), stats
            case "topk":
                pre = self.hook_sae_acts_pre(x @ self.W_enc + self.b_enc)
                if self.cfg.rescale_acts_by_decoder_norm:
                    pre = pre * self.W_dec.norm(dim=-1)
                return self.hook_sae_acts_post(topk_relu(pre, self.cfg.k)), stats  # type: ignore[arg-type]
            case _:
                pre = self.hook_sae_acts_pre(x @ self.W_enc + self.b_enc)
                return self.hook_sae_acts_post(pre.relu()), stats

    def decode(self, acts: Tensor, norm_stats: NormStats | None = None) -> Tensor:
        """The reconstruction ``[... d_out]`` of feature activations ``[... d_sae]``.

        A normalizing SAE (``layer_norm``, ``constant_norm_rescale``) de-normalizes with the
        statistics of the input the features came from: those ``encode`` attached to its output, or
        ``norm_stats`` (from ``norm_stats(x)``) for features that are not that tensor. Without
        either it raises rather than guess (it used the latest ``encode``'s, silently, when shapes
        matched).
        """
        if self.normalizes:
            norm_stats = self._resolve_norm_stats(acts, norm_stats)
        return self._decode(acts, norm_stats)

    def _resolve_norm_stats(self, acts: Tensor, norm_stats: NormStats | None) -> NormStats:
        stats = getattr(acts, NORM_STATS_ATTR, None) if norm_stats is None else norm_stats
        if stats is None:
            raise ValueError(
                f"this SAE normalizes its input ({self.cfg.normalize_activations}), so decode() needs the "
                "statistics of the input these features came from: decode the tensor encode() returned "
                "(in-place edits keep them), or pass norm_stats=sae.norm_stats(x) for the input x")
        if (not isinstance(stats, tuple) or len(stats) != 2 or not all(isinstance(t, Tensor) for t in stats)
                or tuple(stats[0].shape) != (*acts.shape[:-1], 1)):
            got = tuple(stats[0].shape) if isinstance(stats, tuple) and stats and isinstance(stats[0], Tensor) \
                else type(stats).__name__
            raise ValueError(f"norm_stats must be the pair sae.norm_stats(x) returns for the input of these "
                             f"features, shape {(*acts.shape[:-1], 1)}; got {got}")
        return stats

    def _decode(self, acts: Tensor, norm_stats: NormStats | None) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        out = self.hook_sae_recons(acts @ self.W_dec + self.b_dec)
        if self.normalizes:  # a transcoder's output lives elsewhere: no de-normalization
            match self.cfg.normalize_activations:
                case "layer_norm":
                    mean, std = norm_stats  # type: ignore[misc]
                    out = out * std + mean
                case "constant_norm_rescale":
                    out = out / norm_stats[0]  # type: ignore[index]
        if self.cfg.reshape_activations == "hook_z":
            out = einops.rearrange(out, "... (head d_head) -> ... head d_head", d_head=self._d_head)
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)), plus the skip connection of a skip transcoder."""
        out = self._decode(*self._encode(x))
        if self.cfg.architecture == "skip_transcoder":
            out = out + x.to(self.dtype) @ self.W_skip.T
        return out

    def forward(self, x: Tensor, use_error_term: bool | None = None, target: Tensor | None = None) -> Tensor:
        """The reconstruction; with the error term, exactly the activation it replaces (features still computed).

        The error is ``target - reconstruction`` (``target`` defaults to ``x``; a transcoder's is its
        output hook's activation) of a run with this SAE's hooks off, under no_grad, so hooks that
        edit features change the output by exactly their edit, and gradients reach the features.
        """
        error_term = self.use_error_term if use_error_term is None else use_error_term
        out = self.reconstruct(x)
        if error_term:
            clean = out if not self._hooked() else self.clean_reconstruction(x)
            target = x if target is None else target
            # In the wider of the two dtypes: a float16 SAE on a float32 model would otherwise round the
            # activation it promises to give back unchanged (by ~1e-3).
            wide = torch.promote_types(target.dtype, self.dtype)
            out = out.to(wide) + self.hook_sae_error((target.to(wide) - clean.to(wide)).detach())
        return self.hook_sae_output(out)

    def _hooked(self) -> bool:
        return any(point.has_hooks for point in self.hook_dict.values())

    @contextlib.contextmanager
    def hooks_off(self) -> Iterator[None]:
        """Run this SAE's hook points as plain identities inside the block (their hooks stay attached)."""
        points = list(self.hook_dict.values())
        before = [point.has_hooks for point in points]
        try:
            for point in points:
                point.has_hooks = False
            yield
        finally:
            for point, was in zip(points, before):
                point.has_hooks = was

    @torch.no_grad()
    def clean_reconstruction(self, x: Tensor) -> Tensor:
        """The reconstruction with every hook of this SAE off."""
        with self.hooks_off():
            return self.reconstruct(x)

    # ---- SAELens-format folders ----
    @classmethod
    def load_from_disk(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> "SAE":
        """Load a SAELens-format folder; refuses cfg fields it does not implement and weights that do
        not match the config (missing, extra or mis-shaped), naming them."""
        path = Path(path)
        raw = json.loads((path / CFG_FILENAME).read_text())
        raw["device"] = device
        if dtype is not None:
            raw["dtype"] = dtype
        cfg = SAEConfig.from_dict(raw)
        weights = load_file(path / WEIGHTS_FILENAME, device=device)
        expected = weight_shapes(cfg)
        problems = [f"missing {k} {shape}" for k, shape in expected.items() if k not in weights]
        problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in weights.items() if k not in expected]
        problems += [f"{k} has shape {tuple(v.shape)}, expected {expected[k]}" for k, v in weights.items()
                     if k in expected and tuple(v.shape) != expected[k]]
        if problems:
            raise SAEConfigError(f"{path / WEIGHTS_FILENAME} does not fit its {cfg.architecture} cfg.json: "
                                 + "; ".join(problems))
        sae = cls(dataclasses.replace(cfg, device="meta"))
        sae.load_state_dict({k: v.to(cfg.torch_dtype) for k, v in weights.items()}, assign=True)
        sae.cfg = cfg
        if (path / SPARSITY_FILENAME).exists():
            sae.log_feature_sparsity = load_file(path / SPARSITY_FILENAME, device=device)["sparsity"]
        return sae

    def save_model(self, path: str | Path, log_feature_sparsity: Tensor | None = None) -> tuple[Path, Path]:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (and ``sparsity.safetensors`` when a log
        feature sparsity is given or stored); returns the weights and config paths."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights_path, cfg_path = path / WEIGHTS_FILENAME, path / CFG_FILENAME
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, weights_path)
        cfg = self.cfg.to_dict() | {"dtype": dtype_to_str(self.dtype), "device": str(self.device)}
        cfg_path.write_text(json.dumps(cfg, indent=2))
        sparsity = log_feature_sparsity if log_feature_sparsity is not None else self.log_feature_sparsity
        if sparsity is not None:
            save_file({"sparsity": sparsity.detach().contiguous()}, path / SPARSITY_FILENAME)
        return weights_path, cfg_path

    def __repr__(self) -> str:
        c = self.cfg
        where = c.hook_name if c.hook_name_out is None else f"{c.hook_name} -> {c.hook_name_out}"
        return f"SAE({c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, at {where!r})"


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations of each row (ReLU applied to them), zero the rest."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())

