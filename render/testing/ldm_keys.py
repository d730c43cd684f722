"""diffusers -> original LDM (A1111/civitai single-file) key names.

diffusers converts single files LDM -> diffusers only; the kit needs the reverse to write an
A1111-style ``.safetensors`` from its diffusers folder. The names follow the original
CompVis/SGM layout:

- UNet ``model.diffusion_model.*``: ``input_blocks.N.{0 resnet|1 attention}``, downsamplers as
  ``input_blocks.N.0.op``, ``middle_block.{0,1,2}``, ``output_blocks.N.{0,1,2}`` (upsampler
  after the attention when there is one), ``time_embed``, ``label_emb`` (SDXL), ``out``;
- VAE ``first_stage_model.*``: ``encoder.down.I.block.J``, ``decoder.up.I`` numbered from
  the lowest resolution (reversed), ``mid.block_1/attn_1/block_2``, 1x1-conv attention;
- CLIP-L text encoder ``cond_stage_model.transformer.text_model.*``.

Written from the layout, not copied; ``tests/testing`` proves the round trip through
``from_single_file`` is bit-exact. No torch import at module level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class UNetLayout:
    """The facts of a UNet config that decide LDM block numbers."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        per_block = config["layers_per_block"]
        if not isinstance(per_block, int):
            raise ValueError("only an int layers_per_block maps to LDM names")
        self.layers = per_block
        self.up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}" if tail else _RESNET.get(head, head)


def unet_name(name: str, layout: UNetLayout) -> str:
    """Map one diffusers UNet parameter or module name to its LDM name (no prefix)."""
    n = layout.layers
    for old, new in _TOP.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?", name)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        index = 1 + block * (n + 1) + layer
        if kind == "resnets":
            return _join(f"input_blocks.{index}.0", _resnet(rest) if rest else "")
        return _join(f"input_blocks.{index}.1", rest)
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(?:\.(.*))?", name)
    if m:
        return _join(f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op", m[2] or "")
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?", name)
    if m:
        kind, layer, rest = m[1], int(m[2]), m[3] or ""
        if kind == "resnets":
            return _join(f"middle_block.{2 * layer}", _resnet(rest) if rest else "")
        return _join(f"middle_block.{2 * layer + 1}", rest)
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?", name)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        index = block * (n + 1) + layer
        if kind == "resnets":
            return _join(f"output_blocks.{index}.0", _resnet(rest) if rest else "")
        return _join(f"output_blocks.{index}.1", rest)
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(?:\.(.*))?", name)
    if m:
        block = int(m[1])
        slot = 2 if layout.up_has_attention[block] else 1
        return _join(f"output_blocks.{block * (n + 1) + n}.{slot}.conv", m[2] or "")
    raise KeyError(f"no LDM name for UNet key {name!r}")


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def vae_name(name: str, num_up_blocks: int) -> str:
    """Map one diffusers AutoencoderKL key to its LDM name (no prefix)."""
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.*)", name)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name)
    if m:
        level = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name)
    if m:
        level = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", name)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", name)
    if m and m[2] in _VAE_ATTN:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if re.fullmatch(
        r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)",
        name,
    ):
        return name
    raise KeyError(f"no LDM name for VAE key {name!r}")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut", 1)


def clip_name(name: str) -> str:
    """Map a CLIPTextModel key (flattened or not, as transformers 4/5 write it) to LDM."""
    return CLIP_PREFIX + name.removeprefix("text_model.")


def to_ldm_checkpoint(
    unet: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    vae: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder: Mapping[str, Any],
) -> dict[str, Any]:
    """Build an SD1.x-style single-file state dict from diffusers state dicts.

    VAE attention projections become 1x1 convolutions ([C, C, 1, 1]) as in LDM checkpoints;
    diffusers squeezes them back when loading.
    """
    layout = UNetLayout(unet_config)
    out: dict[str, Any] = {}
    for key, value in unet.items():
        _put(out, UNET_PREFIX + unet_name(key, layout), value)
    ups = len(vae_config["up_block_types"])
    for key, value in vae.items():
        new = vae_name(key, ups)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        _put(out, VAE_PREFIX + new, value)
    for key, value in text_encoder.items():
        if key.endswith("position_ids"):
            continue
        _put(out, clip_name(key), value)
    return out


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if key in out:
        raise KeyError(f"two keys map to {key!r}")
    out[key] = value


def kohya_unet_name(module: str, layout: UNetLayout | None = None) -> str:
    """kohya's ``lora_unet_*`` name: diffusers names for SD1.x, SGM (LDM) names for SDXL."""
    name = unet_name(module, layout) if layout is not None else module
    return "lora_unet_" + name.replace(".", "_")


def kohya_te_name(module: str, prefix: str = "lora_te") -> str:
    """kohya's text-encoder name, always spelled from ``text_model.`` like transformers 4."""
    return f"{prefix}_text_model_" + module.removeprefix("text_model.").replace(".", "_")
