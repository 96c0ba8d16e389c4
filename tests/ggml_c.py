"""ggml's own C quantizers, called through ctypes from the installed llama-cpp-python wheel.

The wheel ships ``libggml-base.so``; ``ggml_quantize_chunk`` there is what ``llama-quantize``
calls for every tensor (gguf-py's ``tests/test_quants.py`` calls it the same way). Tests compare
mmconvert's kernels with these bytes block for block. :func:`libggml` skips the test with a
reason when the wheel is absent.

Example::

    ggml = libggml()
    data = ggml.quantize(rows, "Q4_K")                 # uint8 (nrows, nbytes_per_row)
    data = ggml.quantize(rows, "Q4_K", imatrix=w)      # w: float32 (n_per_row,)
    back = ggml.dequantize(data, "Q4_K", rows.shape[-1])
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest

_F32P = ctypes.POINTER(ctypes.c_float)


class LibGGML:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = (ctypes.c_int, _F32P, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, _F32P)
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = (ctypes.c_int,)
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = (ctypes.c_int, ctypes.c_int64)
        self.lib, self.path = lib, path

    @staticmethod
    def _type_id(ggml_type: str) -> int:
        from gguf import GGMLQuantizationType

        return int(GGMLQuantizationType[ggml_type])

    def row_size(self, ggml_type: str, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(self._type_id(ggml_type), n_per_row))

    def quantize(self, rows: np.ndarray, ggml_type: str,
                 imatrix: np.ndarray | None = None) -> np.ndarray:
        """``ggml_quantize_chunk`` of float32 ``rows`` (nrows, n_per_row): uint8 bytes per row."""
        rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, rows.shape[-1])
        nrows, n = rows.shape
        out = np.zeros((nrows, self.row_size(ggml_type, n)), np.uint8)
        weights = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert imatrix.shape == (n,), imatrix.shape
            weights = imatrix.ctypes.data_as(_F32P)
        written = self.lib.ggml_quantize_chunk(self._type_id(ggml_type), rows.ctypes.data_as(_F32P),
                                               out.ctypes.data, 0, nrows, n, weights)
        assert written == out.size, (written, out.size)
        return out

    def dequantize(self, data: np.ndarray, ggml_type: str, n_per_row: int) -> np.ndarray:
        """``dequantize_row_<type>`` of every row of ``data``: float32 (nrows, n_per_row)."""
        name = ggml_type.lower().replace("_k", "_K")  # dequantize_row_q4_K, dequantize_row_iq4_nl
        func = getattr(self.lib, "dequantize_row_" + name)
        func.restype = None
        func.argtypes = (ctypes.c_void_p, _F32P, ctypes.c_int64)
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, self.row_size(ggml_type,
                                                                                    n_per_row))
        out = np.empty((data.shape[0], n_per_row), np.float32)
        for i in range(data.shape[0]):
            func(data[i].ctypes.data, out[i].ctypes.data_as(_F32P), n_per_row)
        return out


@functools.cache
def _load() -> LibGGML | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml-base.so*")) or sorted(lib_dir.glob("libggml-base*"))
    return LibGGML(found[0]) if found else None


def libggml() -> LibGGML:
    """The wheel's libggml-base; skips the calling test when llama-cpp-python is absent."""
    lib = _load()
    if lib is None:
        pytest.skip("llama-cpp-python (with libggml-base.so) is not installed: make install-llama")
    return lib


# ---------------------------------------------------------------------------------------------
# the CPU backend: how its matmuls convert their inputs


class _CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class LibGGMLCpu:
    """``libggml-cpu.so``: the type each weight type's matmul converts its input to
    (``vec_dot_type``) and the converter itself (``from_float``, what a matmul runs)."""

    def __init__(self, cpu_path: Path, base: LibGGML) -> None:
        lib = ctypes.CDLL(str(cpu_path))
        lib.ggml_cpu_init.restype = None
        lib.ggml_cpu_init()  # the F16 tables
        lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
        lib.ggml_get_type_traits_cpu.argtypes = (ctypes.c_int,)
        base.lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        base.lib.ggml_get_type_traits.argtypes = (ctypes.c_int,)
        self.lib, self.base = lib, base

    def vec_dot_type(self, ggml_type: str) -> str:
        from gguf import GGMLQuantizationType

        code = self.lib.ggml_get_type_traits_cpu(LibGGML._type_id(ggml_type)).contents.vec_dot_type
        return GGMLQuantizationType(code).name

    def convert_input(self, x: np.ndarray, ggml_type: str) -> np.ndarray:
        """float32 rows ``x`` as a ``ggml_type`` matmul sees them: the CPU ``from_float`` of
        its ``vec_dot_type``, then that type's ``to_float`` (float32, same shape)."""
        name = self.vec_dot_type(ggml_type)
        kind = LibGGML._type_id(name)
        convert = _ROW_FN(self.lib.ggml_get_type_traits_cpu(kind).contents.from_float)
        to_float = self.base.lib.ggml_get_type_traits(kind).contents.to_float
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        n = rows.shape[1]
        packed = np.zeros(self.base.row_size(name, n), np.uint8)
        out = np.empty_like(rows)
        for i in range(rows.shape[0]):
            convert(rows[i].ctypes.data, packed.ctypes.data, n)
            if to_float:
                _ROW_FN(to_float)(packed.ctypes.data, out[i].ctypes.data, n)
            else:  # Q8_1 and Q8_K have no to_float: read their blocks here
                out[i] = _dequantize_q8_input(packed, name)
        return out.reshape(x.shape)


def _dequantize_q8_input(packed: np.ndarray, name: str) -> np.ndarray:
    """``d * qs`` of Q8_1 blocks (f16 d, f16 s, int8 qs[32]) or Q8_K blocks (f32 d,
    int8 qs[256], int16 bsums[16]), block layouts of ggml-common.h."""
    if name == "Q8_1":
        blocks = packed.reshape(-1, 36)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:].view(np.int8).astype(np.float32)
    else:
        blocks = packed.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        qs = blocks[:, 4:260].view(np.int8).astype(np.float32)
    return (d * qs).reshape(-1)


def libggml_cpu() -> LibGGMLCpu:
    """The wheel's libggml-cpu (beside libggml-base); skips the test when it is absent."""
    base = libggml()
    found = sorted(base.path.parent.glob("libggml-cpu.so*"))
    if not found:
        pytest.skip(f"no libggml-cpu beside {base.path}")
    return LibGGMLCpu(found[0], base)
