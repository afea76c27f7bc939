"""Atomic, verifiable training checkpoints (safetensors + JSON only; nothing is unpickled).

Layout of ``OUT/checkpoints/step-00000040/``::

    params.safetensors      trainable parameters (all weights, or only the LoRA adapters)
    optimizer.safetensors   optimizer tensors, keys ``state.<param index>.<name>``
    optimizer.json          optimizer hyper-parameters and non-tensor state
    trainer_state.json      step, data fingerprint, configuration, metrics so far
    MANIFEST.json           sha256 and size of every file above; written last

A checkpoint is written into a hidden ``.step-….partial`` folder and renamed into place in one step, so a
``kill -9`` leaves either the previous complete checkpoint or the new one, never half of one. Loading
verifies every file against the manifest; a missing manifest, a missing file, a size or sha256 mismatch
raises :class:`CheckpointError` with the path and what to do.

The data order and the per-step seeds are pure functions of (seed, step) (see ``schedule.step_seed``), so
the step number is the whole data-order and RNG state.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from radit_fast._util import sha256_file
from radit_fast.io import RaditError, atomic_dir, write_json
from radit_fast.retrieval.manifest import check_file_records

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
REQUIRED_FILES = ("params.safetensors", "trainer_state.json")
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RaditError):
    """A checkpoint that is incomplete, corrupt or does not belong to this run."""


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint folders under ``root``, oldest first (partial folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
        elif p.name.endswith(".partial"):
            log.warning("ignoring partial checkpoint %s (interrupted write)", p)
    return sorted(found)


# ------------------------------------------------------------------------------------ optimizer state
def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state_dict["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int | str, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name[len("state."):].rsplit(".", 1)
        state.setdefault(_key(idx), {})[key] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(_key(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _key(idx: str) -> int | str:
    """Parameter keys are indices (plain optimizers) or names (FSDP full optimizer state dicts)."""
    return int(idx) if idx.isdigit() else idx


# ------------------------------------------------------------------------------------------ save/load
@dataclass
class Checkpoint:
    step: int
    path: Path
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    trainer_state: dict[str, Any]


def save_checkpoint(root: str | os.PathLike, step: int, *, params: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None, trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically under ``root`` and delete all but the ``keep`` newest."""
    final = checkpoint_dir(root, step)
    with atomic_dir(final, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in params.items()},
                  str(tmp / "params.safetensors"), metadata={"format": "pt"})
        names = ["params.safetensors"]
        if optimizer_state is not None:
            tensors, meta = optimizer_to_flat(optimizer_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
            write_json(tmp / "optimizer.json", meta)
            names += ["optimizer.safetensors", "optimizer.json"]
        write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "format": FORMAT_VERSION})
        names.append("trainer_state.json")
        files = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
        for n in names:  # data on disk before the manifest that vouches for it
            _fsync(tmp / n)
        write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
    _fsync_dir(Path(root))
    for old_step, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if old_step != step:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s written", final)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint folder after checking every file; CheckpointError otherwise.

    The manifest is validated by the same code as an index manifest
    (:func:`radit_fast.retrieval.manifest.check_file_records`): ``files`` must be an object of plain file
    names (nothing outside the folder is read) with integer ``bytes`` and a sha256, listing at least the
    parameters and the trainer state.
    """
    path = Path(path)
    hint = f"delete {path} to resume from an earlier checkpoint, or restart without --resume"
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing ({hint})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({hint})") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} has no files entry ({hint})")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} field step must be a non-negative "
                              f"integer, got {step!r} ({hint})")
    files = manifest["files"]
    try:
        check_file_records(files, mpath, required=REQUIRED_FILES)
        if "optimizer.safetensors" in files:
            check_file_records(files, mpath, required=("optimizer.json",))
    except RaditError as e:
        raise CheckpointError(f"checkpoint {e} ({hint})") from None
    for name, meta in files.items():  # names are plain file names of this folder (checked above)
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing ({hint})")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size} bytes, the manifest "
                                  f"says {meta['bytes']} ({hint})")
        digest = sha256_file(f)
        if digest != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} sha256 {digest[:12]}... does not "
                                  f"match the manifest {meta['sha256'][:12]}... ({hint})")
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; anything else (a pickle, a truncated file) is one CheckpointError, never unpickled."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for foreign formats
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a safetensors file ({first}); radit-fast never loads pickled "
                              "weights") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify and load a checkpoint folder (tensors on CPU)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    params = _load_tensors(path / "params.safetensors")
    optimizer = None
    if "optimizer.safetensors" in manifest["files"]:
        meta = _load_json(path / "optimizer.json")
        try:
            optimizer = optimizer_from_flat(_load_tensors(path / "optimizer.safetensors"), meta)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path / 'optimizer.json'}: not an optimizer state written by radit-fast "
                                  f"({type(e).__name__}: {e})") from None
    state = _load_json(path / "trainer_state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'trainer_state.json'}: expected a JSON object")
    return Checkpoint(step=int(manifest["step"]), path=path, params=params, optimizer=optimizer,
                      trainer_state=state)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder under ``root`` (not verified), or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
