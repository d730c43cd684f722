"""Tiny random-weight Stable Diffusion models for tests: the core's and plugin authors'.

No weights can be downloaded in CI (or on the project's machines), yet a plugin should be
tested through the real diffusers code paths. This kit builds, in a few seconds on one CPU
thread, small random-weight models with the real families' structure, laid out as a ComfyUI
``models/`` folder::

    checkpoints/tiny-sd15/                  diffusers StableDiffusionPipeline folder
    checkpoints/tiny-sd15-single.safetensors  the same weights, A1111/LDM single file
    checkpoints/tiny-sdxl/                  StableDiffusionXLPipeline folder
    checkpoints/tiny-sd2-depth/             StableDiffusionDepth2ImgPipeline folder
    loras/tiny-lora-a.safetensors           kohya LoRA for tiny-sd15 (attention)
    loras/tiny-lora-b.safetensors           kohya LoRA for tiny-sd15 (attention + MLP)
    loras/tiny-lora-peft.safetensors        diffusers/peft LoRA for tiny-sd15
    loras/tiny-lora-xl.safetensors          kohya LoRA for tiny-sdxl (SGM names, te1 + te2)
    embeddings/tiny-emb.safetensors         A1111 textual inversion for SD1.x (2 vectors)
    embeddings/tiny-emb-xl.safetensors      SDXL textual inversion (clip_l + clip_g)
    controlnet/tiny-controlnet-sd15/        diffusers ControlNetModel for tiny-sd15
    controlnet/tiny-controlnet-sdxl/        diffusers ControlNetModel for tiny-sdxl
    upscale_models/tiny-esrgan-x4.pth       ESRGAN x4, Real-ESRGAN layout ({"params_ema": ...})
    upscale_models/tiny-compact-x2.safetensors  Real-ESRGAN Compact (SRVGGNet) x2
    facerestore_models/tiny-restoreformer.safetensors  RestoreFormer face restorer (512 px)
    animatediff_models/tiny-motion-sd15/    diffusers MotionAdapter for tiny-sd15 (v2-shaped)
    animatediff_models/tiny-motion-sd15.safetensors  the same weights, original AnimateDiff file
    animatediff_models/tiny-motion-sdxl/    MotionAdapter for tiny-sdxl (SDXL-beta-shaped)
    animatediff_motion_lora/tiny-motion-lora.safetensors  motion LoRA (original layout)

What is real: the CLIP tokenizer (SD's exact ids, 77 tokens), the VAE scale factor (8, so
64x64 pixels are 8x8 latents), scheduler configs like SD1.5/SDXL, the LDM key names of the
single file, the kohya (``lora_unet_*``, ``lora_te_*``, ``.alpha``, ``ss_*`` metadata) and
peft (``unet.*.lora_A.weight``) LoRA layouts, A1111 embeddings. What is not: the weights.
Every LoRA, the embeddings and the ControlNets are scaled so that they visibly change a 64x64
render (mean absolute difference well above 5/255); ``tests/testing/test_kit.py`` checks it.

Facts worth knowing:

- ``tiny-sd15-single.safetensors`` is loaded offline with the folder as its config::

      StableDiffusionPipeline.from_single_file(
          path, config=str(root / "checkpoints/tiny-sd15"), local_files_only=True)

  Without ``config=`` diffusers goes to the hub for one. It gives bit-identical weights to
  the folder.
- ``tiny-sd2-depth`` predicts epsilon (like stabilityai/stable-diffusion-2-depth), has a tiny
  random DPT depth estimator and a DPT image processor that resizes to 32x32.
- The SDXL LoRA uses SGM UNet names (``lora_unet_input_blocks_3_1_...``) as kohya's SDXL
  scripts write them; the SD1.5 LoRAs use diffusers-style names
  (``lora_unet_down_blocks_0_attentions_0_...``) as kohya's SD1 scripts do.
- The peft LoRA is what ``save_lora_weights`` writes with transformers 5, whose flattened
  CLIPTextModel gives ``text_encoder.encoder.layers.*`` keys (no ``text_model.``).
- Embedding triggers are the file stems (``tiny-emb``), as in A1111.
- Building twice gives byte-identical files (same library versions; the peft LoRA records the
  peft version, configs the diffusers version). Renders are deterministic for a fixed seed.
- Besides the entries, the root holds ``.tiny-kit.json`` (written last: the build is
  complete) and ``.tiny-kit.lock`` (serialises concurrent builds, e.g. pytest-xdist).
- The upscalers and the face restorer are spandrel's own architecture classes with random
  weights (:mod:`render.testing.upscalers`): spandrel detects them as it detects downloaded
  files. The upscalers pass the image through with a random texture (mean difference from a
  Lanczos resize > 5/255); the face restorer's output is noise. The ``.pth`` is a pickle,
  read (like every upscaler .pth) through torch's weights-only unpickler without an alias.
- The motion modules (:mod:`render.testing.motion`) have random ``proj_out`` layers (diffusers
  zero-initialises them, which would make a module the identity), so frames visibly mix. The
  single file uses the original names (``temporal_transformer``, ``attention_blocks.0``,
  ``pos_encoder.pe``) and loads offline with the folder as its config::

      MotionAdapter.from_single_file(path, config=str(root / PATHS["tiny-motion-sd15"]),
                                     local_files_only=True)

  Both modules are too narrow for their family to show in the shapes, so their safetensors
  metadata says it (``modelspec.architecture``). The motion LoRA uses the original layout of
  guoyww's ``v2_lora_*.ckpt`` (``...attention_blocks.0.processor.to_q_lora.down.weight``).
- The kit's configs and magnitudes are in :mod:`render.testing.kit` (``SD15_UNET`` ...).

Example (a plugin's test)::

    import pytest
    from render import testing as kit

    @pytest.fixture(scope="session")
    def models(tmp_path_factory):
        return kit.ensure_models(tmp_path_factory.getbasetemp() / "models")

    def test_my_lora_plugin(models):
        import torch
        torch.set_num_threads(1)
        pipe = kit.tiny_pipeline(models, "tiny-sd15")
        plain = kit.tiny_render(pipe, "a house", seed=1)
        pipe.load_lora_weights(str(models / kit.PATHS["tiny-lora-a"]), adapter_name="a")
        assert kit.pixel_diff(plain, kit.tiny_render(pipe, "a house", seed=1)) > 5

Reference images for img2img, inpainting, ControlNet and depth (64x64 PNGs, deterministic)::

    kit.write_reference_images(tmp_path)   # house.png gradient.png mask.png checker.png

Hypernetworks (A1111 ``.pt``, or flattened ``.safetensors``) are not part of the kit build;
write one where a test needs it (32-wide modules fit ``tiny-sd15``, 80-wide ``tiny-sdxl``)::

    kit.write_hypernetwork(tmp_path / "hypernetworks" / "tiny-hn.pt", widths=(32,))

Command line: ``python -m render.testing models DIR`` (add ``--force`` to rebuild) and
``python -m render.testing images DIR``.

Importing this package does not import torch: everything heavy is imported inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "KIT_VERSION",
    "PATHS",
    "PIPELINES",
    "REFERENCE_IMAGES",
    "build_models",
    "default_root",
    "ensure_models",
    "kit_paths",
    "pixel_diff",
    "tiny_pipeline",
    "tiny_render",
    "write_hypernetwork",
    "write_reference_images",
]

#: Bumped whenever the kit's contents change, so a cached build is rebuilt.
KIT_VERSION = 3
#: Written last in the models folder; its presence means the build is complete.
MARKER = ".tiny-kit.json"

#: Kit entry name -> path relative to the models root (ComfyUI ``models/`` layout).
PATHS: dict[str, str] = {
    "tiny-sd15": "checkpoints/tiny-sd15",
    "tiny-sd15-single": "checkpoints/tiny-sd15-single.safetensors",
    "tiny-sdxl": "checkpoints/tiny-sdxl",
    "tiny-sd2-depth": "checkpoints/tiny-sd2-depth",
    "tiny-lora-a": "loras/tiny-lora-a.safetensors",
    "tiny-lora-b": "loras/tiny-lora-b.safetensors",
    "tiny-lora-peft": "loras/tiny-lora-peft.safetensors",
    "tiny-lora-xl": "loras/tiny-lora-xl.safetensors",
    "tiny-emb": "embeddings/tiny-emb.safetensors",
    "tiny-emb-xl": "embeddings/tiny-emb-xl.safetensors",
    "tiny-controlnet-sd15": "controlnet/tiny-controlnet-sd15",
    "tiny-controlnet-sdxl": "controlnet/tiny-controlnet-sdxl",
    "tiny-esrgan-x4": "upscale_models/tiny-esrgan-x4.pth",
    "tiny-compact-x2": "upscale_models/tiny-compact-x2.safetensors",
    "tiny-restoreformer": "facerestore_models/tiny-restoreformer.safetensors",
    "tiny-motion-sd15": "animatediff_models/tiny-motion-sd15",
    "tiny-motion-sd15-single": "animatediff_models/tiny-motion-sd15.safetensors",
    "tiny-motion-sdxl": "animatediff_models/tiny-motion-sdxl",
    "tiny-motion-lora": "animatediff_motion_lora/tiny-motion-lora.safetensors",
}

#: Checkpoint name -> diffusers pipeline class name that loads it.
PIPELINES: dict[str, str] = {
    "tiny-sd15": "StableDiffusionPipeline",
    "tiny-sd15-single": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sd2-depth": "StableDiffusionDepth2ImgPipeline",
}

REFERENCE_IMAGES: dict[str, str] = {
    "house.png": "RGB house with hard edges: canny / lineart ControlNet input, img2img source",
    "gradient.png": "RGB top-to-bottom ramp, near = bright: a depth map or depth2img init",
    "mask.png": "L mask, white (repaint) rectangle in the middle: inpainting",
    "checker.png": "RGB coloured 8-pixel checkerboard: img2img / shuffle input",
}


def default_root() -> Path:
    """Where :func:`ensure_models` builds when given no root: ``$RENDER_TINY_MODELS`` or a
    versioned folder in the user cache (``~/.cache/render/tiny-models-v3``)."""
    env = os.environ.get("RENDER_TINY_MODELS")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "render" / f"tiny-models-v{KIT_VERSION}"


def kit_paths(root: str | Path) -> dict[str, Path]:
    """Name -> absolute path of every kit entry under ``root`` (builds nothing)."""
    root = Path(root)
    return {name: root / rel for name, rel in PATHS.items()}


def build_models(root: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Build the kit under ``root``; return name -> path.

    Skipped when a complete build of this kit version is already there, unless ``force``.
    Safe to call from several processes at once (file lock, build in a temp folder, marker
    written last).
    """
    from .kit import build_models as _build

    return _build(Path(root), force=force)


def ensure_models(root: str | Path | None = None) -> Path:
    """Build the kit once (see :func:`build_models`) and return the models root.

    Cheap when already built: one small JSON read, no torch import.
    """
    root = Path(root) if root is not None else default_root()
    if not _is_complete(root):
        build_models(root)
    return root


def _is_complete(root: Path) -> bool:
    """True when a finished build of this kit version is in ``root``."""
    import json

    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("kit_version") == KIT_VERSION and all(
        (root / rel).exists() for rel in PATHS.values()
    )


def tiny_pipeline(root: str | Path | None = None, name: str = "tiny-sd15", **kwargs: Any) -> Any:
    """Load a kit checkpoint as its diffusers pipeline on CPU, fp32, offline, quiet.

    ``name`` is a key of :data:`PIPELINES`; ``tiny-sd15-single`` goes through
    ``from_single_file`` with the tiny-sd15 folder as ``config``. ``kwargs`` go to the loader.
    """
    import diffusers

    if name not in PIPELINES:
        raise KeyError(f"unknown kit checkpoint {name!r}; one of {sorted(PIPELINES)}")
    root = ensure_models(root)
    cls = getattr(diffusers, PIPELINES[name])
    path = root / PATHS[name]
    if name == "tiny-sd15-single":
        pipe = cls.from_single_file(
            str(path), config=str(root / PATHS["tiny-sd15"]), local_files_only=True, **kwargs
        )
    else:
        pipe = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_render(
    pipe: Any,
    prompt: str = "a house",
    *,
    seed: int = 0,
    steps: int = 4,
    size: int = 64,
    **kwargs: Any,
) -> np.ndarray:
    """Render one image and return it as a float array (H, W, 3) in 0..255.

    One fresh ``torch.Generator`` per call, so equal arguments give identical pixels.
    ``size`` is passed as height and width to pipelines that take them (img2img and
    depth-to-image follow their ``image=``).
    """
    import inspect

    import torch

    call: dict[str, Any] = {
        "num_inference_steps": steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
    }
    if "height" in inspect.signature(pipe.__call__).parameters:
        call |= {"height": size, "width": size}
    call |= kwargs
    images = pipe(prompt, **call).images
    return images[0].astype("float64") * 255.0


def pixel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two renders, in 0..255 units."""
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def write_reference_images(folder: str | Path, size: int = 64) -> dict[str, Path]:
    """Write deterministic reference PNGs (see :data:`REFERENCE_IMAGES`) into ``folder``."""
    from .images import write_reference_images as _write

    return _write(folder, size)


def write_hypernetwork(
    path: str | Path,
    widths: tuple[int, ...] = (32,),
    layer_structure: tuple[float, ...] = (1, 2, 1),
    seed: int = 0,
    scale: float | None = None,
    **options: Any,
) -> Path:
    """Write a random A1111 hypernetwork to ``path`` (``.pt``, or flattened ``.safetensors``)
    that visibly changes a 64x64 ``tiny-sd15`` render at strength 1; see
    :func:`render.testing.hypernetworks.write_hypernetwork` for ``options``."""
    from .hypernetworks import HYPERNETWORK_SCALE
    from .hypernetworks import write_hypernetwork as _write

    return _write(path, widths, layer_structure, seed,
                  HYPERNETWORK_SCALE if scale is None else scale, **options)
