"""A few metadata keys of a GGUF file, read without parsing the rest.

``gguf.GGUFReader`` builds a numpy view for every item of every array, which takes ~9 s on a
text GGUF with Qwen's 151 k tokens and merges; a runner needs a handful of keys (the eos list,
the chat template, sampling defaults) and llama.cpp exposes no array keys. This scans the
key-value section once, skipping the values nobody asked for (a string array is skipped by
its lengths alone), so the same file takes a fraction of a second.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
# GGUF value types: struct format of the fixed-size ones
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            if not keep:
                self.pos += struct.calcsize(fmt)
                return None
            return self.unpack(fmt)
        if vtype == _STRING:
            if not keep:
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                return None
            return self.string()
        if vtype == _ARRAY:
            item_type = self.unpack("<I")
            n = self.unpack("<Q")
            if item_type in _SCALARS and not keep:
                self.pos += n * struct.calcsize(_SCALARS[item_type])
                return None
            items = [self.value(item_type, keep) for _ in range(n)]
            return items if keep else None
        raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf_keys(path: str | Path, keys: Collection[str]) -> dict[str, Any]:
    """The values of those of ``keys`` that ``path`` holds (arrays as lists).

    Raises ``ValueError`` when the file is not GGUF v2/v3 or its key-value section is damaged.
    """
    wanted = set(keys)
    found: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        try:
            if buf[:4] != GGUF_MAGIC:
                raise ValueError("no GGUF magic")
            cur.pos = 4
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (2 and 3 are read)")
            cur.unpack("<Q")  # tensor count
            n_kv = cur.unpack("<Q")
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.unpack("<I")
                value = cur.value(vtype, key in wanted)
                if key in wanted:
                    found[key] = value
                    if len(found) == len(wanted):
                        break
        except struct.error as exc:
            raise ValueError(f"truncated key-value section ({exc})") from exc
    return found
