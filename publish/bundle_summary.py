"""What a model card needs to know about a bundle folder, read from the folder itself.

``mmconvert push`` only has the bundle (not the checkpoint it came from), so everything is
recovered from ``mmconvert.json``, the files beside it and their headers: sizes, GGUF quant types
(``general.file_type``), the modalities (from ``config.json``, or tensor shapes) and a verify
report when ``mmconvert verify --markdown/--report-json`` wrote one into the folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmconvert.errors import BundleError
from mmconvert.formats.bundle import MANIFEST, read_manifest

if TYPE_CHECKING:  # gguf-py is imported only for a bundle with GGUF files
    from mmconvert.formats.gguf_reader import GGUFReader

KINDS = ("hf", "safetensors", "gguf")
CARD = "README.md"
VERIFY_MARKDOWN = "verify-report.md"  # mmconvert verify --markdown BUNDLE/verify-report.md
VERIFY_JSON = "verify-report.json"  # mmconvert verify --report-json BUNDLE/verify-report.json
# never uploaded: VCS folders and huggingface_hub's own upload bookkeeping
SKIPPED_DIRS = (".git", ".cache")
# first / last projector linear of a modality, in canonical, HF-bundle or seed naming
_FIRST_LINEAR = re.compile(r"^(?:mm|multimodal_projector(?:\.projectors)?)\.(?P<m>[^.]+)\.(?:fc1|0)\.weight$")
_LAST_LINEAR = re.compile(r"^(?:mm|multimodal_projector)\.(?P<m>[^.]+)\.fc2\.weight$")


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative, with forward slashes (the path in the repo)
    size: int
    quant: str | None = None  # GGUF files: F16, Q8_0, ...


@dataclass(frozen=True)
class Modality:
    name: str
    input_dim: int | None
    output_dim: int | None = None
    layers: tuple[str, ...] = ()  # each layer as a card shows it (:func:`layer_label`)


@dataclass(frozen=True)
class BundleSummary:
    folder: Path
    manifest: dict[str, Any]
    files: list[BundleFile]
    modalities: list[Modality] = field(default_factory=list)
    parity_markdown: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def base_model(self) -> str | None:
        return self.manifest.get("base_model")

    @property
    def placeholder(self) -> str | None:
        return self.manifest.get("multimodal_token")

    @property
    def placeholder_id(self) -> int | None:
        return self.manifest.get("multimodal_token_id")


def bundle_files(folder: Path) -> list[Path]:
    """Every file to upload, relative to ``folder`` and sorted (the card is generated apart)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in SKIPPED_DIRS and rel.as_posix() != CARD:
            files.append(rel)
    return files


def load_manifest(folder: Path) -> dict[str, Any]:
    """The bundle's manifest, or :class:`BundleError` saying why ``folder`` is not a bundle."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise BundleError(f"{folder}: {what}; pass a folder written by mmconvert to-hf, "
                          "to-safetensors or to-gguf")
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder / MANIFEST}: cannot read it ({exc}); re-run the conversion"
                          ) from exc
    if manifest is None:
        raise BundleError(f"{folder}: not an mmconvert bundle (no {MANIFEST}); convert first with "
                          "mmconvert to-hf, to-safetensors or to-gguf")
    if manifest.get("kind") not in KINDS:
        raise BundleError(f"{folder / MANIFEST}: unknown bundle kind "
                          f"{manifest.get('kind') if isinstance(manifest, dict) else None!r} "
                          f"(expected one of {', '.join(KINDS)})")
    for out in manifest.get("outputs", []):
        path = folder / out["path"]
        if not path.is_file():
            raise BundleError(f"{folder}: incomplete bundle, {out['path']} is listed in "
                              f"{MANIFEST} but missing; re-run the conversion")
        if "bytes" in out and path.stat().st_size != out["bytes"]:
            raise BundleError(f"{folder}: {out['path']} has {path.stat().st_size} bytes, "
                              f"{MANIFEST} says {out['bytes']}; re-run the conversion")
    return manifest


def summarize_bundle(folder: Path) -> BundleSummary:
    """Read the bundle at ``folder`` (manifest, files, modalities, verify report)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    rels = bundle_files(folder)
    ggufs = {rel: _open_gguf(folder / rel) for rel in rels if rel.suffix == ".gguf"}  # once each
    files = [BundleFile(rel.as_posix(), (folder / rel).stat().st_size,
                        gguf_quant_type(ggufs[rel]) if rel in ggufs else None) for rel in rels]
    return BundleSummary(folder, manifest, files, _modalities(folder, manifest, ggufs),
                         _parity_markdown(folder))


def _open_gguf(path: Path) -> GGUFReader:
    from mmconvert.formats.gguf_reader import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable GGUF file ({exc})", path=path) from exc


def gguf_quant_type(reader: GGUFReader) -> str | None:
    """``general.file_type`` as llama.cpp names it (``Q8_0``); else the dominant tensor type."""
    from mmconvert.formats.gguf_constants import Keys, file_type_name

    ftype = reader.value(Keys.General.FILE_TYPE)
    # None: a file type this gguf version does not know: fall back to the tensors
    name = file_type_name(ftype) if ftype is not None else None
    if name is not None:
        return name
    sizes: dict[str, int] = {}
    for tensor in reader.tensors.values():
        sizes[tensor.type_name] = sizes.get(tensor.type_name, 0) + tensor.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _modalities(folder: Path, manifest: dict[str, Any], ggufs: dict[Path, GGUFReader]
                ) -> list[Modality]:
    """First source that knows: the projector GGUF's keys (they carry the layers), the
    manifest, the bundle's config.json, tensor shapes."""
    for reader in ggufs.values():
        if found := _modalities_from_mmproj(reader):
            return found
    declared = manifest.get("modalities")
    if isinstance(declared, dict):
        declared = [{"name": k, **v} for k, v in declared.items() if isinstance(v, dict)]
    if isinstance(declared, list) and declared:
        return [Modality(m["name"], m.get("input_dim"), m.get("output_dim"))
                for m in declared if isinstance(m, dict) and "name" in m]
    config = folder / "config.json"
    if config.is_file():
        try:
            found = _modalities_from_config(json.loads(config.read_text(encoding="utf-8")))
        except ValueError:
            found = []
        if found:
            return found
    return _modalities_from_shapes(folder, manifest, ggufs)


def _modalities_from_mmproj(reader: GGUFReader) -> list[Modality]:
    """The projector GGUF's own keys (``docs/gguf-projector.md``), in fusion order; nothing
    for another GGUF or one that breaks the spec."""
    from mmconvert.errors import ProjectorFileError
    from mmconvert.formats.gguf_projector import is_projector, read_projector_spec

    if not is_projector(reader):
        return []
    try:
        spec = read_projector_spec(reader)
    except ProjectorFileError:
        return []
    return [Modality(m.name, m.input_dim, m.output_dim,
                     tuple(layer_label(x.kind, x.in_dim, x.out_dim, x.activation,
                                       x.gate == "1-tanh") for x in m.layers))
            for m in spec.modalities.values()]


def _modalities_from_config(cfg: dict[str, Any]) -> list[Modality]:
    mm = cfg.get("multimodal_config")  # the HF bundle's projector description
    if isinstance(mm, dict) and isinstance(mm.get("modalities"), list):
        return [Modality(m["name"], m.get("input_dim"), m.get("output_dim"),
                         _config_layers(m.get("layers")))
                for m in mm["modalities"] if isinstance(m, dict) and "name" in m]
    configs = cfg.get("modality_configs")  # the seed's config (safetensors, source naming)
    if isinstance(configs, dict):
        hidden = (cfg.get("text_config") or {}).get("hidden_size")
        return [Modality(name, c.get("input_dim"), hidden)
                for name, c in configs.items() if isinstance(c, dict)]
    return []


def _config_layers(layers: Any) -> tuple[str, ...]:
    """The HF bundle's layer list (``docs/hf-bundle.md``) as the card shows it."""
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        return ()
    return tuple(layer_label(x.get("kind", "?"), x.get("in_dim", x.get("dim")),
                             x.get("out_dim", x.get("dim")), x.get("activation") or "",
                             bool(x.get("complementary"))) for x in layers)


def layer_label(kind: str, in_dim: int | None, out_dim: int | None, activation: str = "",
                complementary: bool = False) -> str:
    """One projector layer for a model card: ``Linear(48→64)``, ``LayerNorm``, ``gelu``..."""
    if kind == "linear":
        return f"Linear({in_dim}→{out_dim})"
    if kind == "layer_norm":
        return "LayerNorm"
    if kind == "glu":
        return f"{activation}(gate)·up ({in_dim}→{out_dim})"
    if kind in ("tanh_gate", "scale"):
        return "(1 − tanh g)·x" if complementary else "tanh(g)·x"
    return activation or kind


def _modalities_from_shapes(folder: Path, manifest: dict[str, Any],
                            ggufs: dict[Path, GGUFReader]) -> list[Modality]:
    """Projector weight shapes: safetensors headers (``[out, in]``) or GGUF tensor infos."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(path))
    for reader in ggufs.values():  # tensor infos hold numpy order already
        shapes.update({name: t.shape for name, t in reader.tensors.items()})
    canonical = manifest.get("tensors") or {}  # output name -> canonical name
    names = list(canonical) + [n for n in shapes if n not in canonical]
    dims: dict[str, dict[str, int]] = {}
    for name in names:
        shape = shapes.get(name)
        if shape is None or len(shape) != 2:
            continue
        key = canonical.get(name, name)
        if m := _FIRST_LINEAR.match(key):
            dims.setdefault(m["m"], {})["input_dim"] = shape[1]
        elif m := _LAST_LINEAR.match(key):
            dims.setdefault(m["m"], {})["output_dim"] = shape[0]
    return [Modality(n, d.get("input_dim"), d.get("output_dim")) for n, d in dims.items()]


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the header, read by the one (strict) safetensors parser."""
    from mmconvert.errors import MMConvertError
    from mmconvert.formats.safetensors_io import read_safetensors_header

    try:
        entries, _ = read_safetensors_header(path)
    except MMConvertError:  # unreadable or not convertible: no shapes from this file
        return {}
    return {name: entry.shape for name, entry in entries.items()}


def _parity_markdown(folder: Path) -> str | None:
    if (folder / VERIFY_MARKDOWN).is_file():
        return (folder / VERIFY_MARKDOWN).read_text(encoding="utf-8").strip() or None
    if (folder / VERIFY_JSON).is_file():
        try:
            return _table_from_report(json.loads((folder / VERIFY_JSON).read_text("utf-8")))
        except ValueError:
            return None
    return None


def _table_from_report(report: Any) -> str | None:
    """A markdown table from a JSON verify report (``verify --report-json``): one row per
    target; for another shape, the first list of flat records."""
    rows: Any = report
    if isinstance(report, dict) and isinstance(report.get("targets"), list):
        rows = [{"bundle": t.get("label"), "backend": t.get("backend"),
                 "type": t.get("output_type"), **(t.get("overall") or {}),
                 "result": t.get("status")} for t in report["targets"] if isinstance(t, dict)]
    elif isinstance(report, dict):
        rows = next((v for v in report.values() if isinstance(v, list) and v
                     and isinstance(v[0], dict)), None)
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return None
    rows = [row for row in rows if isinstance(row, dict)]
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and (value is None or isinstance(value, (str, int, float, bool))):
                columns.append(key)
    if not columns:
        return None
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")
