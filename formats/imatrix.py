"""llama.cpp's importance-matrix files: read both formats, write the GGUF one, and turn an
entry into the weight vector llama-quantize hands to ``ggml_quantize_chunk``.

Formats (llama.cpp of the pinned version: ``common/imatrix-loader.cpp``, ``tools/imatrix``):

* **GGUF** (what ``llama-imatrix`` writes by default): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size``
  (UINT32); per weight ``<name>.in_sum2`` (F32, ne ``[n_per_row, n_mat]``: the raw sums of
  squared input activations, one row per expert) and ``<name>.counts`` (F32, ne ``[1, n_mat]``:
  the tokens each row was summed over). ``n_mat`` is 1 for a dense weight (ggml then stores
  1-D tensors: ``gguf`` trims trailing dimensions of 1).
* **legacy ``.dat``**: ``i32 n_entries``, then per entry ``i32 len, name[len], i32 ncall,
  i32 nval, f32 values[nval]`` where ``values = sum / count * ncall`` (an expert with no
  tokens stored as ``1 * ncall``), then an optional trailer ``i32 chunk_count, i32 len,
  dataset[len]``. llama-quantize reads a file as GGUF when ``gguf_init_from_file`` accepts it,
  else as legacy: here the GGUF magic decides.

The weight vector (llama-quantize's ``load_imatrix``): GGUF ``in_sum2 / count`` per expert row
in float32, with counts read as ``lround`` of the stored float, and an expert with count 0 (no
tokens routed to it) all ones; legacy ``values / ncall`` (``values`` as they are when
``ncall`` is 0). For a 3-D expert tensor ``[n_expert, rows, n_per_row]`` expert ``e`` gets
``vector[e * n_per_row:(e + 1) * n_per_row]`` (``llama_tensor_quantize_impl``'s
``imatrix + expert * n_per_row``). llama-quantize refuses a GGUF file without the three
``imatrix.*`` keys and a vector holding a non-finite value; so does this module, and it refuses
negative values and counts too (sums of squares are never negative; llama.cpp would quantize
with them and write garbage).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmconvert.errors import ImatrixError

SUMS_SUFFIX, COUNTS_SUFFIX = ".in_sum2", ".counts"
GENERAL_TYPE = "imatrix"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = ("imatrix.datasets", "imatrix.chunk_count",
                                                 "imatrix.chunk_size")
ALIGNMENT = 32  # gguf's default, which llama-imatrix writes
MAX_NAME_BYTES = 63 - len(SUMS_SUFFIX)  # GGML_MAX_NAME (64 with its NUL) holds name + suffix
# a weight's name as llama.cpp writes them (blk.3.ffn_down_exps.weight); anything else in an
# entry name (NUL, control characters, path separators) means a damaged or hostile file
_NAME = re.compile(rf"[A-Za-z0-9_.+\-]{{1,{MAX_NAME_BYTES}}}")
_I32 = struct.Struct("<i")
_NOT_COLLECTED = ("token_embd.weight", "output.weight")


@dataclass
class ImatrixEntry:
    """One weight's statistics. ``sums``: float32, flat (``n_mat * n_per_row``). ``counts``:
    int64 ``(n_mat,)`` tokens per row (GGUF), or ``(1,)`` holding ``ncall`` (legacy, whose
    sums are already means times ``ncall``)."""

    sums: np.ndarray
    counts: np.ndarray


@dataclass
class Imatrix:
    """A parsed importance-matrix file (or one :func:`write_imatrix_gguf` is about to write)."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str | None = None

    def weights(self, name: str) -> np.ndarray:
        """The float32 vector llama-quantize passes for tensor ``name`` (flat; expert ``e`` of
        a 3-D tensor uses ``[e * n_per_row:(e + 1) * n_per_row]``)."""
        e = self.entries[name]
        sums = e.sums.astype(np.float32, copy=False)
        if self.legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            out = sums / np.float32(ncall) if ncall > 0 else sums.copy()
        else:
            n_mat = e.counts.size
            per_row = sums.reshape(n_mat, -1)
            count = e.counts.astype(np.float32)[:, None]  # C: (float) int64 count
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(count > 0, per_row / np.where(count > 0, count, 1),
                               np.float32(1)).astype(np.float32).reshape(-1)
        if not np.isfinite(out).all():
            raise ImatrixError(f"{self._where()}imatrix entry {name} holds a non-finite value "
                               "(llama-quantize refuses it too)", path=self.path, name=name)
        return out

    def _where(self) -> str:
        return f"{self.path}: " if self.path else ""


# ---------------------------------------------------------------------------------------------
# reading


def read_imatrix(path: str | Path) -> Imatrix:
    """Parse an imatrix file of either format; :class:`ImatrixError` (one line) when it is not
    one, is damaged, or lacks what llama-quantize requires."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"--imatrix {path}: no such file", path=path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    from mmconvert.formats.gguf_reader import GGUFReader

    where = f"{path}: "
    try:
        reader = GGUFReader(path)
    except ValueError as exc:
        raise ImatrixError(f"{where}not a readable GGUF imatrix ({exc})", path=path) from None
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in reader]
    if missing:  # llama-quantize: "missing imatrix metadata"
        raise ImatrixError(f"{where}GGUF imatrix without {', '.join(missing)} (llama-quantize "
                           "refuses it too); is this an imatrix file?", path=path)
    try:
        datasets = [str(d) for d in reader.array(KEY_DATASETS, "STRING")]
        chunk_count = int(reader.value(KEY_CHUNK_COUNT))
        chunk_size = int(reader.value(KEY_CHUNK_SIZE))
    except (ValueError, TypeError) as exc:
        raise ImatrixError(f"{where}bad imatrix metadata ({exc})", path=path) from None
    pairs: dict[str, list] = {}
    for name in reader.tensors:
        for suffix, slot in ((SUMS_SUFFIX, 0), (COUNTS_SUFFIX, 1)):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = name
    if not pairs:
        raise ImatrixError(f"{where}no imatrix entries (<name>.in_sum2 / <name>.counts)",
                           path=path)
    entries: dict[str, ImatrixEntry] = {}
    for name, (sums_name, counts_name) in sorted(pairs.items()):
        _check_name(name, path)
        if sums_name is None or counts_name is None:
            raise ImatrixError(f"{where}entry {name} has "
                               f"{'no .in_sum2' if sums_name is None else 'no .counts'} tensor "
                               "(mismatched sums and counts)", path=path, name=name)
        infos = reader.tensors[sums_name], reader.tensors[counts_name]
        bad = [i.name for i in infos if i.type_name != "F32"]
        if bad:
            raise ImatrixError(f"{where}{bad[0]} is {reader.tensors[bad[0]].type_name}; imatrix "
                               "sums and counts are F32", path=path, name=name)
        sums = reader.tensor_bytes(sums_name).view("<f4").astype(np.float32)
        raw_counts = reader.tensor_bytes(counts_name).view("<f4").astype(np.float64)
        if raw_counts.size == 0 or sums.size == 0 or sums.size % raw_counts.size:
            raise ImatrixError(f"{where}entry {name}: {sums.size} sums for {raw_counts.size} "
                               "counts (the sums must be whole rows, one per count)",
                               path=path, name=name)
        if not np.isfinite(raw_counts).all() or (raw_counts < 0).any():
            raise ImatrixError(f"{where}entry {name}: counts must be finite and >= 0",
                               path=path, name=name)
        _check_sums(sums, name, path)
        # std::lround: halves away from zero (exact in float64 for any float32 input)
        counts = np.floor(raw_counts + 0.5).astype(np.int64)
        entries[name] = ImatrixEntry(sums, counts)
    return Imatrix(entries, datasets, chunk_count, chunk_size, legacy=False, path=str(path))


def _read_legacy(path: Path) -> Imatrix:
    where = f"{path}: "
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    pos = 0

    def i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > size:
            raise ImatrixError(f"{where}truncated legacy imatrix: {what} runs past the end "
                               f"(byte {pos} of {size}); not an imatrix file?", path=path)
        (value,) = _I32.unpack_from(buf, pos)
        pos += 4
        return value

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise ImatrixError(f"{where}legacy imatrix: {what} of {n} bytes at byte {pos} does "
                               f"not fit the file ({size} bytes); damaged or not an imatrix",
                               path=path)
        raw = bytes(buf[pos:pos + n])
        pos += n
        return raw

    n_entries = i32("the entry count")
    # each entry takes at least 17 bytes (len, a 1-byte name, ncall, nval, one value)
    if n_entries < 1 or n_entries > size // 17:
        raise ImatrixError(f"{where}not an imatrix file (neither GGUF nor legacy: "
                           f"{n_entries} entries in {size} bytes)", path=path)
    entries: dict[str, ImatrixEntry] = {}
    for index in range(n_entries):
        length = i32(f"entry {index + 1}'s name length")
        if not 0 < length <= 4 * MAX_NAME_BYTES:
            raise ImatrixError(f"{where}legacy imatrix entry {index + 1}: a name of {length} "
                               "bytes (damaged or not an imatrix)", path=path)
        raw = take(length, f"entry {index + 1}'s name")
        name = raw.decode("utf-8", errors="replace")
        _check_name(name, path)
        if name in entries:
            raise ImatrixError(f"{where}entry {name} appears twice", path=path, name=name)
        ncall = i32(f"entry {name}'s ncall")
        nval = i32(f"entry {name}'s value count")
        if nval < 1 or nval > (size - pos) // 4:
            raise ImatrixError(f"{where}legacy imatrix entry {name}: {nval} values do not fit "
                               f"the {size - pos} bytes left", path=path, name=name)
        sums = np.frombuffer(take(4 * nval, f"entry {name}'s values"), "<f4").astype(np.float32)
        _check_sums(sums, name, path)
        entries[name] = ImatrixEntry(sums, np.array([ncall], np.int64))
    chunk_count, datasets = 0, []
    if pos < size:  # the optional trailer: chunk count, then the dataset's name
        chunk_count = i32("the chunk count")
        length = i32("the dataset name's length")
        if length > 0:
            datasets.append(take(length, "the dataset name").split(b"\0")[0]
                            .decode("utf-8", errors="replace"))
        if pos != size:
            raise ImatrixError(f"{where}{size - pos} unexpected bytes after the legacy "
                               "imatrix's trailer (damaged file?)", path=path)
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True, path=str(path))


def _check_name(name: str, path: Path) -> None:
    if not _NAME.fullmatch(name):
        shown = name[:60].encode("unicode_escape").decode("ascii")
        raise ImatrixError(f"{path}: imatrix entry name {shown!r} is not a tensor name "
                           f"(letters, digits, . _ + -, at most {MAX_NAME_BYTES} bytes)",
                           path=path)


def _check_sums(sums: np.ndarray, name: str, path: Path) -> None:
    # a NaN in an expert no token reached is harmless to llama-quantize (its row becomes ones);
    # refusing only what it refuses would need the counts: check the final vector instead
    # (Imatrix.weights) and refuse here only what no sum of squares can be
    if (sums < 0).any():
        raise ImatrixError(f"{path}: imatrix entry {name} holds negative values (sums of "
                           "squares never are: damaged file)", path=path, name=name)


# ---------------------------------------------------------------------------------------------
# fitting a model


@dataclass(frozen=True)
class WeightSlot:
    """A model tensor an imatrix may feed: GGUF name, numpy shape, the type it is written as
    and whether llama-quantize would refuse to write it without importance weights."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    uses_imatrix: bool = True
    requires_imatrix: bool = False


@dataclass
class ImatrixFit:
    """What :func:`fit_imatrix` found: name -> weight vector for the tensors that get one,
    and the warnings to print (one line each)."""

    weights: dict[str, np.ndarray]
    warnings: list[str]


def expected_size(shape: Sequence[int]) -> int:
    """llama-quantize's ``ne[0] * ne[2]``: the row length, times the experts of a 3-D tensor."""
    return int(shape[-1]) * (int(shape[0]) if len(shape) == 3 else 1)


def fit_imatrix(imatrix: Imatrix, slots: Sequence[WeightSlot],
                model_names: Sequence[str] = ()) -> ImatrixFit:
    """Check ``imatrix`` against the model and pick each quantized tensor's weight vector.

    ``slots``: the model's tensors of two or more dimensions (its matmul weights, the token
    embedding included); ``model_names``: every other tensor name of the model. An entry that
    names no tensor of the model, or a 1-D one, is an error (an imatrix of another model); a
    wrong size is an error, as in llama-quantize (which forgives it for ``token_embd`` only,
    and quantizes that without weights). A quantized tensor without an entry is quantized
    without weights (llama-quantize logs each; here one warning line counts them, leaving out
    token_embd and output, which llama-imatrix does not collect by default), unless its type
    requires an imatrix (llama-quantize refuses: so does this).
    """
    by_name = {s.name: s for s in slots}
    where = f"{imatrix.path}: " if imatrix.path else ""
    unknown = [n for n in imatrix.entries if n not in by_name]
    if unknown:
        vectors = [n for n in unknown if n in set(model_names)]
        what = ("names 1-D tensors" if vectors and len(vectors) == len(unknown)
                else "names tensors this model does not have")
        raise ImatrixError(f"{where}the imatrix {what}: {_some(unknown)} (computed for another "
                           "model?)", path=imatrix.path, name=unknown[0])
    weights: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for name, entry in imatrix.entries.items():
        slot = by_name[name]
        want = expected_size(slot.shape)
        if entry.sums.size != want:
            if name == "token_embd.weight":
                notes.append(f"imatrix entry token_embd.weight has {entry.sums.size} values "
                             f"for rows of {want}: not used (as llama-quantize)")
                continue
            experts = f" x {slot.shape[0]} experts" if len(slot.shape) == 3 else ""
            raise ImatrixError(f"{where}imatrix entry {name} has {entry.sums.size} values; the "
                               f"model's tensor needs {want} (rows of {slot.shape[-1]}"
                               f"{experts})", path=imatrix.path, name=name)
        if slot.uses_imatrix:
            weights[name] = imatrix.weights(name)
    lacking = [s for s in slots if s.uses_imatrix and s.name not in imatrix.entries]
    required = [s for s in lacking if s.requires_imatrix]
    # llama-imatrix never collects token_embd (a lookup, not a matmul) and collects output
    # only with --process-output: their absence is the rule, not worth a warning
    lacking = [s for s in lacking if s.name not in _NOT_COLLECTED]
    if required:
        s = required[0]
        raise ImatrixError(f"{where}no imatrix entry for {s.name}, which {s.ggml_type} needs "
                           f"(llama-quantize refuses too){_more(required)}", path=imatrix.path,
                           name=s.name)
    if lacking:
        counted = sum(s.uses_imatrix and s.name not in _NOT_COLLECTED for s in slots)
        notes.append(f"imatrix has no entry for {len(lacking)} of {counted} quantized tensors "
                     f"({_some([s.name for s in lacking])}): quantized without importance "
                     "weights, as llama-quantize does")
    return ImatrixFit(weights, notes)


def requires_imatrix(name: str, ggml_type: str, file_type: str | None = None) -> bool:
    """llama-quantize's ``tensor_requires_imatrix``: the 1-2 bit IQ types, and Q2_K in a
    Q2_K_S file; never the token embedding nor the output."""
    if name in ("token_embd.weight", "output.weight"):
        return False
    if ggml_type in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"):
        return True
    return ggml_type == "Q2_K" and (file_type or "").upper() == "Q2_K_S"


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _more(items: Sequence) -> str:
    return f" (+{len(items) - 1} more)" if len(items) > 1 else ""


# ---------------------------------------------------------------------------------------------
# writing


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def imatrix_gguf_bytes(imatrix: Imatrix) -> bytes:
    """The GGUF file ``llama-imatrix`` would write for these statistics: the same keys in the
    same order, entries sorted by name, each ``in_sum2`` then ``counts``, 32-byte aligned."""
    from mmconvert.formats.gguf_writer import Metadata, ValueType

    md = Metadata()
    md.string("general.type", GENERAL_TYPE)
    md.array(KEY_DATASETS, ValueType.STRING, list(imatrix.datasets))
    md.uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
    md.uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
    tensors: list[tuple[str, tuple[int, ...], bytes]] = []
    for name in sorted(imatrix.entries):
        _check_name(name, Path(imatrix.path or "imatrix"))
        e = imatrix.entries[name]
        n_mat = e.counts.size
        if n_mat == 0 or e.sums.size % n_mat:
            raise ValueError(f"entry {name}: {e.sums.size} sums for {n_mat} counts")
        n = e.sums.size // n_mat
        # ggml_n_dims trims trailing 1s: a dense entry is stored as 1-D tensors
        tensors.append((name + SUMS_SUFFIX, (n, n_mat) if n_mat > 1 else (n,),
                        np.ascontiguousarray(e.sums, "<f4").tobytes()))
        tensors.append((name + COUNTS_SUFFIX, (1, n_mat) if n_mat > 1 else (1,),
                        np.asarray(e.counts, np.float64).astype("<f4").tobytes()))
    head = bytearray(struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(md)))
    head += md.encode()
    offset = 0
    for name, ne, data in tensors:
        head += _gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", 0, offset)  # GGML_TYPE_F32 = 0
        offset += -(-len(data) // ALIGNMENT) * ALIGNMENT
    head += b"\0" * (-len(head) % ALIGNMENT)
    body = b"".join(d + b"\0" * (-len(d) % ALIGNMENT) for _, _, d in tensors)
    return bytes(head) + body


def write_imatrix_gguf(path: str | Path, imatrix: Imatrix) -> None:
    """Write ``imatrix`` (raw sums and per-row token counts) as a GGUF imatrix file."""
    Path(path).write_bytes(imatrix_gguf_bytes(imatrix))


def stats_imatrix(sums: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray],
                  datasets: Sequence[str], chunk_count: int, chunk_size: int) -> Imatrix:
    """An :class:`Imatrix` from collected statistics: ``sums[name]`` ``(n_mat, n_per_row)``
    (float64 accumulators are rounded to float32 here, once), ``counts[name]`` ``(n_mat,)``."""
    entries = {name: ImatrixEntry(np.asarray(sums[name], np.float64).astype(np.float32)
                                  .reshape(-1), np.asarray(counts[name], np.int64).reshape(-1))
               for name in sums}
    for name, e in entries.items():
        if e.counts.size == 0 or e.sums.size % e.counts.size or not math.isfinite(
                float(e.sums.sum(dtype=np.float64))):
            raise ValueError(f"imatrix statistics for {name} are inconsistent or not finite")
    return Imatrix(entries, list(datasets), int(chunk_count), int(chunk_size))
