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

import crc32c
import numpy as np

from .. import _dtypes
from .._version import __version__
from ..errors import CorruptError, FormatError, UnsafeArchiveError, option
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
    return crc32c.crc32c(arr.reshape(-1).view(np.uint8))


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


#: Bounds on the metadata JSON (and the TF2 object graph stored beside it), checked on
#: the raw bytes before anything is parsed.  A record costs about 150 bytes and 15
#: values, so these allow some 250,000 tensors while parsing stays under ~400 MB.
MAX_METADATA_BYTES = 64 << 20
MAX_METADATA_DEPTH = 32
MAX_METADATA_VALUES = 1 << 22
_JSON_TOKENS = re.compile(rb'[\[\]{}"\\]')


def check_metadata_size(nbytes: int, where: str, what: str = "ckptbridge metadata") -> None:
    """Refuse, before it is read, a metadata payload larger than :data:`MAX_METADATA_BYTES`."""
    if nbytes > MAX_METADATA_BYTES:
        raise UnsafeArchiveError(f"{where}: {what} is {nbytes} bytes, over the limit of {MAX_METADATA_BYTES}; the archive is damaged or crafted")


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text, strings skipped; no parsing."""
    depth = deepest = 0
    in_string = False
    escaped_at = -1
    for m in _JSON_TOKENS.finditer(raw):
        at = m.start()
        c = raw[at]
        if in_string:
            if at == escaped_at:
                continue
            if c == 0x5C:  # backslash: the next byte is escaped
                escaped_at = at + 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_METADATA_DEPTH:
                    break
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def loads(raw: bytes, where: str) -> dict[str, Any]:
    """Parse a ckptbridge metadata document, bounded before parsing: its size, how
    deep it nests and how many JSON values it can hold (each becomes a Python object)."""
    check_metadata_size(len(raw), where)
    # Every value but the first follows a "," or ":", or opens an array or object; bytes inside
    # strings are counted too, so this is an upper bound.
    values = 1 + raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_METADATA_VALUES:
        raise UnsafeArchiveError(f"{where}: ckptbridge metadata holds up to {values} JSON values, over the limit of {MAX_METADATA_VALUES}; the archive is damaged or crafted")
    if _json_depth(raw) > MAX_METADATA_DEPTH:
        raise UnsafeArchiveError(f"{where}: ckptbridge metadata nests deeper than {MAX_METADATA_DEPTH} levels; the archive is damaged or crafted")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptError(f"{where}: ckptbridge metadata is not valid JSON ({str(e)[:200]}); the archive is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or not isinstance(doc.get("tensors", {}), dict):
        raise CorruptError(f"{where}: ckptbridge metadata has an unexpected layout; the archive is damaged")
    version = doc.get("format_version", FORMAT_VERSION)
    if type(version) is not int or version < 1:
        text = repr(version)
        raise CorruptError(f"{where}: ckptbridge metadata has an invalid format_version {text[:40] + ('...' if len(text) > 40 else '')}; the archive is damaged or crafted")
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


def check_in_memory(count: int, nbytes: int, stored: int, where: str, max_bytes: int | None, *, strings: bool = False) -> int:
    """Refuse a tensor of ``count`` elements and ``nbytes`` bytes of values whose in-memory
    form (strings: one object per element) would exceed ``max_bytes`` or
    :data:`MAX_EXPANSION` times the ``stored`` bytes behind it; return that size."""
    need = nbytes + (count * STRING_ELEMENT_BYTES if strings else 0)
    what = f"{count} strings of {nbytes} bytes in all take about {need} bytes in memory" if strings else f"it takes {need} bytes in memory"
    if max_bytes is not None and need > max_bytes:
        raise UnsafeArchiveError(f"{where}: {what}, over the limit of {max_bytes}; raise {option('max_tensor_bytes')} if it is genuine")
    if need > MAX_EXPANSION * stored + EXPANSION_SLACK:
        raise UnsafeArchiveError(f"{where}: {what} but only {stored} bytes are stored for it; refusing what looks like a memory bomb (the archive is damaged or crafted)")
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
    bad = next((c for c in name if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise CorruptError(f"{where}: tensor name {shown_name(name)} contains the control character {bad!r}; refusing the archive (rename the tensor where it was made)")


def check_name_to_write(name: str, path: str) -> None:
    """Refuse, before anything is written, a name that every archive reader would refuse."""
    try:
        check_tensor_name(name, path)
    except CorruptError as e:
        raise FormatError(str(e).replace(" (rename the tensor where it was made)", "").replace("; refusing the archive", ", so it cannot be written").replace("a tensor has an empty name", "an empty tensor name cannot be written")
                          + f"; rename it ({option('rename')}) or leave it out ({option('exclude')})") from None


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
        raise CorruptError(f"{where}: metadata says {dtype}{list(shape)} ({enc}) but the stored array is {stored_dtype}{list(stored_shape)}; the archive is damaged or crafted")
    return dtype, shape
