"""The peer's second step: llama.cpp's quantizer (``llama_model_quantize``, the C API behind
``llama-quantize``) on a GGUF, in this process, as ``llama-quantize IN OUT TYPE NTHREADS``.

    python bench/peer_quantize.py in-F16.gguf out-Q4_K_M.gguf q4_k_m [--imatrix F] [--threads 2]

With ``--imatrix`` it passes the weight vectors llama-quantize's ``load_imatrix`` builds from
the file (mmconvert's reader computes them the same way; tests/test_imatrix.py proves the
bytes equal) as the ``{name, data, size}`` array the C API takes.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np


def quantize(src: str, dst: str, mixture: str, threads: int, imatrix: str | None) -> int:
    import llama_cpp

    from mmconvert.formats.gguf_constants import file_type

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(mixture.upper()))
    params.nthread = threads
    keep: list = []
    if imatrix:
        from mmconvert.formats.imatrix import read_imatrix

        im = read_imatrix(imatrix)
        names = sorted(im.entries)
        vectors = [np.ascontiguousarray(im.weights(n), np.float32) for n in names]
        entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        encoded = [n.encode() for n in names]
        for entry, name, vec in zip(entries, encoded, vectors):
            entry.name, entry.size = name, vec.size
            entry.data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(names)].name = None
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep += [entries, encoded, vectors]  # alive until the call returns
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("mixture", help="q4_k_m, q6_k, ...")
    parser.add_argument("--imatrix", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rc = quantize(args.src, args.dst, args.mixture, args.threads, args.imatrix)
    if rc:
        print(f"llama_model_quantize failed (rc {rc})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
