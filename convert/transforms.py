"""Tensor surgery as small pure functions on numpy arrays, each with its inverse.

Every function takes and returns storage arrays (BF16 as uint16 bit patterns where a function
only moves data; value-changing ones work in float32). Plans attach them to lazy tensors with
:meth:`TensorRef.derive`, which records the step name for ``--dry-run`` and the manifest.
"""

from __future__ import annotations

import numpy as np

# --- vocabulary rows -----------------------------------------------------------------------


def pad_rows(matrix: np.ndarray, rows: int) -> np.ndarray:
    """Append zero rows up to ``rows`` (inverse: :func:`trim_rows`)."""
    if rows < matrix.shape[0]:
        raise ValueError(f"cannot pad {matrix.shape[0]} rows down to {rows}")
    out = np.zeros((rows, *matrix.shape[1:]), dtype=matrix.dtype)
    out[: matrix.shape[0]] = matrix
    return out


def trim_rows(matrix: np.ndarray, rows: int) -> np.ndarray:
    """Keep the first ``rows`` rows (inverse of :func:`pad_rows`)."""
    if rows > matrix.shape[0]:
        raise ValueError(f"cannot trim {matrix.shape[0]} rows up to {rows}")
    return matrix[:rows]


# --- fused gate/up ---------------------------------------------------------------------------


def split_gate_up(fused: np.ndarray, gate_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``[2I, H]`` (or ``[E, 2I, H]``) -> (gate, up), halves along the ``2I`` axis."""
    axis = fused.ndim - 2
    half = fused.shape[axis] // 2
    if fused.shape[axis] != 2 * half:
        raise ValueError(f"fused gate/up axis has odd length {fused.shape[axis]}")
    first, second = np.split(fused, 2, axis=axis)
    return (first, second) if gate_first else (second, first)


def fuse_gate_up(gate: np.ndarray, up: np.ndarray, gate_first: bool = True) -> np.ndarray:
    """Inverse of :func:`split_gate_up`."""
    axis = gate.ndim - 2
    return np.concatenate((gate, up) if gate_first else (up, gate), axis=axis)


# --- rope layouts ----------------------------------------------------------------------------


def interleaved_to_neox(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K output rows of each head from interleaved pairs (x0,x1),(x2,x3)... to
    rotate-half (x0,x2,...,x1,x3,...). ``weight`` is ``[n_heads*head_dim, ...]``."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    w = weight.reshape(n_heads, head_dim // 2, 2, *rest)
    return np.ascontiguousarray(np.swapaxes(w, 1, 2)).reshape(weight.shape)


def neox_to_interleaved(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`interleaved_to_neox`."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    w = weight.reshape(n_heads, 2, head_dim // 2, *rest)
    return np.ascontiguousarray(np.swapaxes(w, 1, 2)).reshape(weight.shape)


# --- scalar tanh gates -----------------------------------------------------------------------
#
# A learned gate g is used as ``tanh(g) * x`` (or ``(1 - tanh(g)) * x``). Runtimes that only
# multiply get the multiplier; the HF bundle keeps g itself. The pair below is an inverse only
# up to rounding, and no float32 function can do better: tanh maps many float32 inputs onto one
# output (its slope is below 1, and above |g| ~ 9.01 every g rounds to exactly 1.0), so g cannot
# be recovered bit for bit from tanh(g). What *is* bit-exact is keeping g: the HF bundle stores
# the raw parameter, and the GGUF multiplier is this deterministic function of it.


def apply_tanh_gate(gate: np.ndarray, complementary: bool = False) -> np.ndarray:
    """The multiplier a runtime applies, ``tanh(g)`` or ``1 - tanh(g)``, from float values of
    ``g``; computed in float64 and rounded once to float32 (so it is the float32 nearest the
    true value, whatever numpy's float32 tanh does)."""
    t = np.tanh(np.asarray(gate, dtype=np.float64))
    return ((1.0 - t) if complementary else t).astype(np.float32)


def unapply_tanh_gate(multiplier: np.ndarray, complementary: bool = False) -> np.ndarray:
    """Inverse of :func:`apply_tanh_gate` (``atanh``, in float64, rounded to float32), for
    multipliers strictly inside the open interval tanh maps onto (see above for its accuracy)."""
    m = np.asarray(multiplier, dtype=np.float64)
    return np.arctanh(1.0 - m if complementary else m).astype(np.float32)


# --- folding adjacent linear maps --------------------------------------------------------------


def fold_linear(weights: list[np.ndarray], biases: list[np.ndarray | None]
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Linear maps applied in order (``x -> x W1^T + b1 -> ... -> x Wn^T + bn``, nothing in
    between) as one: ``W = Wn @ ... @ W1`` and ``b = Wn (... (W2 b1 + b2) ...) + bn``, computed in
    float64 (the caller rounds once). ``None`` bias when no map has one.

    No inverse: a product has infinitely many factorisations, so a folded bundle is checked by
    recomputing the fold from the source and by logit parity instead of a round trip.
    """
    w = np.asarray(weights[0], dtype=np.float64)
    b = None if biases[0] is None else np.asarray(biases[0], dtype=np.float64)
    for wk, bk in zip(weights[1:], biases[1:]):
        wk = np.asarray(wk, dtype=np.float64)
        if wk.shape[1] != w.shape[0]:
            raise ValueError(f"cannot fold: a map to {w.shape[0]} values feeds one taking "
                             f"{wk.shape[1]}")
        b = None if b is None else wk @ b
        if bk is not None:
            b = np.asarray(bk, dtype=np.float64) + (0.0 if b is None else b)
        w = wk @ w
    return w, b
