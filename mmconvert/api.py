"""The library API: every ``mmconvert`` command as a function, for scripts and notebooks.

    >>> from mmconvert import api
    >>> ckpt = api.example("ckpt")                       # a tiny checkpoint to try things on
    >>> api.inspect(ckpt)["dialect"]
    'multimodal_qwen3'
    >>> bundle = api.to_gguf(ckpt, "ckpt-gguf", outtypes=["f16", "q8_0"])
    >>> api.verify(ckpt, bundle.out).passed
    True

Each function reads the checkpoint itself, with the same read options the commands take
(``base``, ``projector``, ``projector_config``, ``rope_layout``: :class:`ReadKwargs`), and
returns a result object; none prints or exits. Problems raise the classes of
:mod:`mmconvert.errors` (input errors are ``ValueError`` s too), warnings go to a ``warn``
callback when one is given and through :func:`warnings.warn` otherwise, progress notes to a
``log`` callback (dropped without one), and a progress bar only through a ``progress``
callback (the exports'). The command line (``mmconvert/commands/``) is a thin
layer over these functions: its options, its printing and its exit codes.

Imports stay inside the functions: ``import mmconvert.api`` costs nothing (``mmconvert
--help`` stays instant), and only :func:`verify` imports torch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from mmconvert.errors import OutputError, UsageError, import_extra

if TYPE_CHECKING:
    from collections.abc import Iterator

    from typing_extensions import Unpack

    from mmconvert.convert.model import CanonicalModel
    from mmconvert.convert.readers import ReadOptions, read_checkpoint
    from mmconvert.formats.bundle import Input
    from mmconvert.publish.hub import PushResult
    from mmconvert.verify.harness import StageProgress, VerifyResult

__all__ = ["BACKENDS", "ExportResult", "PushResult", "ReadKwargs", "ReadOptions",
           "VerifyResult", "example", "inspect", "push", "read_checkpoint", "to_gguf", "to_hf",
           "to_safetensors", "verify"]

PathLike = str | os.PathLike
Log = Callable[[str], None]
# progress: called once with the bytes an export will write, returns the callback that then
# gets the bytes of each slice as it is written (from the writer's threads, one call at a time)
ProgressFactory = Callable[[int], Callable[[int], None]]
BACKENDS = ("safetensors", "hf", "gguf_torch", "gguf_llama")
DTYPES = ("auto", "float32", "float16", "bfloat16")  # to_hf and to_safetensors
ROPE_LAYOUTS = ("neox", "interleaved")


class ReadKwargs(TypedDict, total=False):
    """How to read the checkpoint (keyword arguments of every function that reads one)."""

    base: PathLike | None  # base Qwen3 folder (config, tokenizer) when the checkpoint lacks them
    projector: PathLike | None  # projector weights for a plain Qwen3 folder
    projector_config: PathLike | None  # the JSON config of ``projector``
    rope_layout: Literal["neox", "interleaved"] | None  # default: the checkpoint's own flag


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the folder (``None`` for a dry run), its files, and for a dry run
    the plan as ``--dry-run`` prints it."""

    out: Path | None
    files: list[str]
    plan: str | None = None


def __getattr__(name: str) -> Any:  # re-exports, imported when first used (torch, numpy, Hub)
    if name in ("ReadOptions", "read_checkpoint"):
        from mmconvert.convert import readers

        return getattr(readers, name)
    if name == "VerifyResult":
        from mmconvert.verify.harness import VerifyResult

        return VerifyResult
    if name == "PushResult":
        from mmconvert.publish.hub import PushResult

        return PushResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -------------------------------------------------------------------------------------------
# shared


def read_options(**options: Unpack[ReadKwargs]) -> ReadOptions:
    """The :class:`ReadOptions` of keyword arguments (paths as :class:`~pathlib.Path`).

    >>> read_options(base="Qwen3-0.6B", rope_layout="neox")
    ReadOptions(base=PosixPath('Qwen3-0.6B'), projector=None, projector_config=None, rope_layout='neox')
    """
    from mmconvert.convert.readers import ReadOptions

    unknown = set(options) - set(ReadKwargs.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    rope_layout = options.get("rope_layout")
    if rope_layout is not None and rope_layout not in ROPE_LAYOUTS:
        raise UsageError(f"rope_layout {rope_layout!r}: choose one of {', '.join(ROPE_LAYOUTS)}",
                         name="rope_layout")
    paths = {key: None if options.get(key) is None else Path(options[key])
             for key in ("base", "projector", "projector_config")}
    return ReadOptions(**paths, rope_layout=rope_layout)


def _read(ckpt: PathLike, options: ReadKwargs) -> tuple[CanonicalModel, list[Input]]:
    """The model, and the inputs the user named (which an output may not overlap)."""
    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.formats.bundle import named_inputs

    opts = read_options(**options)
    model = read_checkpoint(Path(ckpt), opts)
    return model, named_inputs(Path(ckpt), opts.base, opts.projector, opts.projector_config)


@contextmanager
def _hashing_ahead(ckpt: PathLike, enabled: bool = True) -> Iterator[None]:
    """Sources hashed from the start, beside the reading of the checkpoint (the manifest's
    sha256): its weight files, config and tokenizer, as the reader will find them; the export
    inside the block takes the digests over (:func:`mmconvert.formats.hashing.hashing_ahead`)."""
    if not enabled:
        yield
        return
    from mmconvert.convert.readers.common import find_weight_files
    from mmconvert.errors import CheckpointError
    from mmconvert.formats.hashing import hashing_ahead
    from mmconvert.formats.safe_paths import resolve_inside

    folder = Path(ckpt)
    try:  # the paths the reader will accept (symlinks leading out of the folder refused)
        files = find_weight_files(folder) if folder.is_dir() else []
        files += [resolve_inside(folder, n) for n in
                  ("config.json", "tokenizer.json", "generation_config.json")
                  if (folder / n).is_file()]
    except (CheckpointError, OSError):  # UnsafePathError is a CheckpointError
        files = []  # the reader reports it
    with hashing_ahead(files):
        yield


def default_out(ckpt: PathLike, kind: str) -> Path:
    """``<ckpt>-<kind>`` beside the checkpoint (also when ``ckpt`` is spelt ``.``)."""
    source = Path(ckpt).resolve()
    return source.parent / f"{source.name}-{kind}"


def size_bytes(value: int | str | None, name: str) -> int | None:
    """``"5GB"``, ``"500M"``, ``"2GiB"`` or a byte count -> bytes; :class:`OutputError`
    naming ``name`` (the parameter, or the command's flag) when it is not a size."""
    from mmconvert.formats.safetensors_writer import parse_size

    if value is None or value == "":
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise OutputError(f"{name}: {exc}", name=name) from exc


def _choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise UsageError(f"{name} {value!r}: choose one of {', '.join(choices)}", name=name)
    return value


def _warning(warn: Log | None) -> Log:
    return warn or (lambda line: warnings.warn(line, RuntimeWarning, stacklevel=3))


def _notes(log: Log | None, warn: Log | None) -> Log:
    """A writer's notes: to ``log``; without one, its ``warning:`` lines to ``warn``."""
    if log is not None:
        return log
    warning = _warning(warn)

    def note(line: str) -> None:
        if line.startswith("warning: "):
            warning(line.removeprefix("warning: "))

    return note


@contextmanager
def _weights_policy(strict: bool, warn: Log | None) -> Iterator[None]:
    """NaN/Inf in the weights (:mod:`mmconvert.formats.nonfinite`): a warning per tensor, or
    :class:`~mmconvert.errors.NonFiniteWeightsError` under ``strict`` (nothing written)."""
    from mmconvert.formats.nonfinite import scanning

    with scanning(strict, warn):  # warn None: RuntimeWarning
        yield


# -------------------------------------------------------------------------------------------
# reading


def example(out: PathLike, *, force: bool = False) -> Path:
    """Write the tiny deterministic example checkpoint (two modalities, a real BPE tokenizer
    with the multimodal token) into ``out``; return ``out``.

    ``force`` replaces ``out`` only when it holds an earlier mmconvert output.

    >>> ckpt = example("ckpt")
    """
    from mmconvert.convert.example import write_example
    from mmconvert.formats.bundle import BundleDir, write_marker_manifest

    out = Path(out)
    with BundleDir(out, force) as tmp:
        write_example(tmp)
        write_marker_manifest(tmp, kind="example")  # ours: force may replace it later
    return out


def inspect(ckpt: PathLike, *, fold_linear: bool = False,
            **read: Unpack[ReadKwargs]) -> dict[str, Any]:
    """Describe a checkpoint without reading its weights (``mmconvert inspect --json``).

    The dict holds ``dialect``, ``text`` (the Qwen3 hyper-parameters), ``modalities``,
    ``special_ids`` with where each came from, ``dtypes``, ``parameters``, ``warnings`` and,
    under ``plans``, every transform each export would apply (``fold_linear``: as
    ``to_gguf(fold_linear=True)`` would plan them).

    >>> info = inspect("ckpt")
    >>> info["text"]["num_hidden_layers"], sorted(info["modalities"])
    (2, ['m1', 'm2'])
    """
    from mmconvert.convert.plan_summary import planned_transforms

    model, _ = _read(ckpt, read)
    summary = model.summary()
    summary["plans"] = planned_transforms(model, fold_linear)
    summary["fold_linear"] = fold_linear
    return summary


# -------------------------------------------------------------------------------------------
# exports


def to_gguf(ckpt: PathLike, out: PathLike | None = None, *,
            outtypes: str | Sequence[str] = ("auto",), projector_outtype: str = "f16",
            split_max_size: int | str | None = None, name: str | None = None,
            pre_tokenizer: str | None = None, fold_linear: bool = False, checksums: bool = True,
            force: bool = False, strict: bool = False, dry_run: bool = False,
            log: Log | None = None, warn: Log | None = None,
            progress: ProgressFactory | None = None,
            output_tensor_type: str | None = None, token_embedding_type: str | None = None,
            tensor_types: Sequence[str] = (), pure: bool = False,
            imatrix: PathLike | None = None,
            **read: Unpack[ReadKwargs]) -> ExportResult:
    """Write the GGUF bundle for llama.cpp (``mmconvert to-gguf``): one text GGUF per
    outtype, the projector GGUF (docs/gguf-projector.md) and ``mmconvert.json``.

    Args:
        ckpt: the checkpoint folder.
        out: the bundle folder [default: ``<ckpt>-gguf`` beside the checkpoint].
        outtypes: type(s) of the text model's weight matrices (``f32``, ``f16``, ``bf16``,
            ``q8_0``, ``q4_0``, ...; ``auto``: BF16, F16 for an F16 source), all from one read.
        projector_outtype: ``f32``, ``f16``, ``q8_0``, ``q6_k``, ``q5_k`` or ``q4_k``.
        split_max_size: shard each text GGUF at this much tensor data (``"2G"``, bytes).
        name: model name for ``general.name`` and the file names.
        pre_tokenizer: llama.cpp pre-tokenizer name when detection fails.
        fold_linear: fold adjacent projector linear layers into one matrix (float64).
        checksums: record the sha256 of every source and output in ``mmconvert.json``.
        force: replace ``out`` only if it holds an earlier mmconvert bundle.
        strict: refuse weights holding NaN or Inf
            (:class:`~mmconvert.errors.NonFiniteWeightsError`, nothing written).
        dry_run: plan only; the result's ``plan`` is what ``--dry-run`` prints.
        log: receives progress notes; warn: receives warnings (else :func:`warnings.warn`).
        progress: for a progress bar: called once with the total bytes the export writes
            (all outtypes together) and returns a callback, which gets the bytes of each slice
            as it is written (thread-safe calls; they add up to the total). None: no progress.
        output_tensor_type, token_embedding_type, tensor_types (``"PATTERN=TYPE"`` each), pure:
            llama-quantize's overrides of the K-quant mixtures (``q4_k_m``, ...; see
            docs/quantization.md, "K-quant mixtures").
        imatrix: an importance-matrix file (llama.cpp's GGUF or legacy ``.dat`` format;
            ``mmconvert imatrix`` writes one): every quantized tensor gets llama-quantize's
            weights from it (:class:`~mmconvert.errors.ImatrixError` when it does not fit).

    Raises:
        CheckpointError / UnsupportedError: the checkpoint cannot be read or converted (an
            unknown outtype included); OutputError: ``out`` cannot be written; UsageError: a
            bad override.

    >>> result = to_gguf("ckpt", "ckpt-gguf", outtypes=["f16", "q8_0"])
    >>> result.files
    ['ckpt-124K-F16.gguf', 'ckpt-124K-Q8_0.gguf', 'mmproj-ckpt-F16.gguf', 'mmconvert.json']
    """
    from mmconvert.convert.export_gguf import export_gguf, prepare_gguf
    from mmconvert.formats.gguf_mixtures import make_overrides

    outtypes = (outtypes,) if isinstance(outtypes, str) else tuple(outtypes)
    tensor_types = (tensor_types,) if isinstance(tensor_types, str) else tuple(tensor_types)
    options = dict(outtypes=tuple(t.lower() for t in outtypes) or ("auto",),
                   projector_outtype=projector_outtype.lower(), name=name,
                   split_max_bytes=size_bytes(split_max_size, "split_max_size"),
                   pre_tokenizer=pre_tokenizer, fold_linear=fold_linear,
                   overrides=make_overrides(output_tensor_type, token_embedding_type,
                                            tensor_types, pure))
    if imatrix is not None:
        from mmconvert.formats.imatrix import read_imatrix

        options["imatrix"] = read_imatrix(imatrix)
    with _hashing_ahead(ckpt, checksums and not dry_run):
        model, inputs = _read(ckpt, read)
        if dry_run:
            return ExportResult(None, [], prepare_gguf(model, **options).describe())
        out = default_out(ckpt, "gguf") if out is None else Path(out)
        with _weights_policy(strict, warn):
            files = export_gguf(model, out, force=force, checksums=checksums,
                                log=_notes(log, warn), inputs=inputs, progress=progress,
                                **options)
    return ExportResult(out, files)


def to_hf(ckpt: PathLike, out: PathLike | None = None, *, dtype: str = "auto",
          max_shard_size: int | str = "5GB", fold_linear: bool = False, force: bool = False,
          strict: bool = False, dry_run: bool = False, warn: Log | None = None,
          progress: ProgressFactory | None = None,
          **read: Unpack[ReadKwargs]) -> ExportResult:
    """Write a Hugging Face folder (``mmconvert to-hf``): a standard Qwen3 model plus the
    projectors and remote code, so ``AutoModelForCausalLM.from_pretrained(out,
    trust_remote_code=True)`` takes ``mm_inputs``; tokenizer, chat template, generation
    config, model card and ``mmconvert.json``.

    Args:
        out: the bundle folder [default: ``<ckpt>-hf`` beside the checkpoint].
        dtype: ``auto`` (the source's), ``float32``, ``float16`` or ``bfloat16``.
        max_shard_size: largest language-model shard (``"5GB"``, ``"2GiB"``, bytes).
        Other arguments as in :func:`to_gguf`; the checkpoint's warnings go to ``warn``.

    >>> to_hf("ckpt", "ckpt-hf", dtype="bfloat16").out
    PosixPath('ckpt-hf')
    """
    from mmconvert.convert.export_hf import export_hf
    from mmconvert.convert.plan_hf import plan_hf

    shard_bytes = size_bytes(max_shard_size, "max_shard_size")
    with _hashing_ahead(ckpt, not dry_run):
        model, inputs = _read(ckpt, read)
        for warning in model.warnings:
            _warning(warn)(warning)
        if dry_run:
            lm_plan, projector_plan = plan_hf(model, dtype, fold_linear)
            return ExportResult(None, [], f"{lm_plan.describe()}\n{projector_plan.describe()}")
        out = default_out(ckpt, "hf") if out is None else Path(out)
        with _weights_policy(strict, warn):
            files = export_hf(model, out, dtype=dtype, max_shard_bytes=shard_bytes, force=force,
                              fold_linear=fold_linear, inputs=inputs, progress=progress)
    return ExportResult(out, files)


def to_safetensors(ckpt: PathLike, out: PathLike | None = None, *, dtype: str = "auto",
                   naming: Literal["source", "hf"] = "source", max_shard_size: int | str = "5GB",
                   force: bool = False, strict: bool = False, dry_run: bool = False,
                   warn: Log | None = None, progress: ProgressFactory | None = None,
                   **read: Unpack[ReadKwargs]) -> ExportResult:
    """Write every tensor as sharded safetensors with an index (``mmconvert to-safetensors``).

    Args:
        out: the bundle folder [default: ``<ckpt>-safetensors`` beside the checkpoint].
        dtype: cast floating tensors (``auto`` keeps them).
        naming: ``source`` keeps the checkpoint's own names (loads back into the training
            code), ``hf`` uses the HF bundle's.
        Other arguments as in :func:`to_hf`.

    >>> len(to_safetensors("ckpt", "ckpt-st", naming="hf").files) > 0
    True
    """
    from mmconvert.convert.export_safetensors import export_safetensors
    from mmconvert.convert.plan_safetensors import NAMINGS, plan_safetensors

    _choice(dtype, DTYPES, "dtype")
    _choice(naming, NAMINGS, "naming")
    shard_bytes = size_bytes(max_shard_size, "max_shard_size")
    with _hashing_ahead(ckpt, not dry_run):
        model, inputs = _read(ckpt, read)
        if dry_run:
            return ExportResult(None, [], plan_safetensors(model, naming, dtype).describe())
        out = default_out(ckpt, "safetensors") if out is None else Path(out)
        with _weights_policy(strict, warn):
            files = export_safetensors(model, out, naming=naming, dtype=dtype,
                                       max_shard_bytes=shard_bytes, force=force, inputs=inputs,
                                       progress=progress)
    return ExportResult(out, files)


# -------------------------------------------------------------------------------------------
# verify and publish


def verify(ckpt: PathLike, bundles: PathLike | Sequence[PathLike] = (), *,
           device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32",
           cases: str | PathLike = "default", greedy_tokens: int = 8,
           thresholds: Sequence[str] = (), backends: Sequence[str] = (),
           reference: PathLike | None = None, save_reference: PathLike | None = None,
           report_json: PathLike | None = None, junit: PathLike | None = None,
           markdown: PathLike | None = None, trust_bundle_code: bool = False,
           log: Log | None = None, warn: Log | None = None,
           progress: StageProgress | None = None, offload: str = "auto",
           max_kld: float | None = None, min_top1: float | None = None,
           imatrix: PathLike | None = None,
           **read: Unpack[ReadKwargs]) -> VerifyResult:
    """Check that each bundle computes the same logits as the checkpoint (``mmconvert verify``)
    and return the verdicts; a parity failure is ``result.passed == False``, not an exception.

    Args:
        bundles: bundle folder(s) written by to_hf, to_safetensors or to_gguf (their files are
            checked against ``mmconvert.json`` first).
        device: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
        dtype: reference compute dtype (``bfloat16`` loosens the thresholds).
        cases: ``default`` (built-in seeded cases) or a cases file (docs/verification.md).
        greedy_tokens: greedy continuation length per case (0-256).
        thresholds: overrides such as ``"mean_kld=2e-3"`` or ``"Q8_0.top1=0.98"``.
        backends: only these of :data:`BACKENDS` (default: every backend of each bundle).
        reference / save_reference: compare against / save a reference file.
        report_json, junit, markdown: also write these reports.
        trust_bundle_code: import an HF bundle's code that is not the one mmconvert writes.
        log: receives progress lines; warn: warnings (else :func:`warnings.warn`).
        progress: a :class:`mmconvert.verify.harness.StageProgress` shown each pass over the
            cases (the reference's, each target's); the per-case log lines are left out then.
        offload: ``auto`` (what does not fit in RAM stays on disk, read in place), ``never``
            or ``disk`` (force it); see docs/verification.md.
        max_kld / min_top1: quality gates on a quantized bundle's loss against the source
            (off by default: a correct conversion passes whatever its type costs).
        imatrix: the importance-matrix file a GGUF bundle was quantized with (to-gguf
            --imatrix), so its weighted tensors are checked byte for byte; without it they are
            left unchecked with a note, the logits still judged.

    Raises:
        UsageError, ThresholdError, CasesError, ReferenceFileError: bad arguments;
        BundleError (TamperedBundleError, UntrustedCodeError): a bundle that cannot be checked.

    >>> result = verify("ckpt", ["ckpt-gguf"], device="cpu")
    >>> result.passed, {t.target.backend for t in result.targets}
    (True, {'gguf_torch', 'gguf_llama'})
    """
    # the [verify] extra: said in one line before anything imports torch or transformers
    torch = import_extra("torch", extra="verify", job="verify")
    import_extra("transformers", extra="verify", job="verify")

    from mmconvert.verify import golden, report
    from mmconvert.verify.cases import default_cases, load_cases_file
    from mmconvert.verify.fidelity import QualityGates
    from mmconvert.verify.harness import VerifyResult, discover_all, run_reference, verify_bundles
    from mmconvert.verify.reference import OFFLOAD_CHOICES, resolve_device
    from mmconvert.verify.thresholds import parse_override

    bundles = [Path(bundles)] if isinstance(bundles, str | os.PathLike) else \
        [Path(b) for b in bundles]
    for backend in backends:
        _choice(backend, BACKENDS, "backend")
    _choice(dtype, ("float32", "bfloat16"), "dtype")
    _choice(offload, OFFLOAD_CHOICES, "offload")
    if not bundles and not save_reference:
        raise UsageError("nothing to do: give at least one BUNDLE, or --save-reference FILE")
    if reference and save_reference:
        raise UsageError("--reference and --save-reference exclude each other")
    if reference and str(cases) != "default":
        raise UsageError("--cases cannot be used with --reference: the reference file "
                         "carries its own cases")
    overrides = [parse_override(t) for t in thresholds]
    log = log or (lambda _line: None)
    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    torch_dtype = getattr(torch, dtype)
    model, _ = _read(ckpt, read)
    # then the bundles: a tampered one is refused before minutes of reference forward passes
    targets = discover_all(bundles, tuple(backends), trust_code=trust_bundle_code,
                           warn=_warning(warn))
    # the cases next (they render the chat template): every refusal comes before any progress
    if not reference:
        case_list = default_cases(model, generate=greedy_tokens) if str(cases) == "default" \
            else load_cases_file(Path(cases), model, greedy_tokens)
    log(f"hashing the checkpoint's source files ({len(golden.source_files(model))})")
    content_hash, files = golden.checkpoint_hash(model)
    if reference:
        ref = golden.load_reference(Path(reference), model, content_hash, files)
        torch_dtype = getattr(torch, ref.dtype)
        log(f"reference: {reference} ({len(ref.cases)} cases, made on {ref.device}, "
            f"{ref.dtype})")
    else:
        ref = run_reference(model, case_list, device, torch_dtype, log, progress,
                            offload=offload)
        log(f"reference: {len(case_list)} cases in {ref.seconds:.2f}s")
    if save_reference:
        golden.save_reference(Path(save_reference), ref, content_hash, files)
        log(f"saved reference to {save_reference}")
    if not bundles:
        return VerifyResult(str(model.source), content_hash, ref, [])
    result = verify_bundles(model, targets, ref, content_hash, device, torch_dtype,
                            overrides, log, progress, offload=offload,
                            gates=QualityGates(max_kld, min_top1),
                            imatrix=_read_imatrix(imatrix) if imatrix is not None else None)
    for path, write in ((report_json, report.write_json), (junit, report.write_junit),
                        (markdown, report.write_markdown)):
        if path:
            write(result, Path(path))
    return result


def push(bundle: PathLike, repo: str, *, token: str | None = None, private: bool = False,
         revision: str | None = None, create_pr: bool = False,
         commit_message: str | None = None, log: Log | None = None) -> PushResult:
    """Upload a bundle folder to the Hugging Face Hub in one commit, with a model card from its
    ``mmconvert.json`` (``mmconvert push``). Text already in the repo's README.md is kept.

    Args:
        repo: ``OWNER/NAME``; created when missing (not with ``revision``).
        token: default ``HF_TOKEN``, else the ``hf auth login`` token.
        private: create the repo private (an existing repo keeps its visibility).
        revision: a branch of an existing repo (created from main when missing).
        create_pr: open a pull request instead of committing.
        log: receives progress notes.

    Raises:
        BundleError before any network call when ``bundle`` is not a bundle; a
        :class:`~mmconvert.errors.HubError` subclass per failure a user can act on.

    >>> push("ckpt-gguf", "me/my-model-GGUF", private=True).commit_url  # doctest: +SKIP
    'https://huggingface.co/me/my-model-GGUF/commit/...'
    """
    from mmconvert.publish.hub import push_bundle

    return push_bundle(Path(bundle), repo, token=token, private=private, revision=revision,
                       create_pr=create_pr, commit_message=commit_message, log=log)


def _read_imatrix(path: PathLike):
    from mmconvert.formats.imatrix import read_imatrix

    return read_imatrix(path)
