"""What a model card needs to know about a bundle folder, read from the folder itself.

``mmconvert push`` only has the bundle (not the checkpoint it came from), so everything is
recovered from ``mmconvert.json``, the files beside it and their headers: sizes, GGUF quant types
(``general.file_type``), the modalities (from ``config.json``, or tensor shapes) and a verify
report when ``mmconvert verify --markdown/--report-json`` wrote one into the folder.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmconvert.errors import BundleError
from mmconvert.formats.bundle import MANIFEST, read_manifest

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
    if not isinstance(manifest, dict) or manifest.get("kind") not in KINDS:
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
    files = [BundleFile(rel.as_posix(), (folder / rel).stat().st_size,
                        gguf_quant_type(folder / rel) if rel.suffix == ".gguf" else None)
             for rel in bundle_files(folder)]
    return BundleSummary(folder, manifest, files, _modalities(folder, manifest),
                         _parity_markdown(folder))


def gguf_quant_type(path: Path) -> str | None:
    """``general.file_type`` as llama.cpp names it (``Q8_0``); else the dominant tensor type."""
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable GGUF file ({exc})") from exc
    field_ = reader.get_field("general.file_type")
    if field_ is not None:
        try:
            name = LlamaFileType(int(field_.contents())).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass  # a file type this gguf version does not know: fall back to the tensors
    sizes: dict[str, int] = {}
    for tensor in reader.tensors:
        name = GGMLQuantizationType(tensor.tensor_type).name
        sizes[name] = sizes.get(name, 0) + int(tensor.n_bytes)
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _modalities(folder: Path, manifest: dict[str, Any]) -> list[Modality]:
    """First source that knows: the manifest, the bundle's config.json, the projector GGUF's
    keys, tensor shapes."""
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
    for path in sorted(folder.glob("*.gguf")):
        if found := _modalities_from_mmproj(path):
            return found
    return _modalities_from_shapes(folder, manifest)


def _modalities_from_mmproj(path: Path) -> list[Modality]:
    """The projector GGUF's own keys (``docs/gguf-projector.md``), in fusion order."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return []

    def value(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = value("general.architecture")
    names = value(f"{arch}.modalities") if arch else None
    if not isinstance(names, list):
        return []
    return [Modality(n, value(f"{arch}.{n}.input_dim"), value(f"{arch}.{n}.output_dim"))
            for n in names]


def _modalities_from_config(cfg: dict[str, Any]) -> list[Modality]:
    mm = cfg.get("multimodal_config")  # the HF bundle's projector description
    if isinstance(mm, dict) and isinstance(mm.get("modalities"), list):
        return [Modality(m["name"], m.get("input_dim"), m.get("output_dim"))
                for m in mm["modalities"] if isinstance(m, dict) and "name" in m]
    configs = cfg.get("modality_configs")  # the seed's config (safetensors, source naming)
    if isinstance(configs, dict):
        hidden = (cfg.get("text_config") or {}).get("hidden_size")
        return [Modality(name, c.get("input_dim"), hidden)
                for name, c in configs.items() if isinstance(c, dict)]
    return []


def _modalities_from_shapes(folder: Path, manifest: dict[str, Any]) -> list[Modality]:
    """Projector weight shapes: safetensors headers (``[out, in]``) or GGUF tensor infos."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(path))
    for path in sorted(folder.glob("*.gguf")):
        shapes.update(_gguf_shapes(path))
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


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _gguf_shapes(path: Path) -> dict[str, list[int]]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return {}
    # GGUF lists dimensions innermost first: reverse to numpy's [out, in]
    return {t.name: [int(d) for d in reversed(t.shape.tolist())] for t in reader.tensors}


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
