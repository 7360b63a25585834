"""Every TensorFlow dtype, and what ckptbridge does with it: one table for both engines and every format.

Each dtype is either **carried** (read, written and compared bit for bit) or
**not carried** (listed by ``ls``, compared and checked as stored bytes where the
native engine can, and refused by name on export unless it is excluded).
Nothing is skipped without being listed.

A carried dtype has an in-memory form (the exchange form every source returns)
and a storage form (what ``.npz`` and HDF5 hold).  Where NumPy stores the
dtype itself the two are the same and the archive's encoding is ``raw``.
Otherwise the archive stores the dtype's bit pattern in an integer dtype of the
same width and tags it, as ``bfloat16`` has always been tagged:

* ``bfloat16`` is held as ``ml_dtypes.bfloat16``, stored as ``uint16``;
* the float8, float4, int4 and int2 families, which TensorFlow keeps one value
  per byte, are held as their ``ml_dtypes`` types and stored as ``uint8``;
* the quantized types (``qint8``, ``quint8``, ``qint16``, ``quint16``,
  ``qint32``) are held as TensorFlow's own NumPy form, a one-field structured
  dtype such as ``[("qint8", "i1")]`` (``tf.qint8.as_numpy_dtype``), so the
  array itself says it is quantized; they are stored as the integer of that field.

The ``ml_dtypes`` types are named in the table, not imported with it: importing
``ml_dtypes`` costs up to a second (0.7.0), so it happens on the first use of such
a dtype's in-memory form (reading, writing or comparing a tensor of it), not for a
checkpoint that holds none.  Listing a checkpoint needs only names and widths.

This module imports nothing from the rest of ckptbridge but the error types.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping

import numpy as np

from .errors import FormatError, UncarriedDtypeError

STRING = "string"
BFLOAT16 = "bfloat16"
VARIANT = "variant"
RESOURCE = "resource"

ENC_RAW = "raw"
ENC_STRINGS = "strings-v1"


@dataclasses.dataclass(frozen=True)
class DType:
    """One dtype's entry in the table."""

    #: the canonical name: NumPy's for NumPy's own dtypes, else TensorFlow's (``bfloat16``, ``qint8``, ``variant``)
    name: str
    #: TensorFlow's DataType enum (types.proto)
    tf_enum: int
    #: the exchange form in memory, or the name of its ``ml_dtypes`` type (imported on first use, see :attr:`memory`);
    #: None when the dtype is not carried
    held: np.dtype | str | None = None
    #: what an archive stores (the memory form's bits in a NumPy integer dtype where NumPy lacks the dtype)
    storage: np.dtype | None = None
    #: the archive's encoding tag for this dtype
    encoding: str = ENC_RAW
    #: the safetensors dtype code, None where safetensors has no exact code
    safetensors: str | None = None
    #: for a dtype that is not carried: why, in a few words
    why_not: str = ""

    @property
    def memory(self) -> np.dtype | None:
        """The exchange form in memory (None when the dtype is not carried); an ``ml_dtypes`` type imports it now."""
        held = self.held
        return _ml_dtype(held) if isinstance(held, str) else held

    @property
    def carried(self) -> bool:
        return self.held is not None or self.name == STRING

    @property
    def itemsize(self) -> int:
        """Bytes per element in memory and in a checkpoint (0 for strings and dtypes not carried).

        The storage form has the memory form's width (a raw dtype is its own storage, a tagged one is stored
        as its bit pattern in an integer of the same width), so this needs no ``ml_dtypes``.
        """
        return 0 if self.held is None or self.name == STRING or self.storage is None else self.storage.itemsize


@functools.cache
def _ml_dtype(name: str) -> np.dtype:
    import ml_dtypes  # about a second with ml_dtypes 0.7.0: only for a tensor that has such a dtype

    scalar_type: type = getattr(ml_dtypes, name)
    return np.dtype(scalar_type)


def _native(name: str, enum: int, st: str | None) -> DType:
    dt = np.dtype(name)
    return DType(name, enum, dt, dt, ENC_RAW, st)


def _tagged(name: str, enum: int, memory: np.dtype | str, storage: str, st: str | None = None) -> DType:
    # A str names an ml_dtypes type, resolved on first use (DType.memory).
    return DType(name, enum, memory if isinstance(memory, str) else np.dtype(memory), np.dtype(storage), f"{name}-as-{storage}", st)


def _quantized(name: str, enum: int, base: str, st: str | None) -> DType:
    # TensorFlow's own NumPy form (tensorflow/python/framework/dtypes.py: _np_qint8 = np.dtype([("qint8", np.int8)])).
    return _tagged(name, enum, np.dtype([(name, base)]), base, st)


def _opaque(name: str, enum: int, why: str) -> DType:
    return DType(name, enum, why_not=why)


_TABLE: tuple[DType, ...] = (
    _native("float32", 1, "F32"),
    _native("float64", 2, "F64"),
    _native("int32", 3, "I32"),
    _native("uint8", 4, "U8"),
    _native("int16", 5, "I16"),
    _native("int8", 6, "I8"),
    DType(STRING, 7, np.dtype(object), np.dtype(np.uint8), ENC_STRINGS, None),
    _native("complex64", 8, "C64"),
    _native("int64", 9, "I64"),
    _native("bool", 10, "BOOL"),
    _quantized("qint8", 11, "int8", None),
    _quantized("quint8", 12, "uint8", None),
    _quantized("qint32", 13, "int32", None),
    # "bfloat16-as-uint16" is the tag archives have carried since the first release.
    _tagged(BFLOAT16, 14, "bfloat16", "uint16", "BF16"),
    _quantized("qint16", 15, "int16", None),
    _quantized("quint16", 16, "uint16", None),
    _native("uint16", 17, "U16"),
    _native("complex128", 18, None),
    _native("float16", 19, "F16"),
    _opaque(RESOURCE, 20, "a handle to a resource in a running TensorFlow process, not a value"),
    _opaque(VARIANT, 21, "an opaque TensorFlow object (such as a tf.data iterator's state), not an array"),
    _native("uint32", 22, "U32"),
    _native("uint64", 23, "U64"),
    _tagged("float8_e5m2", 24, "float8_e5m2", "uint8", "F8_E5M2"),
    _tagged("float8_e4m3fn", 25, "float8_e4m3fn", "uint8", "F8_E4M3"),
    _tagged("float8_e4m3fnuz", 26, "float8_e4m3fnuz", "uint8", "F8_E4M3FNUZ"),
    _tagged("float8_e4m3b11fnuz", 27, "float8_e4m3b11fnuz", "uint8"),
    _tagged("float8_e5m2fnuz", 28, "float8_e5m2fnuz", "uint8", "F8_E5M2FNUZ"),
    _tagged("int4", 29, "int4", "uint8"),
    _tagged("uint4", 30, "uint4", "uint8"),
    _tagged("int2", 31, "int2", "uint8"),
    _tagged("uint2", 32, "uint2", "uint8"),
    _tagged("float4_e2m1fn", 33, "float4_e2m1fn", "uint8"),
)

BY_NAME: Mapping[str, DType] = {d.name: d for d in _TABLE}
BY_ENUM: Mapping[int, DType] = {d.tf_enum: d for d in _TABLE}
BY_ENCODING: Mapping[str, DType] = {d.encoding: d for d in _TABLE if d.encoding != ENC_RAW}
#: the in-memory forms NumPy has without ml_dtypes; those of ml_dtypes join on first need (_by_memory)
_BY_MEMORY: dict[np.dtype, DType] = {d.held: d for d in _TABLE if isinstance(d.held, np.dtype) and d.name != STRING}
_ML_DTYPES_NAMED = tuple(d for d in _TABLE if isinstance(d.held, str))

#: canonical names of every dtype ckptbridge carries, in TensorFlow's enum order
CARRIED: tuple[str, ...] = tuple(d.name for d in _TABLE if d.carried)
#: the carried dtypes that hold fixed-size elements (all but strings)
NUMERIC: tuple[str, ...] = tuple(n for n in CARRIED if n != STRING)

#: DataType enums above the table that a newer TensorFlow may write: listed as not carried, not called damage
MAX_KNOWN_ENUM = 40


def by_enum(enum: int) -> DType | None:
    """The entry for a TensorFlow DataType enum; an unknown but plausible enum gets an opaque entry; 0 or absurd: None."""
    d = BY_ENUM.get(enum)
    if d is not None:
        return d
    if 0 < enum <= MAX_KNOWN_ENUM:
        return _opaque(f"DataType {enum}", enum, "a dtype this version of ckptbridge does not know")
    return None


def lookup(name: str) -> DType:
    """The entry for a canonical dtype name, or FormatError."""
    d = BY_NAME.get(name)
    if d is None:
        raise FormatError(f"unknown dtype {name!r}; ckptbridge carries {', '.join(CARRIED)}")
    return d


def numpy_dtype(name: str) -> np.dtype:
    """The in-memory NumPy dtype of a carried dtype (object for strings)."""
    d = lookup(name)
    if d.memory is None:
        raise FormatError(f"dtype {name} is not carried: it is {d.why_not}")
    return d.memory


def of_array(dt: np.dtype | type) -> DType:
    """The entry for an exchange array's dtype (object and ``S`` arrays are strings)."""
    dt = np.dtype(dt)
    if dt.kind in "OS":
        return BY_NAME[STRING]
    d = _by_memory(dt if dt.isnative else dt.newbyteorder("="))
    if d is None:
        raise FormatError(f"arrays of dtype {dt} cannot be carried; ckptbridge carries {', '.join(CARRIED)}")
    return d


def _by_memory(dt: np.dtype) -> DType | None:
    d = _BY_MEMORY.get(dt)
    if d is None and "ml_dtypes" in sys.modules:
        # An array of an ml_dtypes type exists only once ml_dtypes is imported: then its names are resolved.
        for e in _ML_DTYPES_NAMED:
            memory = e.memory  # never None: these entries hold a type's name
            if memory is not None:
                _BY_MEMORY.setdefault(memory, e)
        d = _BY_MEMORY.get(dt)
    return d


def to_storage(array: np.ndarray, d: DType) -> np.ndarray:
    """The array's bits in its storage dtype (a view: no copy)."""
    if d.storage is None or d.encoding == ENC_RAW or d.name == STRING:
        return array
    return array.view(d.storage)


def from_storage(stored: np.ndarray, d: DType) -> np.ndarray:
    """Invert :func:`to_storage` (a view)."""
    # A tagged dtype's own type: for bfloat16 or float8 this imports ml_dtypes, which a tensor of it needs.
    memory = None if d.encoding == ENC_RAW or d.name == STRING else d.memory
    return stored if memory is None else stored.view(memory)


def comparable(array: np.ndarray) -> np.ndarray:
    """A view NumPy can do arithmetic on: quantized arrays as their integers; others unchanged."""
    dt = array.dtype
    if dt.names is not None and len(dt.names) == 1 and dt.fields is not None:
        return array.view(dt.fields[dt.names[0]][0])
    return array


def by_name_or_opaque(name: str) -> DType:
    """The entry for a dtype name, or an opaque one for a name only a source knows (``DataType 40``)."""
    d = BY_NAME.get(name)
    return d if d is not None else _opaque(name, 0, "a dtype this version of ckptbridge does not know")


def uncarried_error(path: str, tensors: Mapping[str, str]) -> UncarriedDtypeError:
    """The one message for tensors whose dtype ckptbridge cannot carry, the same from every engine."""
    items = list(tensors.items())
    shown = ", ".join(f"{n!r} ({d}: {by_name_or_opaque(d).why_not})" for n, d in items[:5])
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    what, them = ("tensor", "it") if len(items) == 1 else (f"{len(items)} tensors", "them")
    return UncarriedDtypeError(f"{path}: {what} {shown}{more} cannot be carried by ckptbridge; "
                               f"leave {them} out to convert the rest", dict(tensors))
