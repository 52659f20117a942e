"""Which files of an offload folder hooked_attn owns, and writing one model into a folder so that it never
holds a silent mix of two models' weights.

A folder holds at most one model: its manifest (``hooked_attn_offload.json``) lists every file of it,
and every weight file carries the manifest's ``write_id`` in its safetensors metadata. Writing a model
into a folder:

1. refuses, before anything is written, a path that is a file or cannot be written, a manifest it cannot
   read, and a file it would overwrite that no manifest of hooked_attn lists (a file of someone else);
2. replaces the manifest with a *pending* one that lists the files of the previous model and of the new
   one, so that whatever an interrupted write leaves behind is known to be ours and is refused by loads
   (``complete: false``);
3. writes the units, each file tagged with the new ``write_id``;
4. removes the files of the previous model that the new one does not have (only files a manifest listed),
   then writes the final manifest.

Loading (``read_complete``, ``check_file``) refuses a pending manifest, an older format, and any file whose
``write_id`` is not the manifest's: a file of another write, left by a crash or copied in by hand.
"""

import json
import os
import shutil
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

MANIFEST = "hooked_attn_offload.json"
TOKENIZER = "tokenizer"
FORMAT = 2  # 1 (no "format" field): before write ids; such folders are read for cleaning, never loaded
WRITE_ID = "hooked_attn_write_id"  # the safetensors metadata key holding the manifest's write_id


class OffloadFolderError(ValueError):
    """An offload folder cannot be written, or does not hold exactly one model as its manifest says."""


def unit_file(unit: str) -> str:
    return f"{unit}.safetensors"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest (None when there is none), of any format, complete or pending."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OffloadFolderError(f"{str(path)!r} cannot be read ({err}); delete it or use another folder") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights", manifest.get("files")), (dict, list)):
        raise OffloadFolderError(f"{str(path)!r} is not a manifest of hooked_attn; delete it or use another folder")
    return manifest


def owned_files(manifest: Mapping[str, Any] | None, folder: Path) -> set[str]:
    """The names (relative to the folder) of the files and folders a manifest says hooked_attn wrote."""
    if manifest is None:
        return set()
    if manifest.get("complete") is False:  # pending: it lists everything an interrupted write may have left
        return set(manifest["files"])
    files = {info["file"] for info in manifest["weights"].values()}
    if manifest.get("tokenizer") or ("format" not in manifest and (folder / TOKENIZER).is_dir()):
        files.add(TOKENIZER)  # format 1 wrote the tokenizer there whenever the model had one
    return files


def read_complete(folder: str | Path) -> dict[str, Any]:
    """The manifest of a completely written folder of the current format.

    Raises:
        OffloadFolderError: no manifest, an interrupted write, an older format.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise OffloadFolderError(f"{str(folder)!r} holds no offloaded model ({MANIFEST} is missing): write it with "
                                 "save_offloaded or from_pretrained(..., offload_folder=)")
    if manifest.get("complete") is False:
        raise OffloadFolderError(f"{str(folder)!r}: writing a model there was interrupted, so it may hold parts of "
                                 "two models; write the model there again")
    if manifest.get("format") != FORMAT:
        raise OffloadFolderError(f"{str(folder)!r} was written by an older hooked_attn (format "
                                 f"{manifest.get('format', 1)}, now {FORMAT}) that did not tag its files; write "
                                 "the model there again")
    return manifest


def check_file(folder: Path, file: str, write_id: str, names: Collection[str]) -> None:
    """Refuse ``folder/file`` unless it was written with ``write_id`` and holds the tensors ``names``."""
    from safetensors import safe_open

    path = folder / file
    try:
        with safe_open(path, framework="pt") as f:
            found, keys = (f.metadata() or {}).get(WRITE_ID), set(f.keys())
    except Exception as err:  # a missing, truncated or foreign file: safetensors' own error types vary
        raise OffloadFolderError(f"{str(path)!r} cannot be read as the manifest says ({err}); write the model "
                                 "there again") from err
    if found != write_id:
        raise OffloadFolderError(f"{str(path)!r} was not written with the folder's manifest (write id {found!r}, "
                                 f"manifest {write_id!r}): the folder mixes two models' files; write the model "
                                 "there again")
    missing = sorted(set(names) - keys)
    if missing:
        raise OffloadFolderError(f"{str(path)!r} lacks {missing[:3]}, which the manifest places there")


class FolderWriter:
    """Writes one model's units, then its manifest, into a folder (steps 1-4 of the module docstring).

    Everything that can refuse the folder is checked on construction, before anything is written.
    """

    def __init__(self, folder: str | Path, units: Collection[str], tokenizer: bool) -> None:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise OffloadFolderError(f"offload_folder {str(folder)!r} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".{MANIFEST}.{uuid.uuid4().hex}.probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise OffloadFolderError(f"offload_folder {str(folder)!r} cannot be written: {err}") from err
        previous = read_manifest(folder)
        self._owned = owned_files(previous, folder)
        self._new = {unit_file(unit) for unit in units} | ({TOKENIZER} if tokenizer else set())
        foreign = sorted(name for name in self._new if (folder / name).exists() and name not in self._owned)
        if foreign:
            raise OffloadFolderError(f"offload_folder {str(folder)!r} holds {foreign[:4]}, which hooked_attn did not "
                                     "write (no manifest of it lists them) and would overwrite; use another folder")
        self.folder, self.write_id, self._pending = folder, uuid.uuid4().hex, False

    def save(self, unit: str, tensors: Mapping[str, Tensor]) -> str:
        """Write ``tensors`` as ``unit``'s file, tagged with this write's id; return the file's name."""
        from safetensors.torch import save_file

        file = unit_file(unit)
        if file not in self._new:
            raise ValueError(f"unit {unit!r} was not announced to the writer of {str(self.folder)!r}")
        if not self._pending:  # from here until finish(), loads refuse the folder
            self._write_manifest({"format": FORMAT, "complete": False, "files": sorted(self._owned | self._new)})
            self._pending = True
        save_file(dict(tensors), self.folder / file, metadata={WRITE_ID: self.write_id})
        return file

    def finish(self, manifest: Mapping[str, Any], tokenizer: Any) -> None:
        """Write the tokenizer (if any), remove the previous model's files the new one lacks, and write the
        final manifest: ``manifest`` (config, weights) with the format, write id and tokenizer added."""
        if not self._pending:
            self._write_manifest({"format": FORMAT, "complete": False, "files": sorted(self._owned | self._new)})
            self._pending = True
        if TOKENIZER in self._owned:  # the previous model's: its files may differ from the new one's
            shutil.rmtree(self.folder / TOKENIZER, ignore_errors=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder / TOKENIZER)
        for name in sorted(self._owned - self._new - {TOKENIZER}):
            (self.folder / name).unlink(missing_ok=True)
        self._write_manifest({"format": FORMAT, "complete": True, "write_id": self.write_id,
                              "tokenizer": TOKENIZER if tokenizer is not None else None, **manifest})

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Replace the manifest in one step (a crash leaves the old one or the new one, never half of one)."""
        path = self.folder / MANIFEST
        partial = path.with_name(f".{MANIFEST}.partial")
        partial.write_text(json.dumps(manifest, indent=1))
        os.replace(partial, path)
