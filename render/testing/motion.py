"""AnimateDiff parts of the tiny kit: MotionAdapters for tiny-sd15 / tiny-sdxl, a motion LoRA.

A MotionAdapter's ``proj_out`` layers are zero-initialised (every motion module starts as
the identity), so a random-weight module would change nothing: they are drawn at random
here, so the module visibly mixes frames. The SD1.5 module is written twice with the same
weights: as a diffusers folder and as an original AnimateDiff single file (the names
``mm_sd_v15_v2.ckpt`` uses, with its ``pos_encoder.pe`` tables), through
:func:`to_original_motion_module`, the inverse of diffusers'
``convert_animatediff_checkpoint_to_diffusers``. The motion LoRA is in the original layout
(``...attention_blocks.0.processor.to_q_lora.down.weight``), as guoyww's ``v2_lora_*.ckpt``.

The SD1.5 module is v2-shaped (a mid-block module, 32 frames); the SDXL one SDXL-beta-shaped
(no mid block). Both are as narrow as the tiny UNets (32/64, two levels), too small for
their family to show in the shapes, so their safetensors metadata says it in ModelSpec's
``modelspec.architecture``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from .stfile import save_safetensors

#: Magnitudes: proj_out at this gain (x 1/sqrt(fan_in)) moves frames apart visibly; the
#: motion LoRA's down/up weights at this std change a 64x64 animation visibly.
MOTION_PROJ_GAIN = 1.0
MOTION_LORA_RANK = 4
MOTION_LORA_STD = 0.3

ARCH_SD15 = "stable-diffusion-v1/motion-module"
ARCH_SDXL = "stable-diffusion-xl-v1-base/motion-module"


def motion_adapter(unet_config: Any, seed: int, *, mid_block: bool) -> Any:
    """A random MotionAdapter fitting a UNet of ``unet_config`` (proj_out randomised)."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=tuple(unet_config["block_out_channels"]),
        motion_layers_per_block=unet_config["layers_per_block"],
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=unet_config["norm_num_groups"],
        motion_max_seq_length=32,
        use_motion_mid_block=mid_block,
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(adapter.named_parameters(), key=lambda item: item[0]):
            if name.endswith(".proj_out.weight"):
                std = MOTION_PROJ_GAIN / math.sqrt(param.shape[1])
            elif name.endswith(".proj_out.bias"):
                std = 0.02
            else:
                continue
            param.copy_(torch.randn(tuple(param.shape), generator=gen) * std)
    return adapter


def _save_folder(adapter: Any, folder: Path, arch: str) -> None:
    adapter.save_pretrained(str(folder), safe_serialization=True)
    # the same tensors, rewritten deterministically with the family in the metadata
    save_safetensors(adapter.state_dict(), folder / "diffusion_pytorch_model.safetensors",
                     {"format": "pt", "modelspec.architecture": arch})


_TO_ORIGINAL = ((".norm1", ".norms.0"), (".norm2", ".norms.1"), (".norm3", ".ff_norm"),
                (".attn1", ".attention_blocks.0"), (".attn2", ".attention_blocks.1"))
_MODULE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.")


def to_original_key(key: str) -> str:
    """A diffusers MotionAdapter key -> the original AnimateDiff name."""
    match = _MODULE.match(key)
    if not match:
        raise ValueError(f"not a motion module key: {key}")
    head, rest = key[:match.end()], key[match.end():]
    if rest.startswith("transformer_blocks."):
        for new, old in _TO_ORIGINAL:
            rest = rest.replace(new + ".", old + ".")
    return f"{head}temporal_transformer.{rest}"


def to_original_motion_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter state dict -> original AnimateDiff single-file tensors.

    Each ``transformer_blocks.N.pos_embed.pe`` becomes the ``pos_encoder.pe`` table of both
    of that block's attentions, as the original modules store it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".pos_embed.pe"):
            block = to_original_key(key.removesuffix(".pos_embed.pe") + ".x").removesuffix(".x")
            for attn in (0, 1):
                out[f"{block}.attention_blocks.{attn}.pos_encoder.pe"] = value.clone()
            continue
        out[to_original_key(key)] = value
    return out


def build_motion_modules(sd15_unet_config: Any, sdxl_unet_config: Any, paths: dict[str, Path],
                         seed: int) -> None:
    """tiny-motion-sd15 (folder + original single file), tiny-motion-sdxl (folder) and
    tiny-motion-lora (original layout, for tiny-motion-sd15)."""
    sd15 = motion_adapter(sd15_unet_config, seed, mid_block=True)
    _save_folder(sd15, paths["tiny-motion-sd15"], ARCH_SD15)
    save_safetensors(to_original_motion_module(sd15.state_dict()),
                     paths["tiny-motion-sd15-single"],
                     {"format": "pt", "modelspec.architecture": ARCH_SD15})
    sdxl = motion_adapter(sdxl_unet_config, seed + 1, mid_block=False)
    _save_folder(sdxl, paths["tiny-motion-sdxl"], ARCH_SDXL)
    build_motion_lora(sd15, paths["tiny-motion-lora"], seed + 2)


def build_motion_lora(adapter: Any, path: Path, seed: int) -> None:
    """An original-layout motion LoRA over every motion attention of ``adapter``."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(adapter.named_modules(), key=lambda item: item[0]):
        if not isinstance(module, torch.nn.Linear):
            continue
        match = re.search(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$", name)
        if not match:
            continue
        owner = to_original_key(name[:match.start()] + f".{match[1]}.x").removesuffix(".x")
        target = "to_out" if match[2] == "to_out.0" else match[2]
        base = f"{owner}.processor.{target}_lora"
        tensors[f"{base}.down.weight"] = torch.randn(
            (MOTION_LORA_RANK, module.in_features), generator=gen) * MOTION_LORA_STD
        tensors[f"{base}.up.weight"] = torch.randn(
            (module.out_features, MOTION_LORA_RANK), generator=gen) * MOTION_LORA_STD
    save_safetensors(tensors, path, {"format": "pt"})
