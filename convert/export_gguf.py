"""The GGUF bundle: one text GGUF per ``--outtype`` (optionally split), the projector GGUF and
``mmconvert.json``.

Work happens in two phases, as the writer wants: :func:`prepare_gguf` builds every plan, all
metadata and the byte layout of every file (this is also ``--dry-run``); :func:`export_gguf`
then streams the tensor data of all files in one pass over the source, so several outtypes
cost one read of the checkpoint.

File names follow the Hub's habits: ``<Name>-<Size>-<QUANT>.gguf`` (``Size`` the parameter
count as llama.cpp's ``general.size_label``), shards ``<Name>-<Size>-<QUANT>-00001-of-00002.gguf``
and ``mmproj-<Name>-<QUANT>.gguf``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mmconvert.convert.gguf_metadata import size_label, text_metadata
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan
from mmconvert.convert.plan_gguf import (
    gguf_tensors,
    imatrix_slots,
    missing_kernels,
    parameter_count,
    plan_gguf,
    resolve_outtype,
    text_sources,
)
from mmconvert.convert.plan_mmproj import mmproj_metadata, plan_mmproj
from mmconvert.errors import UnsupportedError
from mmconvert.formats.bundle import (
    BundleDir,
    Input,
    manifest_sources,
    model_inputs,
    write_manifest,
)
from mmconvert.formats.gguf_constants import MIXTURE_BASE
from mmconvert.formats.gguf_mixtures import NO_OVERRIDES, Overrides
from mmconvert.formats.gguf_vocab import build_vocab
from mmconvert.formats.gguf_writer import GGUFFile, Metadata, layout_gguf, write_gguf
from mmconvert.formats.hashing import SourceHashes
from mmconvert.formats.imatrix import Imatrix, fit_imatrix
from mmconvert.formats.streaming import ProgressFactory
from mmconvert.publish.model_card import write_bundle_card

Log = Callable[[str], None]


@dataclass
class GGUFJob:
    """Everything a GGUF export writes, laid out to the byte."""

    name: str
    size_label: str
    plans: list[Plan]
    files: list[GGUFFile]
    outputs: list[dict]  # manifest entries: path, role, quant, outtype, split
    pre_tokenizer: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """``--dry-run``: the plans, then the files that would be written."""
        parts = [f"# name: {self.name}, size label: {self.size_label}"]
        parts += [f"# {n}" for n in self.notes]
        parts += [p.describe() for p in self.plans]
        lines = ["# files:"]
        for entry, f in zip(self.outputs, self.files):
            lines.append(f"  {f.name}  ({entry['role']}, {entry['quant']}, "
                         f"{len(f.tensors)} tensors, {f.size:,} bytes)")
        return "\n\n".join(parts + ["\n".join(lines)])


def default_name(model: CanonicalModel) -> str:
    """The checkpoint folder's name, as a file-name-safe string."""
    return sanitize_name(Path(model.source).resolve().name) or "model"


def sanitize_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name.strip()).strip("-.")


def text_stem(name: str, label: str, quant: str) -> str:
    """``<Name>-<Size>-<QUANT>``; a name that already ends in its size is not repeated."""
    if name.lower().endswith(f"-{label.lower()}") or name.lower() == label.lower():
        return f"{name}-{quant}"
    return f"{name}-{label}-{quant}"


def prepare_gguf(model: CanonicalModel, *, outtypes: Sequence[str] = ("auto",),
                 projector_outtype: str = "f16", name: str | None = None,
                 split_max_bytes: int | None = None, pre_tokenizer: str | None = None,
                 fold_linear: bool = False, overrides: Overrides = NO_OVERRIDES,
                 has_imatrix: bool = False, imatrix: Imatrix | None = None) -> GGUFJob:
    """Plan and lay out every file. Outtypes resolving to the same type are written once.
    ``fold_linear``: fold adjacent linear projector layers (:mod:`convert.projector_export`).
    ``overrides`` / ``has_imatrix``: llama-quantize's options, for the K-quant mixtures.
    ``imatrix``: importance weights for every quantized tensor, checked against the model
    and used as llama-quantize uses them (:mod:`formats.imatrix`); implies ``has_imatrix``."""
    name = sanitize_name(name) if name else default_name(model)
    if overrides and not any(resolve_outtype(model, t) in MIXTURE_BASE for t in outtypes):
        raise UnsupportedError(f"{overrides.describe()}: these steer llama-quantize's K-quant "
                               "mixtures; add an --outtype such as q4_k_m")
    sources = text_sources(model)  # shared: derived tensors are read once for all outtypes
    if imatrix is not None:
        has_imatrix = True
        sources = imatrix_sources(sources)
    vocab = build_vocab(model, model.text.vocab_size, pre_tokenizer)
    vocab_keys = Metadata()  # built and encoded once, shared by every outtype's file
    vocab.add_to(vocab_keys)
    notes = list(vocab.notes) + [f"warning: {w}" for w in model.warnings]
    label = ""
    plans: list[Plan] = []
    files: list[GGUFFile] = []
    outputs: list[dict] = []
    seen: list[str] = []
    for outtype in outtypes:
        ggml = resolve_outtype(model, outtype)
        if ggml in seen:
            continue
        seen.append(ggml)
        plan = plan_gguf(model, outtype, sources, overrides, has_imatrix)
        label = label or size_label(parameter_count(plan))
        weights = None
        if imatrix is not None:
            fit = fit_imatrix(imatrix, imatrix_slots(plan, ggml),
                              [t.name for t in plan.tensors if len(t.shape) < 2])
            weights = fit.weights
            notes += [f"warning: {ggml}: {w}" for w in fit.warnings]
            plan.notes.append(f"imatrix: {imatrix.path} ({len(fit.weights)} tensors weighted)")
        md = text_metadata(model, ggml, name, label, plan.notes)
        if imatrix is not None:
            add_imatrix_keys(md, imatrix)
        md.update(vocab_keys)
        shards = layout_gguf(text_stem(name, label, ggml), md, gguf_tensors(plan, weights),
                             split_max_bytes=split_max_bytes)
        plans.append(plan)
        files += shards
        outputs += [{"path": f.name, "role": "text", "quant": ggml, "outtype": outtype,
                     "split": [i + 1, len(shards)], "types": _types(f)}
                    for i, f in enumerate(shards)]
    if model.projectors:
        plan = plan_mmproj(model, projector_outtype, fold_linear)
        ggml = projector_outtype.upper()
        md = mmproj_metadata(model, ggml, name, plan.projectors)
        (mm,) = layout_gguf(f"mmproj-{name}-{ggml}", md, gguf_tensors(plan))
        plans.append(plan)
        files.append(mm)
        outputs.append({"path": mm.name, "role": "projector", "quant": ggml,
                        "outtype": projector_outtype, "split": [1, 1], "types": _types(mm)})
    return GGUFJob(name, label, plans, files, outputs, vocab.pre, notes)


def imatrix_sources(sources: list) -> list:
    """3-D (expert) sources read whole: each expert's rows take their own slice of the
    importance weights, so the encoder must see every expert (gguf_tensors' encoders)."""
    return [(n, replace(r, row_streamable=False) if len(r.shape) == 3 else r)
            for n, r in sources]


def add_imatrix_keys(md: Metadata, imatrix: Imatrix) -> None:
    """The ``quantize.imatrix.*`` keys llama-quantize writes (strings cut at 127 bytes)."""
    md.string("quantize.imatrix.file", Path(imatrix.path or "").name[:127])
    if imatrix.datasets:
        md.string("quantize.imatrix.dataset", imatrix.datasets[0][:127])
    md.uint32("quantize.imatrix.entries_count", len(imatrix.entries))
    if imatrix.chunk_count > 0:
        md.uint32("quantize.imatrix.chunks_count", imatrix.chunk_count)


def _types(f: GGUFFile) -> dict[str, str]:
    """The manifest's record of one file: tensor name -> GGML type."""
    return {t.name: t.ggml_type for t, _ in f.tensors}


def job_outtypes(job: GGUFJob, types: list[str]) -> list[str]:
    """The outtypes of ``job`` whose files hold a tensor of one of ``types``."""
    return list(dict.fromkeys(e["outtype"] for e in job.outputs
                              if set(e["types"].values()) & set(types)))


def export_gguf(model: CanonicalModel, out: Path, *, outtypes: Sequence[str] = ("auto",),
                projector_outtype: str = "f16", name: str | None = None,
                split_max_bytes: int | None = None, pre_tokenizer: str | None = None,
                force: bool = False, progress: ProgressFactory | None = None,
                log: Log | None = None,
                checksums: bool = True, fold_linear: bool = False,
                inputs: Iterable[Input] = (), overrides: Overrides = NO_OVERRIDES,
                has_imatrix: bool = False, imatrix: Imatrix | None = None) -> list[str]:
    """Write the GGUF bundle into ``out``; return the file names written.

    ``inputs``: what the user named besides the model (:func:`formats.bundle.named_inputs`);
    OUT may not overlap them nor any file the reader opened.

    ``checksums``: record the sha256 of every source and output file in the manifest. Outputs
    are hashed while they are written and sources in the background (and remembered in the
    hash cache, see :mod:`mmconvert.formats.hashing`); ``False`` records sizes only.

    ``progress``: called once with the bytes the run writes (every outtype's file together);
    the callback it returns gets each written slice's byte count, from the writer's threads.
    """
    job = prepare_gguf(model, outtypes=outtypes, projector_outtype=projector_outtype, name=name,
                       split_max_bytes=split_max_bytes, pre_tokenizer=pre_tokenizer,
                       fold_linear=fold_linear, overrides=overrides, has_imatrix=has_imatrix,
                       imatrix=imatrix)
    missing = missing_kernels(job.plans)
    if missing:  # before OUT is touched: a refusal writes nothing
        raise UnsupportedError(f"--outtype {', '.join(job_outtypes(job, missing))} needs the "
                               f"{', '.join(missing)} kernel(s), which this mmconvert lacks")
    digests: dict[str, str] | None = {} if checksums else None
    with (SourceHashes(manifest_sources(model), model.tensors.refs()) if checksums
          else contextlib.nullcontext()) as sources, \
            BundleDir(out, force, [*inputs, *model_inputs(model)], log) as tmp:
        for note in job.notes:  # once OUT is accepted: a refusal is the first line printed
            if log is not None:
                log(note)
        report = progress(sum(f.data_bytes for f in job.files)) if progress else None
        names = write_gguf(tmp, job.files, progress=report, digests=digests)
        transforms: list[str] = []
        for plan in job.plans:
            transforms += [s for s in plan.transforms_applied() if s not in transforms]
        write_manifest(
            tmp, kind="gguf", model=model,
            options={"outtypes": list(outtypes), "projector_outtype": projector_outtype,
                     "name": job.name, "split_max_bytes": split_max_bytes,
                     "pre_tokenizer": pre_tokenizer, "checksums": checksums,
                     "fold_linear": fold_linear,
                     **({"quantize_overrides": overrides.to_json()} if overrides else {}),
                     **({"imatrix": imatrix.path} if imatrix is not None else {})},
            transforms=transforms, checksums=checksums,
            source_hashes=sources.result() if sources else None, output_hashes=digests,
            extra={"name": job.name, "size_label": job.size_label, "files": job.outputs,
                   "pre_tokenizer": job.pre_tokenizer,
                   "modalities": [{"name": m, "input_dim": p.input_dim,
                                   "output_dim": p.output_dim}
                                  for m, p in model.projectors.items()],
                   "tensors": {t.name: t.source.name for p in job.plans for t in p.tensors}})
        names.append(write_bundle_card(tmp, Path(out).name))
    return names + ["mmconvert.json"]
