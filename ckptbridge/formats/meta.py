"""What our archives record besides the arrays: dtype tags, checksums, provenance.

Both archive formats carry the same JSON document (see README, "Archive
formats").  Tensors NumPy cannot store natively are encoded without pickle:

* ``bfloat16`` as the ``uint16`` bit pattern, and every other dtype NumPy
  lacks (float8, int4, quantized...) as the bits of an integer dtype of the
  same width, tagged ``<dtype>-as-<storage>`` (the table is ``_dtypes``);
* ``string`` tensors as one ``uint8`` blob: ``n`` little-endian uint64 lengths
  (``n`` = number of elements) followed by the concatenated bytes.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from typing import Any

import numpy as np

from .. import _dtypes
from .._version import __version__
from ..errors import CorruptError, FormatError, UnsafeArchiveError, option
from ..io import checksum as _checksum
from ..spec import BFLOAT16, STRING

FORMAT_NAME = "ckptbridge"
FORMAT_VERSION = 1

ENC_RAW = _dtypes.ENC_RAW
ENC_BF16 = _dtypes.BY_NAME[BFLOAT16].encoding      # "bfloat16-as-uint16"
ENC_STRINGS = _dtypes.ENC_STRINGS


def encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """The array as stored in an archive, and the encoding tag (see ``_dtypes``)."""
    d = _dtypes.lookup(dtype)
    if dtype == STRING:
        return encode_strings(array), ENC_STRINGS
    return _dtypes.to_storage(array, d), d.encoding


def decode(stored: np.ndarray, dtype: str, shape: tuple[int, ...], encoding: str, where: str) -> np.ndarray:
    """Invert :func:`encode`; ``where`` names the tensor and file for messages."""
    if encoding == ENC_STRINGS:
        return decode_strings(stored, shape, where)
    d = _dtypes.BY_NAME.get(dtype)
    if d is None or not d.carried:
        raise CorruptError(f"{where}: dtype {str(dtype)[:40]!r} is not one ckptbridge carries; written by a newer ckptbridge? upgrade ckptbridge")
    if encoding != d.encoding:
        if encoding == ENC_RAW or encoding in _dtypes.BY_ENCODING:
            raise CorruptError(f"{where}: a {dtype} tensor is stored with encoding {encoding!r}, expected {d.encoding!r}; the archive is damaged")
        raise CorruptError(f"{where}: unknown encoding {str(encoding)[:40]!r}; written by a newer ckptbridge? upgrade ckptbridge")
    if stored.dtype.newbyteorder("=") != d.storage:
        raise CorruptError(f"{where}: a {dtype} tensor ({encoding}) is stored as {stored.dtype}, expected {d.storage}; the archive is damaged")
    out = _dtypes.from_storage(stored, d)
    if tuple(out.shape) != tuple(shape):
        raise CorruptError(f"{where}: metadata says shape {list(shape)} but the array has {list(out.shape)}; the archive is damaged")
    return out


def encode_strings(array: np.ndarray) -> np.ndarray:
    items = [bytes(b) for b in array.reshape(-1)]
    lengths = np.array([len(b) for b in items], dtype="<u8")
    blob = np.empty(lengths.nbytes + int(lengths.sum()), dtype=np.uint8)
    blob[: lengths.nbytes] = lengths.view(np.uint8)
    pos = lengths.nbytes
    for b in items:
        blob[pos : pos + len(b)] = np.frombuffer(b, dtype=np.uint8)
        pos += len(b)
    return blob


def decode_strings(blob: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    n = math.prod(shape)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CorruptError(f"{where}: string tensor must be stored as a 1-d uint8 blob, got {blob.dtype}{list(blob.shape)}; the archive is damaged")
    head = n * 8
    if head > blob.size:
        raise CorruptError(f"{where}: string blob too short for {n} lengths; the archive is damaged")
    lengths = np.frombuffer(blob[:head].tobytes(), dtype="<u8")
    # Summed exactly: in uint64, lengths near 2**64 would wrap around to a plausible total.
    rest = blob.size - head
    if n and (int(lengths.max()) > rest or float(lengths.sum(dtype=np.float64)) > rest + 1 or int(lengths.sum(dtype=np.uint64)) != rest):
        raise CorruptError(f"{where}: string lengths do not add up to the stored bytes; the archive is damaged")
    if not n and rest:
        raise CorruptError(f"{where}: string lengths do not add up to the stored bytes; the archive is damaged")
    data = blob[head:].tobytes()
    out = np.empty(n, dtype=object)
    pos = 0
    for i, ln in enumerate(lengths.tolist()):
        out[i] = data[pos : pos + ln]
        pos += ln
    return out.reshape(shape)


def checksum(stored: np.ndarray) -> int:
    """crc32c of an encoded array's bytes (C order)."""
    arr = np.require(stored, requirements="C")
    if arr.nbytes == 0:
        return 0
    return _checksum.crc32c(arr.reshape(-1).view(np.uint8).data)


def tensor_record(dtype: str, shape: tuple[int, ...], encoding: str, crc: int, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"dtype": dtype, "shape": list(shape), "encoding": encoding, "crc32c": crc}
    rec.update(extra)
    return rec


def provenance(source: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ckptbridge_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source,
    }
    tf = sys.modules.get("tensorflow")
    doc["tensorflow_version"] = getattr(tf, "__version__", None) if tf is not None else None
    if extra:
        doc.update(extra)
    return doc


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


#: Bounds on a JSON document read from a file (ckptbridge's metadata, a Keras config), checked on
#: its raw bytes before it is parsed.  Each is a base plus an allowance for every object the file
#: declares (a tensor, an HDF5 group or dataset), which its own bytes back: a document describing
#: 400,000 tensors is honestly big, a small file claiming a huge one is not.  A record costs about
#: 100 bytes and 15 values, and a value at most about 70 bytes once parsed, so the base (some
#: 250,000 tensors) parses in under ~400 MB, and a file's allowance grows with what it holds.
MAX_METADATA_BYTES = 64 << 20
MAX_METADATA_DEPTH = 32
MAX_METADATA_VALUES = 1 << 22
METADATA_BYTES_PER_OBJECT = 1 << 10
METADATA_VALUES_PER_OBJECT = 32
_VALUE_BYTES = np.zeros(256, np.bool_)
_VALUE_BYTES[[0x2C, 0x3A, 0x5B, 0x7B]] = True  # , : [ {
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[[0x5B, 0x7B]] = 1
_DEPTH_STEP[[0x5D, 0x7D]] = -1
_SCAN_CHUNK = 1 << 20


def document_limits(objects: int = 0, *, bytes_per_object: int = METADATA_BYTES_PER_OBJECT,
                    values_per_object: int = METADATA_VALUES_PER_OBJECT) -> tuple[int, int]:
    """(bytes, JSON values) a document may hold in a file that declares ``objects`` objects."""
    return MAX_METADATA_BYTES + objects * bytes_per_object, MAX_METADATA_VALUES + objects * values_per_object


def check_metadata_size(nbytes: int, where: str, what: str = "ckptbridge metadata", *, objects: int = 0) -> None:
    """Refuse, before it is read, a metadata payload larger than its limit (see :func:`document_limits`);
    the stored TF2 object graph is given ``objects=0``: 64 MiB, whatever the tensor count."""
    limit = document_limits(objects)[0]
    if nbytes > limit:
        plural = "s" if objects != 1 else ""
        scaled = f" ({MAX_METADATA_BYTES} plus {METADATA_BYTES_PER_OBJECT} for each of its {objects} tensor{plural})" if objects else ""
        raise UnsafeArchiveError(f"{where}: {what} is {nbytes} bytes, over the limit of {limit}{scaled}; the archive is damaged or crafted")


def json_shape(raw: bytes) -> tuple[int, int]:
    """(values, depth) of a JSON text, without parsing it: ``values`` is one plus the ``,`` ``:``
    ``[`` ``{`` outside strings (an upper bound on the objects parsing creates), ``depth`` the
    deepest nesting of arrays and objects.  Linear, in numpy, a megabyte at a time.

    Escapes are dropped first (``\\\\`` then ``\\"``), so every remaining ``"`` opens or closes a
    string.  In text that is not valid JSON the counts may be off past the first error, where the
    parser stops anyway."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    a = np.frombuffer(text, np.uint8)
    values, depth, deepest, quotes = 1, 0, 0, 0
    for i in range(0, a.size, _SCAN_CHUNK):
        c = a[i : i + _SCAN_CHUNK]
        q = c == 0x22
        inside = (np.cumsum(q, dtype=np.int64) + quotes) & 1  # 1 from an opening quote to its closing one
        quotes += int(np.count_nonzero(q))
        out = c[inside == 0]
        values += int(np.count_nonzero(_VALUE_BYTES[out]))
        steps = _DEPTH_STEP[out]
        steps = steps[steps != 0]
        if steps.size:
            run = np.cumsum(steps, dtype=np.int64) + depth
            deepest = max(deepest, int(run.max()))
            depth = int(run[-1])
    return values, deepest


def check_document(raw: bytes, where: str, what: str, *, objects: int = 0, bytes_per_object: int = METADATA_BYTES_PER_OBJECT,
                   values_per_object: int = METADATA_VALUES_PER_OBJECT, advice: str = "the archive is damaged or crafted",
                   max_depth: int | None = MAX_METADATA_DEPTH) -> None:
    """Refuse a JSON document before it is parsed: its size, how many values it can hold (each
    becomes a Python object) and how deep it nests, against :func:`document_limits` for a file
    that declares ``objects`` objects (``max_depth`` None: as deep as the parser goes)."""
    max_bytes, max_values = document_limits(objects, bytes_per_object=bytes_per_object, values_per_object=values_per_object)
    unit = ("tensor" if what == "ckptbridge metadata" else "object") + ("s" if objects != 1 else "")
    if len(raw) > max_bytes:
        scaled = f" ({MAX_METADATA_BYTES} plus {bytes_per_object} for each of its {objects} {unit})" if objects else ""
        raise UnsafeArchiveError(f"{where}: {what} is {len(raw)} bytes, over the limit of {max_bytes}{scaled}; {advice}")
    values, depth = json_shape(raw)
    if values > max_values:
        scaled = f" ({MAX_METADATA_VALUES} plus {values_per_object} for each of its {objects} {unit})" if objects else ""
        raise UnsafeArchiveError(f"{where}: {what} holds up to {values} JSON values, over the limit of {max_values}{scaled}; {advice}")
    if max_depth is not None and depth > max_depth:
        raise UnsafeArchiveError(f"{where}: {what} nests deeper than {max_depth} levels; {advice}")


def loads(raw: bytes | str, where: str, *, tensors: int = 0) -> dict[str, Any]:
    """Parse a ckptbridge metadata document, bounded before parsing (:func:`check_document`) by
    what an archive of ``tensors`` tensors may honestly record.  A ``str`` (a safetensors header's
    value) is parsed as it is, not decoded again."""
    try:
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
    except UnicodeEncodeError:
        raise CorruptError(f"{where}: ckptbridge metadata is not valid UTF-8; the archive is damaged") from None
    check_document(data, where, "ckptbridge metadata", objects=tensors)  # UnsafeArchiveError is a ValueError: not in the try below
    del data
    try:
        doc = json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptError(f"{where}: ckptbridge metadata is not valid JSON ({str(e)[:200]}); the archive is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or not isinstance(doc.get("tensors", {}), dict):
        raise CorruptError(f"{where}: ckptbridge metadata has an unexpected layout; the archive is damaged")
    version = doc.get("format_version", FORMAT_VERSION)
    if type(version) is not int or version < 1:
        text = repr(version)
        shown = text[:40] + ("..." if len(text) > 40 else "")
        raise CorruptError(f"{where}: ckptbridge metadata has an invalid format_version {shown}; the archive is damaged or crafted")
    if version > FORMAT_VERSION:
        raise CorruptError(f"{where}: archive format version {version} is newer than this ckptbridge reads ({FORMAT_VERSION}); upgrade ckptbridge")
    return doc


# --- load-time checks shared by the archive readers (untrusted input) -------------

#: More dimensions than any tensor has; NumPy itself stops at 64.
MAX_NDIM = 64
#: Longest tensor name, in UTF-8 bytes, an archive may carry: what fits a zip member
#: name (65535 bytes) with ".npy" after it.  No real checkpoint key comes near it.
MAX_NAME_BYTES = 65535 - 4
#: A tensor may take in memory at most this many times the distinct bytes stored for it
#: in the file, plus the slack (deflate itself stops near 1032:1), and never more than
#: the caller's limit (--max-tensor-gb).
MAX_EXPANSION = 1100
EXPANSION_SLACK = 16 << 20
#: Memory one string element takes once read, on top of its bytes: a ``bytes`` object
#: (33 bytes) and its slot in an object array, rounded up.
STRING_ELEMENT_BYTES = 48
#: C0 controls, DEL and C1 controls: what a terminal may act on when a name is printed
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_in_memory(count: int, nbytes: int, stored: int, where: str, max_bytes: int | None, *, strings: bool = False) -> int:
    """Refuse a tensor of ``count`` elements and ``nbytes`` bytes of values whose in-memory
    form (strings: one object per element) would exceed ``max_bytes`` or
    :data:`MAX_EXPANSION` times the ``stored`` bytes behind it; return that size."""
    need = nbytes + (count * STRING_ELEMENT_BYTES if strings else 0)
    what = f"{count} strings of {nbytes} bytes in all take about {need} bytes in memory" if strings else f"it takes {need} bytes in memory"
    if max_bytes is not None and need > max_bytes:
        raise UnsafeArchiveError(f"{where}: {what}, over the limit of {max_bytes}; raise {option('max_tensor_bytes')} if it is genuine")
    if need > MAX_EXPANSION * stored + EXPANSION_SLACK:
        raise UnsafeArchiveError(f"{where}: {what} but only {stored} bytes are stored for it; "
                                 "refusing what looks like a memory bomb (the archive is damaged or crafted)")
    return need


def check_tensor_name(name: str, where: str) -> None:
    """Refuse a tensor name read from an archive that no checkpoint should carry.

    Names are data: they become checkpoint keys and are printed by ``ls``, never
    joined into a filesystem path.  Empty names (a V2 index's header key), NUL
    and other control characters (which rewrite a terminal when printed) and
    bytes that are not UTF-8 are refused; ``..``, a leading ``/`` and empty
    segments are kept verbatim, since a checkpoint key is just a string.
    """
    if not name:
        raise CorruptError(f"{where}: a tensor has an empty name; refusing the archive (an empty key is a checkpoint's header)")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise CorruptError(f"{where}: tensor name {shown_name(name)} is not valid UTF-8; refusing the archive") from None
    if size > MAX_NAME_BYTES:
        raise CorruptError(f"{where}: tensor name {shown_name(name)} is {size} bytes long, over the limit of {MAX_NAME_BYTES}; refusing the archive")
    control = _CONTROL.search(name)
    if control is not None:
        raise CorruptError(f"{where}: tensor name {shown_name(name)} contains the control character {control.group()!r}; "
                           "refusing the archive (rename the tensor where it was made)")


def check_name_to_write(name: str, path: str) -> None:
    """Refuse, before anything is written, a name that every archive reader would refuse."""
    try:
        check_tensor_name(name, path)
    except CorruptError as e:
        text = (str(e).replace(" (rename the tensor where it was made)", "")
                .replace("; refusing the archive", ", so it cannot be written")
                .replace("a tensor has an empty name", "an empty tensor name cannot be written"))
        raise FormatError(text + f"; rename it ({option('rename')}) or leave it out ({option('exclude')})") from None


def shown_name(name: str, limit: int = 80) -> str:
    """A name as messages show it: repr'd (escapes visible), cut to ``limit`` characters."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(name)} characters)"


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
    """A shape read from an archive as a tuple of non-negative ints, or CorruptError."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(type(x) is int and x >= 0 for x in shape):
        text = repr(shape)
        raise CorruptError(f"{where}: invalid shape {text[:80] + ('...' if len(text) > 80 else '')}; the archive is damaged")
    return tuple(shape)


def record_spec(name: str, rec: Any, stored_dtype: np.dtype, stored_shape: tuple[int, ...], where: str) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) that a metadata record claims, checked against what is stored.

    The record is untrusted like the rest of the archive: a record that does not
    describe the stored array is refused when the archive is opened, so ``ls``
    never shows sizes the bytes do not back and ``read`` never decodes garbage.
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("dtype"), str):
        raise CorruptError(f"{where}: metadata record is malformed; the archive is damaged")
    dtype = rec["dtype"]
    shape = check_shape(rec.get("shape"), where)
    enc = rec.get("encoding", ENC_RAW)
    crc = rec.get("crc32c")
    if type(crc) is not int or not 0 <= crc < 1 << 32:
        raise CorruptError(f"{where}: metadata record has an invalid crc32c; the archive is damaged")
    if not isinstance(enc, str) or (enc != ENC_RAW and enc != ENC_STRINGS and enc not in _dtypes.BY_ENCODING):
        raise CorruptError(f"{where}: unknown encoding {str(enc)[:40]!r}; written by a newer ckptbridge? upgrade ckptbridge")
    d = _dtypes.BY_NAME.get(dtype)
    if enc == ENC_STRINGS:
        n = 1
        for dim in shape:
            n *= dim
        ok = dtype == STRING and stored_dtype == np.uint8 and len(stored_shape) == 1 and stored_shape[0] >= 8 * n
    else:
        ok = (d is not None and d.carried and dtype != STRING and enc == d.encoding
              and d.storage == stored_dtype.newbyteorder("=") and tuple(stored_shape) == shape)
    if not ok:
        raise CorruptError(f"{where}: metadata says {dtype}{list(shape)} ({enc}) "
                           f"but the stored array is {stored_dtype}{list(stored_shape)}; the archive is damaged or crafted")

    return dtype, shape
