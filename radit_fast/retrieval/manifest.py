"""``manifest.json`` of an index folder: what was built, with what, and the checksums that guard it.

The manifest records the encoders (name, fingerprint, pooling, normalisation, dim), the passage count,
the FAISS factory string, chunking, library versions, predicted memory and each file's size and sha256.
:func:`read_manifest` refuses a missing folder, a missing or corrupt manifest, a missing file, a file
whose size or checksum changed, with one-line :class:`RaditError` messages.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from radit_fast import __version__
from radit_fast._util import sha256_file
from radit_fast.io import RaditError, write_json
from radit_fast.retrieval.store import STORE_FILES

MANIFEST_FILE = "manifest.json"
FORMAT = "radit-index/1"
VERIFY_MODES = ("sha256", "size", "none")
#: Files every index folder has (index.faiss, embeddings.f16.npy and the passage store).
REQUIRED_FILES = ("index.faiss", "embeddings.f16.npy", *STORE_FILES)


def library_versions() -> dict[str, str]:
    import faiss
    import numpy
    import torch
    import transformers

    return {
        "radit_fast": __version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def file_records(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def write_manifest(folder: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Add format, versions and file checksums to ``manifest`` and write it into ``folder``."""
    manifest = {"format": FORMAT, **manifest, "versions": library_versions(), "files": file_records(folder, files)}
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, verify: str = "sha256") -> dict[str, Any]:
    """Load and check an index folder's manifest; ``verify`` = sha256 (default) | size | none."""
    folder = Path(folder)
    if verify not in VERIFY_MODES:
        raise RaditError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if not folder.is_dir():
        raise RaditError(f"{folder}: no such index folder")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise RaditError(f"{folder}: not an index folder (no {MANIFEST_FILE}; build one with `radit index build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RaditError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RaditError(f"{path}: unsupported index format {found!r} (expected {FORMAT!r})")
    check_fields(manifest, path)
    verify_files(folder, manifest["files"], verify, what="index file",
                 hint="rebuild the index")
    return manifest


def verify_files(folder: Path, files: dict[str, dict[str, Any]], verify: str = "sha256", *, what: str = "file",
                 hint: str = "") -> None:
    """Check each file of a folder against its manifest record {bytes, sha256} (records already validated
    by :func:`check_file_records`): present, same size, (``verify="sha256"``) same checksum. Shared by index
    folders and training checkpoints; one-line RaditError naming the file and ``hint``."""
    tail, more = (f" ({hint})", f"; {hint}") if hint else ("", "")
    for name, rec in files.items():
        f = folder / name
        if not f.is_file():
            raise RaditError(f"{folder}: {what} {name} is missing{tail}")
        if verify == "none":
            continue
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise RaditError(f"{f}: size {size} != {rec['bytes']} in the manifest (corrupt or modified{more})")
        if verify == "sha256" and sha256_file(f) != rec["sha256"]:
            raise RaditError(f"{f}: sha256 checksum mismatch (corrupt or modified{more})")


_HEX64 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()


def _kind(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _need(path: Path, ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        shown = repr(value) if isinstance(value, (int, float, str)) else ""
        shown = f" {shown[:60]}..." if len(shown) > 60 else f" {shown}" if shown else ""
        raise RaditError(f"{path}: corrupt manifest (field {field} must be {expected}, got {_kind(value)}{shown})")


def check_file_records(files: Any, path: Path, *, required: tuple[str, ...] = ()) -> None:
    """Refuse a manifest's ``files`` entry unless it is an object {plain file name: {bytes, sha256}} that lists
    every ``required`` name (one line naming the field). A name is a plain file of the folder: no ``/``,
    ``\\``, ``.`` or ``..``, so nothing outside the folder is ever read. Index and checkpoint manifests share it."""

    def need(ok: bool, field: str, expected: str, value: Any) -> None:
        _need(path, ok, field, expected, value)

    need(isinstance(files, dict), "files", "an object {file name: {bytes, sha256}}", files)
    for name, rec in files.items():
        where = f"files[{name!r}]"
        need(bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name,
             where, "a file of the folder (a plain name)", name)
        need(isinstance(rec, dict), where, "an object {bytes, sha256}", rec)
        need(_is_int(rec.get("bytes"), 0), f"{where}.bytes", "a non-negative integer", rec.get("bytes", _MISSING))
        need(isinstance(rec.get("sha256"), str) and bool(_HEX64.fullmatch(rec["sha256"])), f"{where}.sha256",
             "64 lowercase hex digits", rec.get("sha256", _MISSING))
    missing = [n for n in required if n not in files]
    if missing:
        raise RaditError(f"{path}: corrupt manifest (field files lacks {', '.join(missing)})")


def check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose fields are missing or of the wrong type, naming the field (one line)."""

    def need(ok: bool, field: str, expected: str, value: Any) -> None:
        _need(path, ok, field, expected, value)

    for key in ("count", "dim", "files", "doc_encoder", "query_encoder", "index"):
        if key not in manifest:
            raise RaditError(f"{path}: corrupt manifest (missing {key!r})")
    need(_is_int(manifest["count"], 0), "count", "a non-negative integer", manifest["count"])
    need(_is_int(manifest["dim"], 1), "dim", "a positive integer", manifest["dim"])
    check_file_records(manifest["files"], path, required=REQUIRED_FILES)
    for side in ("doc_encoder", "query_encoder"):
        enc = manifest[side]
        need(isinstance(enc, dict), side, "an object", enc)
        need(isinstance(enc.get("name"), str) and bool(enc["name"]), f"{side}.name", "a non-empty string",
             enc.get("name", _MISSING))
        for key, types, expected in (("dim", int, "an integer"), ("pooling", str, "a string"),
                                     ("normalize", bool, "true or false"), ("max_length", int, "an integer"),
                                     ("fingerprint", str, "a string"), ("base_fingerprint", str, "a string")):
            value = enc.get(key)
            ok = value is None or (isinstance(value, types) and (types is bool or not isinstance(value, bool)))
            need(ok, f"{side}.{key}", expected + " or null", value)
    index = manifest["index"]
    need(isinstance(index, dict), "index", "an object", index)
    need(isinstance(index.get("factory"), str), "index.factory", "a FAISS factory string",
         index.get("factory", _MISSING))
    need(isinstance(index.get("search_params", ""), str), "index.search_params", "a string",
         index.get("search_params"))
    need(isinstance(manifest.get("memory", {}), dict), "memory", "an object", manifest.get("memory"))


def estimate_index_bytes(factory: str, n: int, d: int) -> int | None:
    """Rough in-memory size of a FAISS index built with ``factory`` on n vectors of dim d (None = unknown).

    Flat: 4nd. IVF{L},Flat: 4nd + 8n (ids) + 4dL (centroids). IVF{L},PQ{m}[x{b}]: n(mb/8 + 8) + 4dL
    + 4d 2^b (codebooks). IVF{L},SQ8 / SQfp16: n(d + 8) / n(2d + 8) + 4dL. HNSW{M}[,Flat]: 4nd + about
    8Mn (2M level-0 links of 4 bytes, ~10% more for the upper levels). PQ{m}: nm + 4d 256. ``OPQ``/``PCA``
    prefixes add a d x d' matrix. Real sizes are in the manifest's ``memory`` entry once built.
    """
    parts = [p.strip() for p in factory.replace(" ", "").split(",") if p.strip()]
    extra = 0
    while parts and re.fullmatch(r"(OPQ|PCAR?|PCAW?R?|RR)\d+(_\d+)?", parts[0]):
        m = re.fullmatch(r"[A-Z]+(\d+)(?:_(\d+))?", parts[0])
        d_out = int(m.group(2) or m.group(1)) if parts[0].startswith("OPQ") else int(m.group(1))
        extra += 4 * d * d_out
        d = d_out
        parts = parts[1:]
    if not parts:
        return None
    ivf = re.fullmatch(r"IVF(\d+)(?:_HNSW\d+)?", parts[0])
    if ivf:
        nlist = int(ivf.group(1))
        codes = _code_bytes(parts[1] if len(parts) > 1 else "Flat", d)
        if codes is None:
            return None
        per_vec, fixed = codes
        return extra + n * (per_vec + 8) + fixed + 4 * d * nlist
    hnsw = re.fullmatch(r"HNSW(\d+)", parts[0])
    if hnsw:
        codes = _code_bytes(parts[1] if len(parts) > 1 else "Flat", d)
        if codes is None:
            return None
        return extra + n * (codes[0] + int(8.8 * int(hnsw.group(1)))) + codes[1]
    if len(parts) == 1:
        codes = _code_bytes(parts[0], d)
        return None if codes is None else extra + n * codes[0] + codes[1]
    return None


def _code_bytes(code: str, d: int) -> tuple[int, int] | None:
    """(bytes per vector, fixed bytes) of a FAISS code string."""
    if code == "Flat":
        return 4 * d, 0
    if code == "SQ8":
        return d, 8 * d
    if code == "SQfp16":
        return 2 * d, 0
    m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:np)?", code)
    if m:
        sub, bits = int(m.group(1)), int(m.group(2) or 8)
        return -(-sub * bits // 8), 4 * d * (1 << bits)
    return None
