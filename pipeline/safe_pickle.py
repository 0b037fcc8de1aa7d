"""A restricted unpickler for data files that are pickles (CALVIN's auto_lang_ann.npy): numpy arrays and plain containers only."""

from __future__ import annotations

import io
import pickle

import numpy as np
from numpy.lib import format as npy_format

# What np.save of an object array (and np.save of nested numeric arrays) needs to be rebuilt; nothing
# that can run code. Plain containers, strings and numbers need no globals at all.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.dtypes", "Float32DType"), ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Int64DType"),
    ("numpy.dtypes", "Int32DType"), ("numpy.dtypes", "ObjectDType"), ("numpy.dtypes", "StrDType"),
    ("builtins", "slice"), ("codecs", "encode"),
}


class UnsafePickle(pickle.UnpicklingError):
    """The file asks for something beyond numpy arrays and plain containers."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise UnsafePickle(f"refused to load global {module}.{name}: only numpy arrays and plain containers "
                               "are read from data pickles")
        return super().find_class(module, name)


def load_pickled_npy(path) -> object:
    """np.load(path, allow_pickle=True) without running pickled code: the .npy header is parsed, then its
    object payload goes through RestrictedUnpickler. Returns the array (0-d object arrays: their item)."""
    with open(path, "rb") as f:
        version = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        try:
            array = RestrictedUnpickler(io.BytesIO(f.read())).load()
        except UnsafePickle:
            raise
        except Exception as e:  # a truncated or corrupt pickle is a clear error, not a crash deep inside
            raise pickle.UnpicklingError(f"{path}: cannot read the pickled payload: {type(e).__name__}: {e}") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise pickle.UnpicklingError(f"{path}: payload is not the {shape} array its header announces")
    return array.item() if array.shape == () else array
