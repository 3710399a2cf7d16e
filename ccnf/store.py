"""Pickle-free, versioned, checksummed storage of the study's cached artefacts.

Checkpoints (``models/*/model.pt``) and feature caches (``features/<class>/<split>.pt``) are
nested containers: dicts, lists and tuples of tensors and plain values. They are stored as a
`safetensors <https://github.com/huggingface/safetensors>`_ file, which holds raw tensor
bytes and a JSON header and nothing that executes on load:

* every tensor of the container goes into the file under a generated name (``t0``, ``t1``,
  ...), in the order a depth-first walk meets it;
* the container itself, with each tensor replaced by ``{"__tensor__": name}``, is JSON
  (``tree``) in the header's metadata (one entry, ``ccnf``, a JSON object), next to the format
  name and version, the artefact's kind (``checkpoint``, ``features``) and that kind's version;
* ``sha256`` in the header covers all of these and every tensor's name, dtype, shape and bytes,
  so a flipped bit anywhere either breaks the file's structure or fails the checksum: a load
  returns exactly what was saved, or raises one :class:`CcnfError` naming the file and the fix;
* the bytes depend only on the content (DVC hashes them: the same features or weights must
  give the same file, or every downstream stage would re-run).

Evaluation archives (``eval/<task>/*.npz``, :func:`save_npz`) are plain numpy archives with a
manifest of their arrays' checksums; they too are written so that their bytes depend only on
the arrays (each member whole, no header that varies with the Python release).

Nothing is ever unpickled: an old-format file (a torch pickle) or a foreign file is refused
with a clear error before any of its content is interpreted. Writes are atomic
(:func:`ccnf.atomic.atomic_path`).

Values the tree stores exactly: ``str``, ``int``, ``float`` (NaN and infinities included),
``bool``, ``None``, tensors (CPU, dense, any dtype safetensors knows), and dicts, lists and
tuples of these; dict keys are strings or, via a tagged form, other plain scalars. Anything
else (a numpy array, a module, an arbitrary object) is a :class:`TypeError` at save time: the
loader could not give it back unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ccnf.atomic import atomic_path
from ccnf.errors import CcnfError

if TYPE_CHECKING:
    import torch

FORMAT = "ccnf-artifact"
FORMAT_VERSION = 1
# current version of each kind's layout: bump one when its *meaning* changes (not when a key
# is added: the containers are generic), so an older file is refused instead of misread
KIND_VERSIONS: dict[str, int] = {
    "checkpoint": 1,  # models/*/model.pt (safetensors)
    "features": 1,  # features/<class>/<split>.pt (safetensors)
    "image_scores": 1,  # eval/<task>/image_scores.npz
    "gallery": 1,  # eval/<task>/gallery.npz
}

_META_KEY = "ccnf"  # the one safetensors metadata entry: our fields, as one JSON object
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_RESERVED = frozenset({_TENSOR, _TUPLE, _DICT})
_SCALARS = (str, int, float, bool, type(None))
# a safetensors header larger than this is not one of ours (ours are a few hundred kB at most)
_MAX_HEADER = 512 * 1024 * 1024


# ----------------------------------------------------------------------------- encoding


def _encode(obj: Any, tensors: list[torch.Tensor], path: str) -> Any:
    """The JSON tree of ``obj``; tensors are appended to ``tensors`` and named by index."""
    import torch
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.is_quantized or obj.is_complex():
            raise TypeError(f"cannot store a {obj.layout}/{obj.dtype} tensor at {path}")
        tensors.append(obj)
        return {_TENSOR: f"t{len(tensors) - 1}"}
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return float(obj)  # a float subclass (numpy's float64) is stored as a plain float
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(type(k) is str for k in obj) and not (_RESERVED & set(obj))
        if plain:
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, _SCALARS) or (isinstance(k, float) and not math.isfinite(k)):
                raise TypeError(f"cannot store the dict key {k!r} at {path}")
            pairs.append([k, _encode(v, tensors, f"{path}[{k!r}]")])
        return {_DICT: pairs}
    raise TypeError(
        f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} at {path}: "
        "artefacts hold tensors, str/int/float/bool/None and dicts/lists/tuples of them"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if isinstance(node, dict):
        if len(node) == 1 and _TENSOR in node:
            return tensors[node[_TENSOR]]
        if len(node) == 1 and _TUPLE in node:
            return tuple(_decode(v, tensors) for v in node[_TUPLE])
        if len(node) == 1 and _DICT in node:
            return {k: _decode(v, tensors) for k, v in node[_DICT]}
        return {k: _decode(v, tensors) for k, v in node.items()}
    return node


def _prepare(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense, contiguous CPU copies safetensors accepts (it refuses tensors sharing storage)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for i, t in enumerate(tensors):
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of another stored tensor, or of a larger buffer
        storages.add(t.untyped_storage().data_ptr())
        out[f"t{i}"] = t
    return out


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the header fields and every tensor's name, dtype, shape and bytes."""
    import torch
    h = hashlib.sha256()
    for key in ("format", "format_version", "kind", "kind_version", "tree"):
        h.update(f"{key}={meta[key]}\0".encode())
    for name in sorted(tensors, key=lambda n: int(n[1:])):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\0".encode())
        # bytes through a uint8 view: works for every dtype (bfloat16 has no numpy twin)
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def dumps(obj: Any, *, kind: str) -> bytes:
    """The bytes of ``obj`` stored as an artefact of ``kind`` (see the module docstring)."""
    from safetensors.torch import save as _st_save

    if kind not in KIND_VERSIONS:
        raise ValueError(f"unknown artefact kind {kind!r}; known: {sorted(KIND_VERSIONS)}")
    found: list[torch.Tensor] = []
    tree = _encode(obj, found, "<root>")
    tensors = _prepare(found)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "kind_version": str(KIND_VERSIONS[kind]),
        "tree": json.dumps(tree, allow_nan=True, separators=(",", ":")),
    }
    meta["sha256"] = _digest(meta, tensors)
    # one metadata entry, one JSON string: safetensors writes its metadata map in a random
    # order per process, and the bytes (which DVC hashes) must not depend on that
    return _st_save(tensors, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})


def save_artifact(path: str | Path, obj: Any, *, kind: str) -> Path:
    """Write ``obj`` to ``path`` atomically as an artefact of ``kind``; returns ``path``."""
    data = dumps(obj, kind=kind)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# ----------------------------------------------------------------------------- loading


def _header(data: bytes) -> dict[str, Any] | None:
    """The safetensors JSON header of ``data``, or None when there is no valid one."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > _MAX_HEADER or 8 + n > len(data):
        return None
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _ccnf_meta(header: dict[str, Any] | None) -> dict[str, Any] | None:
    """Our fields from a safetensors header, or None when it has none (or they are mangled)."""
    meta = header.get("__metadata__") if header is not None else None
    if not isinstance(meta, dict) or not isinstance(meta.get(_META_KEY), str):
        return None
    try:
        fields = json.loads(meta[_META_KEY])
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def _not_ours(data: bytes, header: dict[str, Any] | None) -> str:
    """What a file that is not an intact artefact of ours looks like, for the message."""
    if not data:
        return "the file is empty"
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        return "it is a torch pickle, the format of an older ccnf (never unpickled)"
    if header is not None:
        return "it is a safetensors file not written by ccnf"
    return "it is truncated, corrupt or of an unknown format"


def loads(
    data: bytes, *, kind: str, where: str = "<bytes>", fix: str = "re-create the file"
) -> Any:
    """Decode artefact bytes written by :func:`dumps` with this ``kind``.

    Raises a :class:`CcnfError` naming ``where`` and ``fix`` for anything but an intact
    artefact of the expected kind and version: truncation, a flipped bit, another kind, an
    older format, a foreign file.
    """

    from safetensors import SafetensorError
    from safetensors.torch import load as _st_load

    def fail(what: str) -> CcnfError:
        return CcnfError(f"cannot read the {kind} file {where}: {what}", where=where, fix=fix)

    header = _header(data)
    meta = _ccnf_meta(header)
    if meta is None or meta.get("format") != FORMAT:
        raise fail(_not_ours(data, header))
    if meta.get("kind") != kind:
        raise fail(f"it holds a '{meta.get('kind')}' artefact, not a {kind}")
    version = (meta.get("format_version"), meta.get("kind_version"))
    if version != (str(FORMAT_VERSION), str(KIND_VERSIONS[kind])):
        raise fail(
            f"it has format version {version[0]}/{version[1]}, this code reads "
            f"{FORMAT_VERSION}/{KIND_VERSIONS[kind]}"
        )
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as err:
        raise fail(f"it is corrupt ({str(err).splitlines()[0]})") from None
    try:
        intact = _digest(meta, tensors) == meta.get("sha256")
    except (KeyError, ValueError):  # a header field or tensor name mangled
        intact = False
    if not intact:
        raise fail("it is corrupt (checksum mismatch)")
    try:
        return _decode(json.loads(meta["tree"]), tensors)
    except (ValueError, KeyError, TypeError) as err:  # only with a forged checksum
        raise fail(f"its tree is malformed ({err})") from None


def load_artifact(path: str | Path, *, kind: str, fix: str) -> Any:
    """Read the artefact at ``path`` (see :func:`loads`); a missing file is a CcnfError too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CcnfError(f"{kind} file not found: {path}", where=str(path), fix=fix) from None
    except OSError as err:
        raise CcnfError(f"cannot read {kind} file {path}: {err.strerror or err}",
                        where=str(path), fix=fix) from None
    return loads(data, kind=kind, where=str(path), fix=fix)


# ----------------------------------------------------------------------------- other artefacts


def recovery_fix(path: str | Path) -> str:
    """How to get an intact copy of a pipeline output back, from where it lies.

    ``features/...`` belongs to the extract stage, ``models/<name>`` to init or train@<name>,
    ``eval/<task>`` and ``metrics/tasks/<task>.json`` to evaluate@<task>,
    ``data/manifest.json`` to prepare; anything else gets the generic advice.
    """
    parts = Path(path).parts
    out: str | None = None
    stage: str | None = None
    for i in range(len(parts) - 1, -1, -1):
        name, rest = parts[i], parts[i + 1 :]
        if name == "features":
            out, stage = str(Path(*parts[: i + 1])), "extract"
        elif name == "models" and rest:
            out = str(Path(*parts[: i + 2]))
            stage = "init" if rest[0] == "init" else f"train@{rest[0]}"
        elif name == "eval" and rest:
            out, stage = str(Path(*parts[: i + 2])), f"evaluate@{rest[0]}"
        elif name == "tasks" and i > 0 and parts[i - 1] == "metrics" and rest:
            out, stage = str(Path(path)), f"evaluate@{Path(rest[0]).stem}"
        elif name == "manifest.json":
            out, stage = str(Path(path)), "prepare"
        if stage is not None:
            break
    if stage is None:
        return f"restore or rebuild {path}: dvc checkout --force, or dvc repro --force"
    return (f"restore the cached copy: dvc checkout --force {out}; or rebuild it: "
            f"dvc repro --force --single-item {stage} (then dvc repro)")


def read_json(path: str | Path, *, what: str, fix: str | None = None) -> Any:
    """Parse a JSON file; missing, truncated or invalid JSON is one CcnfError naming it."""
    path = Path(path)
    fix = fix or recovery_fix(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CcnfError(f"{what} not found: {path}", where=str(path), fix=fix) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CcnfError(f"cannot read {what} {path}: {err}", where=str(path), fix=fix) from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise CcnfError(f"{what} {path} is truncated or corrupt (invalid JSON: {err})",
                        where=str(path), fix=fix) from None


_NPZ_MANIFEST = "__ccnf__"


def _array_digest(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}:{list(a.shape)}\0".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], *, kind: str) -> Path:
    """Write ``arrays`` atomically as a compressed ``.npz`` that :func:`load_npz` can verify.

    A plain numpy archive (``np.load`` reads it, no pickle: object arrays are refused) plus
    one more entry, ``__ccnf__``: a 0-d string array holding JSON with the format, the
    ``kind`` and its version, and every array's name, dtype, shape and sha256. Zip's CRC-32
    covers each member's bytes, not the directory that lists them: a damaged directory can
    drop a member without any zip error, and the manifest is what catches that.
    """
    if kind not in KIND_VERSIONS:
        raise ValueError(f"unknown artefact kind {kind!r}; known: {sorted(KIND_VERSIONS)}")
    if _NPZ_MANIFEST in arrays:
        raise ValueError(f"'{_NPZ_MANIFEST}' is reserved in an artefact npz")
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        if a.dtype.hasobject:
            raise TypeError(f"cannot store the object array {name!r} without pickle")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "kind_version": KIND_VERSIONS[kind],
        "arrays": {name: _array_digest(a) for name, a in arrays.items()},
    }
    members = {**arrays, _NPZ_MANIFEST: np.array(json.dumps(manifest))}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, a in members.items():
            zf.writestr(_npz_member(name), _npy_bytes(a))
    return Path(path)


def _npz_member(name: str) -> zipfile.ZipInfo:
    """The zip entry of array ``name``: ``name.npy``, deflated, dated 1980-01-01 as numpy's
    own archives are. Written whole with its size known (``writestr``), so no zip64 header is
    forced: ``np.savez_compressed`` streams each member with ``force_zip64``, whose header
    bytes changed between Python 3.11 patch releases (3.11.2 and 3.11.7 wrote the same arrays
    as different files), and an output's bytes must not depend on the interpreter's patch
    level (DVC hashes them)."""
    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _npy_bytes(a: np.ndarray) -> bytes:
    """``a`` in the .npy format (``np.save``'s bytes), never pickled."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def load_npz(
    path: str | Path, *, kind: str, what: str, fix: str | None = None
) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` written by :func:`save_npz`, read eagerly, never with pickle.

    Reading each member checks its zip CRC-32; the manifest then checks that no member is
    missing or extra and that each is the array that was written. Any damage, another kind
    of archive or one without a manifest is one CcnfError naming the file.
    """
    path = Path(path)
    fix = fix or recovery_fix(path)

    def fail(why: str) -> CcnfError:
        return CcnfError(f"{what} {path} {why}", where=str(path), fix=fix)

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise CcnfError(f"{what} not found: {path}", where=str(path), fix=fix) from None
    except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, OverflowError,
            MemoryError, RuntimeError, struct.error, zipfile.BadZipFile, zlib.error) as err:
        # a damaged zip directory or .npy header surfaces as any of these
        raise fail(f"is truncated or corrupt ({err})") from None
    try:
        manifest = json.loads(str(arrays.pop(_NPZ_MANIFEST)[()]))
        listed = manifest["arrays"]
        header = (manifest["format"], manifest["format_version"], manifest["kind"])
    except (KeyError, ValueError, TypeError, IndexError):
        raise fail("has no readable ccnf manifest (damaged, or not written by ccnf)") from None
    if header != (FORMAT, FORMAT_VERSION, kind):
        raise fail(f"holds a '{header[2]}' archive, format {header[1]}; expected a '{kind}' "
                   f"one, format {FORMAT_VERSION}")
    if manifest.get("kind_version") != KIND_VERSIONS[kind]:
        raise fail(f"has {kind} version {manifest.get('kind_version')}, this code reads "
                   f"{KIND_VERSIONS[kind]}")
    if not isinstance(listed, dict) or list(listed) != list(arrays):
        raise fail("is corrupt: its arrays are not the ones its manifest lists")
    bad = [name for name, a in arrays.items() if _array_digest(a) != listed[name]]
    if bad:
        raise fail(f"is corrupt: array {bad[0]} differs from what was written")
    return arrays
