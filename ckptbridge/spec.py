"""The exchange model between layers: a tensor's name, dtype and shape.

dtypes are named by canonical strings: NumPy's names for what NumPy stores
natively, TensorFlow's for the rest (``"bfloat16"``, ``"float8_e4m3fn"``,
``"qint8"``, ``"variant"``...) and ``"string"`` (held as an object array of
``bytes``).  ``_dtypes`` has the table of them all and how each is held.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import _dtypes

STRING = _dtypes.STRING
BFLOAT16 = _dtypes.BFLOAT16

# Every dtype a TensorFlow checkpoint can hold that ckptbridge carries (the table is in _dtypes).
NUMERIC_DTYPES = _dtypes.NUMERIC
ALL_DTYPES = _dtypes.CARRIED


def numpy_dtype(dtype: str) -> np.dtype:
    """The in-memory NumPy dtype for a canonical dtype name."""
    return _dtypes.numpy_dtype(dtype)


def dtype_name(dt: np.dtype | type, *, sample: np.ndarray | None = None) -> str:
    """The canonical dtype name of an exchange array's dtype (object arrays must hold bytes)."""
    return _dtypes.of_array(dt).name


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What is known about a tensor before it is read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: bytes the source stores for it, where known without reading and different from :attr:`nbytes`
    #: (strings, dtypes not carried); None: unknown
    stored_nbytes: int | None = dataclasses.field(default=None, compare=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def carried(self) -> bool:
        """Whether ckptbridge can read and write this tensor's values (see ``_dtypes``)."""
        d = _dtypes.BY_NAME.get(self.dtype)
        return d is not None and d.carried

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's values (strings and dtypes not carried: 0, see :attr:`stored_nbytes`)."""
        d = _dtypes.BY_NAME.get(self.dtype)
        return 0 if d is None else self.size * d.itemsize

    @property
    def size_on_disk(self) -> int | None:
        """Bytes this tensor takes: :attr:`nbytes`, or what the source stores for strings and opaque dtypes (None: unknown)."""
        if self.stored_nbytes is not None:
            return self.stored_nbytes
        d = _dtypes.BY_NAME.get(self.dtype)
        return self.nbytes if d is not None and d.itemsize else None

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
