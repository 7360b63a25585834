"""The exchange model between layers: a tensor's name, dtype and shape.

dtypes are named by canonical strings: NumPy's names for what NumPy stores
natively, plus ``"bfloat16"`` (held in memory as ``ml_dtypes.bfloat16``) and
``"string"`` (held as an object array of ``bytes``).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from .errors import FormatError

STRING = "string"
BFLOAT16 = "bfloat16"

# Every dtype a TensorFlow checkpoint can hold that ckptbridge carries.
NUMERIC_DTYPES = (
    "float16", "float32", "float64", "bfloat16",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool", "complex64", "complex128",
)
ALL_DTYPES = NUMERIC_DTYPES + (STRING,)


def numpy_dtype(dtype: str) -> np.dtype:
    """The in-memory NumPy dtype for a canonical dtype name."""
    if dtype == STRING:
        return np.dtype(object)
    if dtype == BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    if dtype not in NUMERIC_DTYPES:
        raise FormatError(f"unsupported dtype {dtype!r}; ckptbridge carries {', '.join(ALL_DTYPES)}")
    return np.dtype(dtype)


def dtype_name(dt: np.dtype | type, *, sample: np.ndarray | None = None) -> str:
    """The canonical dtype name of a NumPy dtype (object arrays must hold bytes)."""
    dt = np.dtype(dt)
    if dt == np.dtype(object):
        return STRING
    if dt == np.dtype(ml_dtypes.bfloat16):
        return BFLOAT16
    if dt.kind == "S":
        return STRING
    name = dt.name
    if name not in NUMERIC_DTYPES:
        raise FormatError(f"unsupported dtype {dt}; ckptbridge carries {', '.join(ALL_DTYPES)}")
    # Normalise byte order: archives may hold big-endian arrays.
    return name


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What is known about a tensor before it is read."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's values (for strings: 0, unknown before reading)."""
        if self.dtype == STRING:
            return 0
        return self.size * numpy_dtype(self.dtype).itemsize

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def as_exchange_array(value: object) -> np.ndarray:
    """Normalise a value read from any source to the exchange form.

    0-d values become 0-d arrays; fixed-width byte strings become object arrays
    of ``bytes``; non-native byte order becomes native.
    """
    arr = np.asarray(value)
    if arr.dtype.kind == "S":
        out = np.empty(arr.shape, dtype=object)
        flat = out.reshape(-1)
        for i, v in enumerate(arr.reshape(-1)):
            flat[i] = bytes(v)
        return out
    if arr.dtype.kind == "O":
        return arr
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def string_nbytes(arr: np.ndarray) -> int:
    return int(sum(len(b) for b in arr.reshape(-1)))


def array_nbytes(arr: np.ndarray) -> int:
    """Bytes of an exchange array's values (strings: sum of their lengths)."""
    if arr.dtype == np.dtype(object):
        return string_nbytes(arr)
    return int(arr.nbytes)
