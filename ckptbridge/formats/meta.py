"""What our archives record besides the arrays: dtype tags, checksums, provenance.

Both archive formats carry the same JSON document (see README, "Archive
formats").  Tensors NumPy cannot store natively are encoded without pickle:

* ``bfloat16`` as the ``uint16`` bit pattern;
* ``string`` tensors as one ``uint8`` blob: ``n`` little-endian uint64 lengths
  (``n`` = number of elements) followed by the concatenated bytes.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

import crc32c
import numpy as np

from .._spec import BFLOAT16, STRING, numpy_dtype
from ..errors import CorruptError

FORMAT_NAME = "ckptbridge"
FORMAT_VERSION = 1

ENC_RAW = "raw"
ENC_BF16 = "bfloat16-as-uint16"
ENC_STRINGS = "strings-v1"


def encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """The array as stored in an archive, and the encoding tag."""
    if dtype == STRING:
        return encode_strings(array), ENC_STRINGS
    if dtype == BFLOAT16:
        return array.view(np.uint16), ENC_BF16
    return array, ENC_RAW


def decode(stored: np.ndarray, dtype: str, shape: tuple[int, ...], encoding: str, where: str) -> np.ndarray:
    """Invert :func:`encode`; ``where`` names the tensor and file for messages."""
    if encoding == ENC_STRINGS:
        return decode_strings(stored, shape, where)
    want = numpy_dtype(dtype)
    if encoding == ENC_BF16:
        if stored.dtype != np.uint16:
            raise CorruptError(f"{where}: bfloat16 tensor stored as {stored.dtype}, expected uint16; the archive is damaged")
        out = stored.view(want)
    elif encoding == ENC_RAW:
        out = stored
        if out.dtype != want:
            raise CorruptError(f"{where}: metadata says {dtype} but the array is {out.dtype}; the archive is damaged")
    else:
        raise CorruptError(f"{where}: unknown encoding {encoding!r}; written by a newer ckptbridge? upgrade ckptbridge")
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
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CorruptError(f"{where}: string tensor must be stored as a 1-d uint8 blob, got {blob.dtype}{list(blob.shape)}; the archive is damaged")
    head = n * 8
    if n < 0 or head > blob.size:
        raise CorruptError(f"{where}: string blob too short for {n} lengths; the archive is damaged")
    lengths = np.frombuffer(blob[:head].tobytes(), dtype="<u8")
    if head + int(lengths.sum(dtype=np.uint64)) != blob.size:
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
    from .. import __version__

    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ckptbridge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
    }
    tf = sys.modules.get("tensorflow")
    doc["tensorflow_version"] = getattr(tf, "__version__", None) if tf is not None else None
    if extra:
        doc.update(extra)
    return doc


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def loads(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptError(f"{where}: ckptbridge metadata is not valid JSON ({e}); the archive is damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or not isinstance(doc.get("tensors", {}), dict):
        raise CorruptError(f"{where}: ckptbridge metadata has an unexpected layout; the archive is damaged")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise CorruptError(f"{where}: archive format version {doc.get('format_version')} is newer than this ckptbridge reads ({FORMAT_VERSION}); upgrade ckptbridge")
    return doc


# --- load-time checks shared by the archive readers (untrusted input) -------------

#: More dimensions than any tensor has; NumPy itself stops at 64.
MAX_NDIM = 64


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
    bad = next((c for c in name if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise CorruptError(f"{where}: tensor name {name!r} contains the control character {bad!r}; refusing the archive (rename the tensor where it was made)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CorruptError(f"{where}: tensor name {name!r} is not valid UTF-8; refusing the archive") from None


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
    if enc == ENC_STRINGS:
        n = 1
        for d in shape:
            n *= d
        ok = dtype == STRING and stored_dtype == np.uint8 and len(stored_shape) == 1 and stored_shape[0] >= 8 * n
    elif enc == ENC_BF16:
        ok = dtype == BFLOAT16 and stored_dtype == np.uint16 and tuple(stored_shape) == shape
    elif enc == ENC_RAW:
        try:
            want = numpy_dtype(dtype)
        except Exception:
            want = None
        ok = want is not None and dtype not in (STRING, BFLOAT16) and want == stored_dtype.newbyteorder("=") and tuple(stored_shape) == shape
    else:
        raise CorruptError(f"{where}: unknown encoding {str(enc)[:40]!r}; written by a newer ckptbridge? upgrade ckptbridge")
    if not ok:
        raise CorruptError(f"{where}: metadata says {dtype}{list(shape)} ({enc}) but the stored array is {stored_dtype}{list(stored_shape)}; the archive is damaged or crafted")
    return dtype, shape
