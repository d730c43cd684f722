"""Annotator weights: where a preprocessor's files are found (A1111's and ComfyUI's folders
too), and the preflight error that says which file to download and where to put it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from render.api import FieldError

from .preprocessors import Preprocessor, require_aux
from .schema import annotator_label

ANNOTATOR_DIRS = ("annotators", "annotator", "controlnetpreprocessor")
A1111_DOWNLOADS = ("extensions", "sd-webui-controlnet", "annotator", "downloads")
COMFY_CKPTS = ("custom_nodes", "comfyui_controlnet_aux", "ckpts")
ANNOTATORS_REPO = "https://huggingface.co/lllyasviel/Annotators"
DEPTH_ANYTHING_EXAMPLE = "https://huggingface.co/LiheYoung/depth-anything-small-hf"


def annotator_refs(models: Any, index: int, spec: Preprocessor) -> dict[str, Any]:
    """``{label: FileRef}`` of what unit ``index``'s preprocessor needs; FieldError when
    controlnet-aux or a weight file is missing."""
    try:
        require_aux(spec)
        weights = annotator_files(spec, getattr(models, "model_dirs", []))
    except FieldError as exc:
        raise FieldError(exc.message, f"{index}.{exc.subkey}") from None
    return {annotator_label(index, weight): models.file_ref("annotator", weight, str(file))
            for weight, file in weights.items()}


def annotator_roots(model_dirs: Sequence[Path | str]) -> list[Path]:
    """The folders searched for annotator weights, in order (existing ones only)."""
    roots: list[Path] = []
    for d in map(Path, model_dirs):
        candidates: list[Path] = []
        if d.is_dir():
            candidates += sorted(c for c in d.iterdir()
                                 if c.is_dir() and c.name.lower() in ANNOTATOR_DIRS)
        candidates += [d.parent.joinpath(*A1111_DOWNLOADS), d.parent.joinpath(*COMFY_CKPTS)]
        for c in candidates:
            if c.is_dir() and c not in roots:
                roots.append(c)
    return roots


def _first_dir(model_dirs: Sequence[Path | str]) -> str:
    return f"{Path(model_dirs[0]) / 'annotators'}/" if model_dirs else \
        "an annotators/ folder in one of model_dirs"


def annotator_files(spec: Preprocessor, model_dirs: Sequence[Path | str]) -> dict[str, Path]:
    """Weight file (or folder) name -> path for ``spec``; FieldError when one is missing."""
    if not spec.weights and not spec.folder:
        return {}
    roots = annotator_roots(model_dirs)
    looked = ", ".join(str(r) for r in roots) or "no annotators folder exists yet"
    if spec.folder:
        folder = _find_depth_folder(roots)
        if folder is None:
            raise FieldError(
                f"preprocessor '{spec.name}' needs a transformers depth-estimation folder"
                f" (config.json, model.safetensors, preprocessor_config.json), e.g. the files of"
                f" {DEPTH_ANYTHING_EXAMPLE}: put them in {_first_dir(model_dirs)}depth_anything/"
                f" (looked in: {looked})", "preprocessor")
        return {folder.name: folder}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for weight in spec.weights:
        hit = _find_file(roots, weight)
        if hit is None:
            missing.append(weight)
        else:
            found[weight] = hit
    if missing:
        if len(missing) == 1:
            what = (f"{missing[0]}: download {ANNOTATORS_REPO}/resolve/main/{missing[0]} and"
                    f" put it in {_first_dir(model_dirs)}")
        else:
            names = ", ".join(missing[:-1]) + f" and {missing[-1]}"
            what = (f"{names}: download them from {ANNOTATORS_REPO}/tree/main and put them in"
                    f" {_first_dir(model_dirs)}")
        raise FieldError(f"preprocessor '{spec.name}' needs {what} (looked in: {looked})"
                         f"{spec.hint}", "preprocessor")
    return found


def _find_file(roots: Sequence[Path], name: str) -> Path | None:
    for root in roots:
        direct = root / name
        if direct.is_file():
            return direct
        hits = sorted(p for p in root.rglob(name) if p.is_file())
        if hits:
            return hits[0]
    return None


def _find_depth_folder(roots: Sequence[Path]) -> Path | None:
    for root in roots:
        for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
            name = folder.name.lower().replace("-", "_")
            if name.startswith("depth_anything") and (folder / "config.json").is_file() and (
                    folder / "preprocessor_config.json").is_file():
                return folder
    return None
