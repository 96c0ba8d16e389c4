"""Tensor dtypes as safetensors names them, stored in numpy.

numpy has no bfloat16, so BF16 data travels as ``uint16`` bit patterns and is widened with a
shift. Keeping the conversion path in numpy lets the GGUF and safetensors writers run without
importing torch (torch alone costs ~220 MB of RSS).
"""

from __future__ import annotations

import numpy as np

# safetensors dtype name -> numpy storage dtype (BF16 stored as its raw 16-bit pattern)
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
DTYPE_FROM_TORCH = {v: k for k, v in TORCH_NAMES.items()}


def itemsize(dtype: str) -> int:
    return STORAGE_DTYPES[dtype].itemsize


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns, nearest-even, NaN kept quiet (as torch does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(data)
    return data.astype(np.float32, copy=False)


def convert(data: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast storage array ``data`` of dtype ``src`` to dtype ``dst`` (both safetensors names)."""
    if src == dst:
        return data
    if dst == "BF16":
        return f32_to_bf16(to_float32(data, src))
    if src == "BF16":
        return bf16_to_f32(data).astype(STORAGE_DTYPES[dst], copy=False)
    return data.astype(STORAGE_DTYPES[dst])


def to_torch(data: np.ndarray, dtype: str):
    """A torch tensor sharing ``data``'s memory when possible (BF16 reinterpreted)."""
    import torch

    if dtype == "BF16":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(data))


def from_torch(tensor) -> tuple[np.ndarray, str]:
    """(storage array, dtype name) for a CPU torch tensor."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPE_FROM_TORCH:
        raise TypeError(f"unsupported torch dtype {tensor.dtype}")
    dtype = DTYPE_FROM_TORCH[name]
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), dtype
    return tensor.numpy(), dtype
