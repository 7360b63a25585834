"""Keras files as sources (read only): legacy Keras 2 HDF5, Keras 3 ``.weights.h5`` and ``.keras`` zips.

Keras writes HDF5 laid out for Keras, not for people, so each tensor gets a
readable name and its HDF5 path is kept in the metadata (``original_names``),
which an export records and ``import --original-names`` restores:

* **Keras 2** (tf_keras, ``save_weights("x.h5")`` or ``save("x.h5")``): the
  ``weight_names`` attribute of each layer in ``layer_names`` names its weights:
  ``model_weights/conv2d_1/conv2d_1/kernel:0`` is ``conv2d_1/kernel``.  A
  whole-model file's ``optimizer_weights/`` become ``optimizer/...``.
* **Keras 3** (and tf_keras's own ``.keras`` / ``.weights.h5``): weights sit at
  ``layers/<class>[_N]/vars/<i>``, ``<class>`` the snake-cased layer class counted
  in model order.  A ``.keras`` zip's ``config.json`` gives each such path its
  layer name and, for the layer classes in :data:`LAYER_VARIABLES`, each index its
  variable name (``layers/conv2d_1/vars/0`` is ``c1/kernel``); other layers keep
  the index (``c1/0``).  A bare ``.weights.h5`` has no config: ``conv2d_1/0``.
  The optimizer's ``optimizer/vars/<i>`` is ``optimizer/<i>``, tf_keras's
  metrics ``metrics/<metric>/<i>``.

A name that would collide with another, or that ckptbridge refuses (control
characters...), keeps its HDF5 path.  Files are recognised by content
(:func:`detect`), whatever their suffix; every check of the HDF5 archive reader
applies (``hdf5.Hdf5Source``, which this reader extends).  A ``.keras`` zip is
read in place: its ``model.weights.h5`` member, stored uncompressed as Keras
writes it, is opened through a window on the zip file; a deflated one is read
into memory within ``max_tensor_bytes``.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import CkptBridgeError, CorruptError, FormatError, UnsafeArchiveError, option
from ..spec import TensorSpec
from . import meta
from .hdf5 import META_GROUP, Hdf5Source

#: What each kind of Keras file is, by the source's ``kind`` (what ``ls`` shows).
KINDS = {
    "keras2-weights": "Keras 2 HDF5 weights (tf_keras save_weights)",
    "keras2-model": "Keras 2 HDF5 model (tf_keras save to .h5)",
    "keras3-weights": "Keras 3 weights (.weights.h5)",
    "keras3-model": "Keras model zip (.keras)",
}

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
WEIGHTS_MEMBER = "model.weights.h5"
CONFIG_MEMBER = "config.json"
OPTIMIZER = "optimizer"

_LEGACY_MODEL_GROUP = "model_weights"
_LEGACY_OPTIMIZER_GROUP = "optimizer_weights"
_LEGACY_TOP_LEVEL = "top_level_model_weights"
_VARS = "vars"
#: Groups of Keras 3 files that hold a list of layers (tf_keras 2.13 wrote the second).
_CONTAINERS = ("layers", "_layer_checkpoint_dependencies")
_TF_SUFFIX = re.compile(r":\d+$")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_MAX_DEFLATE_RATIO = 1100
#: What a ``.keras`` file's config may take besides the base document limits (``meta.document_limits``),
#: for each group or dataset of its weights: Keras writes two groups per layer, even one without
#: weights, and a layer's config takes some 0.5-1.5 KB and 50-100 JSON values.
CONFIG_BYTES_PER_OBJECT = 2 << 10
CONFIG_VALUES_PER_OBJECT = 128


def _with_bias(kernels: tuple[str, ...], flag: str = "use_bias") -> Callable[[Mapping[str, Any]], list[str]]:
    return lambda c: [*kernels, *(["bias"] if c.get(flag, True) else [])]


def _norm(moving: bool) -> Callable[[Mapping[str, Any]], list[str]]:
    def names(c: Mapping[str, Any]) -> list[str]:
        out = (["gamma"] if c.get("scale", True) else []) + (["beta"] if c.get("center", True) else [])
        return out + (["moving_mean", "moving_variance"] if moving else [])

    return names


#: Layer class -> its variables in the order Keras saves them (trainable first, then the rest, each in
#: creation order), from its config.  A layer whose saved count differs keeps indices.
LAYER_VARIABLES: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    **{c: _with_bias(("kernel",)) for c in ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                                           "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D")},
    "SeparableConv1D": _with_bias(("depthwise_kernel", "pointwise_kernel")),
    "SeparableConv2D": _with_bias(("depthwise_kernel", "pointwise_kernel")),
    "EinsumDense": lambda c: ["kernel", *(["bias"] if c.get("bias_axes") else [])],
    "BatchNormalization": _norm(moving=True),
    "LayerNormalization": _norm(moving=False),
    "GroupNormalization": _norm(moving=False),
    "Embedding": lambda c: ["embeddings"],
    "PReLU": lambda c: ["alpha"],
}


# --------------------------------------------------------------------------- recognising Keras files


def _magic(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


def _hdf5_kind(f: Any) -> str | None:
    """The kind of Keras HDF5 an open h5py file is, from its root; None for any other HDF5."""
    import h5py

    if META_GROUP in f:
        return None  # ckptbridge's own archive
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return "keras2-weights"
    g = f.get(_LEGACY_MODEL_GROUP, getlink=True)
    if isinstance(g, h5py.HardLink) and isinstance(f[_LEGACY_MODEL_GROUP], h5py.Group):
        a = f[_LEGACY_MODEL_GROUP].attrs
        if "layer_names" in a or "layer_names0" in a:
            return "keras2-model"
    # Keras 3: every saveable's variables in a group named "vars"; the model's own at the root.
    for key in (_VARS, *_CONTAINERS, OPTIMIZER):
        if not isinstance(f.get(key, getlink=True), h5py.HardLink) or not isinstance(f[key], h5py.Group):
            continue
        if key == _VARS:
            return "keras3-weights"
        for i, child in enumerate(f[key]):
            if i >= 64:
                break
            if child == _VARS:
                return "keras3-weights"
            if isinstance(f[key].get(child, getlink=True), h5py.HardLink) and isinstance(f[key][child], h5py.Group) \
                    and isinstance(f[key][child].get(_VARS, getlink=True), h5py.HardLink):
                return "keras3-weights"
    return None


def detect(path: str) -> str | None:
    """The kind of Keras file at ``path`` (a key of :data:`KINDS`), or None, from its bytes: an HDF5
    file laid out by Keras, or a zip holding ``model.weights.h5``.  Only headers are read, and
    nothing here raises (a file it cannot read is left to the reader its suffix picks)."""
    head = _magic(path)
    if head == HDF5_MAGIC:
        try:
            import h5py

            with h5py.File(path, "r") as f:
                return _hdf5_kind(f)
        except Exception:
            return None
    if head[:4] == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                return "keras3-model" if WEIGHTS_MEMBER in z.NameToInfo else None
        except Exception:
            return None
    return None


# --------------------------------------------------------------------------- a zip member as a file


class _Window(io.RawIOBase):
    """A read-only file over ``size`` bytes of an open file from ``start``: a stored zip member, in place."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        done = 0
        while done < n:
            chunk = os.pread(self._fd, n - done, self._start + self._pos + done)
            if not chunk:
                break
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        self._pos += done
        return done


def _json(raw: bytes, where: str) -> Any:
    """A JSON document from an untrusted file, parsed (bounded before, by :meth:`_KerasZip.read_config`)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptError(f"{where} is not valid JSON ({str(e)[:200]}); the file is damaged, "
                           f"or pass its {WEIGHTS_MEMBER} unzipped (names then come without the config)") from None


class _KerasZip:
    """A ``.keras`` file's members: the weights as a file h5py opens, and the config.  Every
    member the zip's directory claims is checked against the file before it is read."""

    def __init__(self, path: str, max_tensor_bytes: int | None) -> None:
        self.path = path
        self._file = open(path, "rb")
        try:
            try:
                self._zip = zipfile.ZipFile(self._file)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error, UnicodeDecodeError, zlib.error) as e:
                raise CorruptError(f"{path} is not a readable .keras file ({e}); a .keras model is a zip: check that the file is complete") from None
            self._fsize = os.fstat(self._file.fileno()).st_size
            names = [i.filename for i in self._zip.infolist()]
            for n in (WEIGHTS_MEMBER, CONFIG_MEMBER):
                if names.count(n) > 1:
                    raise CorruptError(f"{path}: member {n!r} appears twice; refusing an ambiguous .keras file")
            if WEIGHTS_MEMBER not in names:
                sharded = [n for n in names if n.endswith(".weights.json")]
                why = (f"its weights are sharded ({sharded[0]}), which ckptbridge does not read; save the model unsharded" if sharded
                       else f"so it is not a Keras model file; a .keras zip holds {CONFIG_MEMBER}, metadata.json and {WEIGHTS_MEMBER}: "
                       "check the file")
                raise FormatError(f"{path} has no {WEIGHTS_MEMBER}, {why}")
            self.weights, self.size = self._open_weights(max_tensor_bytes)
        except BaseException:
            self.close()
            raise

    def _start(self, info: zipfile.ZipInfo) -> int:
        """Where a member's (compressed) bytes begin, from its local header, checked against the file."""
        where = f"{self.path}: member {info.filename!r}"
        if info.flag_bits & 0x1:
            raise FormatError(f"{where} is encrypted; decrypt the .keras file first")
        if info.header_offset + _LOCAL_HEADER.size > self._fsize:
            raise CorruptError(f"{where} starts past the end of the file; the .keras file is truncated")
        lh = _LOCAL_HEADER.unpack(os.pread(self._file.fileno(), _LOCAL_HEADER.size, info.header_offset))
        if lh[0] != ZIP_MAGIC:
            raise CorruptError(f"{where}: bad local header; the .keras file is damaged")
        start: int = info.header_offset + _LOCAL_HEADER.size + lh[9] + lh[10]
        if start + info.compress_size > self._fsize:
            raise CorruptError(f"{where}: its data extends past the end of the file; the .keras file is truncated")
        return start

    def _read_bounded(self, info: zipfile.ZipInfo, limit: int | None, what: str, over: str | None = None) -> bytes:
        """A member read whole into memory: only after its claimed size is checked against ``limit`` and
        against what its compressed bytes can expand to (zipfile checks its CRC-32).  ``over``: the
        message past ``limit``."""
        where = f"{self.path}: member {info.filename!r}"
        self._start(info)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FormatError(f"{where} uses a compression ckptbridge does not read (method {info.compress_type}); re-zip it stored or deflated")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CorruptError(f"{where} has inconsistent sizes; the .keras file is damaged")
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 4096:
            raise UnsafeArchiveError(f"{where} claims {info.file_size} bytes from {info.compress_size} compressed; "
                                     "refusing an impossible compression ratio")
        if limit is not None and info.file_size > limit and over is not None:
            raise UnsafeArchiveError(over)
        if limit is not None and info.file_size > limit:
            raise UnsafeArchiveError(f"{where}: {what} of {info.file_size} bytes, read into memory because it is compressed, "
                                     f"is over the limit of {limit}; "

                                     f"raise {option('max_tensor_bytes')} if it is genuine, or unzip {WEIGHTS_MEMBER} and pass it")
        try:
            with self._zip.open(info) as f:
                data = f.read(info.file_size + 1)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
            raise CorruptError(f"{where} cannot be read ({e}); the .keras file is damaged") from None
        if len(data) != info.file_size:
            raise CorruptError(f"{where} holds {len(data)} bytes, not the {info.file_size} its directory claims; the .keras file is damaged")
        return data

    def _open_weights(self, max_tensor_bytes: int | None) -> tuple[Any, int]:
        info = self._zip.getinfo(WEIGHTS_MEMBER)
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            if info.file_size != info.compress_size:
                raise CorruptError(f"{self.path}: member {WEIGHTS_MEMBER!r} has inconsistent sizes; the .keras file is damaged")
            return _Window(self._file.fileno(), self._start(info), info.file_size), info.file_size
        data = self._read_bounded(info, max_tensor_bytes, "the weights")
        return io.BytesIO(data), len(data)

    def read_config(self, objects: int) -> Any:
        """The parsed ``config.json`` (None if there is none), for weights of ``objects`` HDF5 groups and
        datasets: bounded by what such a model's config honestly takes (:data:`CONFIG_BYTES_PER_OBJECT`)."""
        info = self._zip.NameToInfo.get(CONFIG_MEMBER)
        if info is None:
            return None
        where = f"{self.path}: {CONFIG_MEMBER}"
        per = (CONFIG_BYTES_PER_OBJECT, CONFIG_VALUES_PER_OBJECT)
        limit = meta.document_limits(objects, bytes_per_object=per[0], values_per_object=per[1])[0]
        why = (f"ckptbridge reads the config whole, in memory, only to name the weights by their layers, and bounds it by the model "
               f"({meta.MAX_METADATA_BYTES} bytes and {meta.MAX_METADATA_VALUES} JSON values, plus {per[0]} bytes and {per[1]} values "
               f"for each of the {objects} groups and datasets of its {WEIGHTS_MEMBER}), so a config far larger than its model looks crafted. "
               f"If the file is genuine, unzip {WEIGHTS_MEMBER} and pass it: the same weights, named by their HDF5 paths")
        raw = self._read_bounded(info, limit, "the config", over=f"{where} is {info.file_size} bytes, over the limit of {limit}: {why}")
        meta.check_document(raw, where, "the Keras config", objects=objects, bytes_per_object=per[0], values_per_object=per[1],
                            advice=why, max_depth=None)
        return _json(raw, where)

    def close(self) -> None:
        z = getattr(self, "_zip", None)
        if z is not None:
            z.close()
        self._file.close()


# --------------------------------------------------------------------------- naming


def _strings(value: Any) -> list[str] | None:
    """An HDF5 attribute holding a list of names, as strings; None when it is anything else."""
    import numpy as np

    arr = np.asarray(value)
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "OSU" or arr.ndim > 1:
        return None
    out = []
    for v in arr.reshape(-1):
        if isinstance(v, bytes):
            v = v.decode("utf-8", "surrogateescape")
        if not isinstance(v, str):
            return None
        out.append(v)
    return out


def _attr_list(obj: Any, name: str) -> list[str] | None:
    """A Keras 2 list attribute; long ones are split into ``name0``, ``name1``... (HDF5's 64 KiB limit)."""
    if name in obj.attrs:
        return _strings(obj.attrs[name])
    out: list[str] = []
    i = 0
    while f"{name}{i}" in obj.attrs:
        part = _strings(obj.attrs[f"{name}{i}"])
        if part is None:
            return None
        out += part
        i += 1
    return out if i else None


def _legacy_names(f: Any, kind: str, paths: set[str]) -> dict[str, str]:
    """HDF5 path -> readable name for a Keras 2 file, from its ``layer_names`` and ``weight_names``."""
    import h5py

    out: dict[str, str] = {}
    root = f[_LEGACY_MODEL_GROUP] if kind == "keras2-model" else f
    prefix = f"{_LEGACY_MODEL_GROUP}/" if kind == "keras2-model" else ""
    layers = _attr_list(root, "layer_names") or []
    if _LEGACY_TOP_LEVEL in root and _LEGACY_TOP_LEVEL not in layers:
        layers.append(_LEGACY_TOP_LEVEL)
    for layer in layers:
        if not layer or not isinstance(root.get(layer, getlink=True), h5py.HardLink) or not isinstance(root[layer], h5py.Group):
            continue
        for w in _attr_list(root[layer], "weight_names") or []:
            base = _TF_SUFFIX.sub("", w)
            out[f"{prefix}{layer}/{w}"] = base if base.startswith(layer + "/") else f"{layer}/{base}"
    if kind == "keras2-model" and isinstance(f.get(_LEGACY_OPTIMIZER_GROUP, getlink=True), h5py.HardLink):
        for w in _attr_list(f[_LEGACY_OPTIMIZER_GROUP], "weight_names") or []:
            out[f"{_LEGACY_OPTIMIZER_GROUP}/{w}"] = f"{OPTIMIZER}/{_TF_SUFFIX.sub('', w)}"
    return {p: n for p, n in out.items() if p in paths}


def _snake(class_name: str) -> str:
    """Keras's ``to_snake_case``: what a layer's class is called in the weights file."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layer_map(model: Any, path: str = "", shown: str = "") -> dict[str, tuple[str, str, Mapping[str, Any]]]:
    """Weights-file path of each layer of a model config -> (readable name, class, layer config).

    Keras saves a model's layers under ``layers/`` as their snake-cased class, numbered
    per class in model order (``conv2d``, ``conv2d_1``): the config's layer list, in order.
    """
    out: dict[str, tuple[str, str, Mapping[str, Any]]] = {}
    cfg = model.get("config") if isinstance(model, dict) else None
    layers = cfg.get("layers") if isinstance(cfg, dict) else None
    if not isinstance(layers, list):
        return out
    used: dict[str, int] = {}
    for entry in layers:
        if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str) or not isinstance(entry.get("config"), dict):
            continue
        cls = entry["class_name"]
        key = _snake(cls)
        if key in used:
            used[key] += 1
            key = f"{key}_{used[key]}"
        else:
            used[key] = 0
        name = entry["config"].get("name")
        if not isinstance(name, str) or not name:
            continue
        at = f"{path}/layers/{key}" if path else f"layers/{key}"
        out[at] = (shown + name, cls, entry["config"])
        out.update(_layer_map(entry, at, f"{shown}{name}/"))  # a model nested as a layer
    return out


def _bare_owner(owner: str) -> str:
    return "/".join(s for s in owner.split("/") if s not in _CONTAINERS)


def _keras3_names(f: Any, paths: set[str], config: Any) -> dict[str, str]:
    """HDF5 path -> readable name for a Keras 3 weights file (see the module docstring)."""
    import h5py

    layer_map = _layer_map(config) if config is not None else {}
    groups: dict[str, list[str]] = {}
    for p in paths:
        parent, _, index = p.rpartition("/")
        if parent == _VARS or parent.endswith("/" + _VARS):
            groups.setdefault(parent, []).append(index)
    out: dict[str, str] = {}
    for group, indices in groups.items():
        owner = group[: -len(_VARS)].rstrip("/")
        base = _bare_owner(owner)
        names: list[str] | None = None
        mapped = owner
        while mapped and mapped not in layer_map:
            mapped = mapped.rpartition("/")[0]
        if mapped:
            shown, cls, cfg = layer_map[mapped]
            # Recent Keras 3 also writes each layer's name beside its variables: it must agree with the config.
            stored = f[group].attrs.get("name") if isinstance(f[group], h5py.Group) else None
            stored = stored.decode("utf-8", "replace") if isinstance(stored, bytes) else stored
            if stored is None or mapped != owner or (isinstance(stored, str) and stored == shown.rpartition("/")[2]):
                rest = _bare_owner(owner[len(mapped):])
                base = shown + rest
                if mapped == owner and cls in LAYER_VARIABLES:
                    try:
                        names = LAYER_VARIABLES[cls](cfg)
                    except (AttributeError, TypeError):
                        names = None
                    if names is not None and sorted(indices, key=lambda s: (len(s), s)) != [str(i) for i in range(len(names))]:
                        names = None
        for index in indices:
            label = names[int(index)] if names is not None else index
            if base:
                out[f"{group}/{index}"] = f"{base}/{label}"
    return out


def _checked(renames: dict[str, str], paths: set[str]) -> dict[str, str]:
    """Readable names that are usable: valid names that no other tensor has (else the HDF5 path stays)."""
    seen: dict[str, int] = {}
    for p in paths:
        n = renames.get(p, p)
        seen[n] = seen.get(n, 0) + 1
    out = {}
    for p, n in renames.items():
        if n == p or seen[n] > 1:
            continue
        try:
            meta.check_tensor_name(n, "")
        except CkptBridgeError:
            continue
        out[p] = n
    return out


# --------------------------------------------------------------------------- the source


class KerasSource(Hdf5Source):
    """A Keras file, read like the HDF5 archives (and checked like them), under readable names."""

    kind = "keras"

    def __init__(self, path: str, *, verify: bool = True, max_tensor_bytes: int | None = None) -> None:
        import h5py

        self.path = path
        self._verify = verify
        self._zip: _KerasZip | None = None
        self._member_size: int | None = None
        config = None
        target: Any = path
        if _magic(path) != HDF5_MAGIC:  # a .keras zip (or a damaged file named .keras)
            self._zip = _KerasZip(path, max_tensor_bytes)
            target, self._member_size = self._zip.weights, self._zip.size
        where = f"{path} ({WEIGHTS_MEMBER})" if self._zip is not None else path
        try:
            self._f = h5py.File(target, "r")
        except (OSError, ValueError) as e:
            self._close_zip()
            raise CorruptError(f"{where} is not a readable HDF5 file ({e}); check that the file is complete") from None
        try:
            if META_GROUP in self._f:
                raise FormatError(f"{where} holds ckptbridge's own metadata, so it is not read as a Keras file; pass it as an HDF5 archive (.h5)")
            kind = _hdf5_kind(self._f) or "keras3-weights"  # a .keras zip's weights, whatever their layout
            self.kind = "keras3-model" if self._zip is not None else kind
            self._load(max_tensor_bytes, True)
            if self._zip is not None:  # bounded by the weights just walked
                config = self._zip.read_config(self._objects)
            self._rename(kind, config)
        except CkptBridgeError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            self.close()
            raise CorruptError(f"{where}: damaged Keras file ({e}); check that the file is complete") from None

    def _rename(self, kind: str, config: Any) -> None:
        raw = set(self._datasets)
        if kind.startswith("keras2"):
            renames = _legacy_names(self._f, kind, raw)
        else:
            renames = _keras3_names(self._f, raw, config)
        renames = _checked(renames, raw)
        datasets: dict[str, str] = {}
        specs: dict[str, TensorSpec] = {}
        named = {old: renames.get(old, old) for old in raw}
        for old, new in sorted(named.items(), key=lambda kv: kv[1].encode("utf-8", "surrogateescape")):
            datasets[new] = self._datasets[old]
            s = self._specs[old]
            specs[new] = TensorSpec(new, s.dtype, s.shape, stored_nbytes=s.stored_nbytes)
        self._datasets, self._specs = datasets, specs
        self._meta = {"original_names": {new: old for old, new in renames.items()}} if renames else {}

    def _check_dataset(self, ds: Any, full: str, fsize: int, max_tensor_bytes: int | None, spans: list[tuple[int, int, str]]) -> None:
        if self._member_size is not None:
            import h5py

            # The weights member's bytes are what HDF5 sees as the file; variable-length data would be
            # read past that window (by path), and Keras writes none.
            if ds.dtype.kind == "O" or h5py.check_vlen_dtype(ds.dtype) is not None:
                raise FormatError(f"{self.path}: dataset {full!r} of its {WEIGHTS_MEMBER} holds variable-length data, which Keras does not write; "
                                  f"unzip {WEIGHTS_MEMBER} and pass it")
            fsize = self._member_size
        super()._check_dataset(ds, full, fsize, max_tensor_bytes, spans)

    def _mapped(self) -> Any:
        # Dataset offsets are within the weights member, not the .keras file: read through HDF5.
        return None if self._zip is not None else super()._mapped()

    def _close_zip(self) -> None:
        z, self._zip = self._zip, None
        if z is not None:
            z.close()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._close_zip()
