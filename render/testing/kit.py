"""Builders for the tiny random-weight model kit (imports torch and diffusers).

Each model is made from a fixed seed and saved with writers whose bytes are reproducible,
so two builds give identical files. Shapes mimic the real families (SD1.5, SDXL, SD2-depth)
closely enough that diffusers runs its real code paths: VAE scale factor 8, CLIP tokenizer
ids, LDM single-file names, kohya and peft LoRA formats, A1111 embeddings, ControlNet.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from render.clip_vocab import make_clip_tokenizer, write_vocab_files

from . import KIT_VERSION, MARKER, PATHS, _is_complete
from .ldm_keys import UNetLayout, kohya_te_name, kohya_unet_name, to_ldm_checkpoint
from .stfile import rewrite_safetensors, save_safetensors

# Magnitudes of the randomised parts, chosen so each visibly changes a 64x64, 4-step render
# (the tests assert the effect). Zero or tiny values would make a plugin test pass vacuously.
LORA_RANK = 4
LORA_ALPHA = 2.0
LORA_STD = 0.4
EMBEDDING_STD = 1.0
CONTROLNET_STD = 0.05
CONTROLNET_GAIN = 2.0
# CLIP's init puts the prompt's effect on a random UNet near 1/255; a stronger final norm
# makes prompts (and so embeddings and text-encoder LoRAs) matter, as they do in real models.
# SDXL's wider cross-attention dilutes it further, hence a larger gain there.
TEXT_NORM_GAIN = 4.0
SDXL_TEXT_NORM_GAIN = 8.0

SD15_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
SDXL_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 80,  # te1 hidden 32 + te2 hidden 48, like 768 + 1280
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 48 + 6 * 8,  # pooled te2 + six time ids
    "norm_num_groups": 32,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
DEPTH_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "sample_size": 8,
    "in_channels": 5,  # 4 latent channels + the depth map
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
VAE: dict[str, Any] = {
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 64,
}
SD_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _clip_config(hidden: int, *, act: str = "quick_gelu", projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden + hidden // 8 + 1,  # 37 for 32, an odd size on purpose
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _text_encoder(
    seed: int,
    hidden: int,
    *,
    projection: bool = False,
    act: str = "quick_gelu",
    gain: float = TEXT_NORM_GAIN,
) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(_clip_config(hidden, act=act))
    inner = getattr(model, "text_model", model)
    with torch.no_grad():
        inner.final_layer_norm.weight.mul_(gain)
    return model.eval()


def _unet(seed: int, config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def _vae(seed: int, scaling_factor: float = 0.18215) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE, scaling_factor=scaling_factor).eval()


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


# --------------------------------------------------------------------------- checkpoints


def build_sd15(out: Path, scratch: Path) -> Any:
    """SD1.5-shaped folder; returns the pipeline for the files derived from it."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=_vae(1),
        text_encoder=_text_encoder(2, 32),
        tokenizer=make_clip_tokenizer(scratch / "tok-sd15"),
        unet=_unet(3, SD15_UNET),
        scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, out)
    return pipe


def build_sd15_single(pipe: Any, path: Path) -> None:
    """The same weights under A1111/LDM names, fp32, one file."""
    state = to_ldm_checkpoint(
        pipe.unet.state_dict(),
        pipe.unet.config,
        pipe.vae.state_dict(),
        pipe.vae.config,
        pipe.text_encoder.state_dict(),
    )
    save_safetensors(state, path, {"format": "pt"})


def build_sdxl(out: Path, scratch: Path) -> Any:
    """SDXL-shaped folder: two text encoders, text_time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sched = {k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"}
    pipe = StableDiffusionXLPipeline(
        vae=_vae(11, scaling_factor=0.13025),
        text_encoder=_text_encoder(12, 32, gain=SDXL_TEXT_NORM_GAIN),
        text_encoder_2=_text_encoder(13, 48, projection=True, act="gelu", gain=SDXL_TEXT_NORM_GAIN),
        tokenizer=make_clip_tokenizer(scratch / "tok-xl-1"),
        tokenizer_2=make_clip_tokenizer(scratch / "tok-xl-2", pad_token="!"),
        unet=_unet(14, SDXL_UNET),
        scheduler=EulerDiscreteScheduler(
            **sched,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save_pipeline(pipe, out)
    return pipe


def _depth_estimator(seed: int) -> Any:
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    model = DPTForDepthEstimation(
        DPTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            backbone_out_indices=(0, 1, 2, 3),
            neck_hidden_sizes=(16, 16, 32, 32),
            fusion_hidden_size=16,
            is_hybrid=False,
        )
    )
    # transformers draws conv weights with std 0.02, so the signal fades to nothing through
    # the neck and the ReLU head outputs a constant, which the pipeline's min/max depth
    # normalisation turns into NaN. Re-draw the convolutions at unit gain instead.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(_normal(gen, tuple(module.weight.shape), 1.5 / fan_in**0.5))
                if module.bias is not None:
                    module.bias.zero_()
        last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.fill_(0.5)  # keep the final ReLU mostly open
    return model.eval()


def build_sd2_depth(out: Path, scratch: Path) -> Any:
    """SD2-depth-shaped folder (epsilon prediction, as stabilityai/stable-diffusion-2-depth)."""
    from diffusers import DDIMScheduler, StableDiffusionDepth2ImgPipeline
    from transformers import DPTImageProcessor

    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=_vae(21),
        text_encoder=_text_encoder(22, 64, act="gelu"),
        tokenizer=make_clip_tokenizer(scratch / "tok-depth", pad_token="!"),
        unet=_unet(23, DEPTH_UNET),
        scheduler=DDIMScheduler(**SD_SCHEDULER, clip_sample=False, prediction_type="epsilon"),
        depth_estimator=_depth_estimator(24),
        feature_extractor=processor,
    )
    _save_pipeline(pipe, out)
    return pipe


def _save_pipeline(pipe: Any, out: Path) -> None:
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():  # for transformers 4, which reads these, not tokenizer.json
            write_vocab_files(out / name)


# ----------------------------------------------------------------------------- ControlNet


def build_controlnet(unet: Any, out: Path, seed: int) -> None:
    """ControlNet copied from the UNet, with its zero convolutions made random.

    With default init the hint encoder (7 small convolutions) washes the control image out
    and only its biases reach the UNet: every control image would give the same picture.
    Re-drawing those convolutions at gain 2 makes the image itself matter (house vs
    checkerboard differ by ~9/255), and small zero-conv weights keep the scale responsive.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    gen = torch.Generator().manual_seed(seed)
    hint = net.controlnet_cond_embedding
    zero_init = [*net.controlnet_down_blocks, net.controlnet_mid_block, hint.conv_out]
    with torch.no_grad():
        for conv in [hint.conv_in, *hint.blocks]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(_normal(gen, tuple(conv.weight.shape), CONTROLNET_GAIN / fan_in**0.5))
            conv.bias.zero_()
        for conv in zero_init:
            conv.weight.copy_(_normal(gen, tuple(conv.weight.shape), CONTROLNET_STD))
            conv.bias.copy_(_normal(gen, tuple(conv.bias.shape), CONTROLNET_STD / 4))
    net.save_pretrained(str(out), safe_serialization=True)


# ----------------------------------------------------------------------------------- LoRA

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linears(model: Any, suffixes: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
            yield name, module


def _kohya_pairs(
    gen: torch.Generator, named: Iterator[tuple[str, torch.nn.Linear]], rename: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, module in sorted(named, key=lambda item: item[0]):
        key = rename(name)
        out[f"{key}.lora_down.weight"] = _normal(gen, (LORA_RANK, module.in_features), LORA_STD)
        out[f"{key}.lora_up.weight"] = _normal(gen, (module.out_features, LORA_RANK), LORA_STD)
        out[f"{key}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def _kohya_metadata(name: str, base: str, modules: str) -> dict[str, str]:
    return {
        "ss_base_model_version": base,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(LORA_RANK),
        "ss_network_alpha": str(LORA_ALPHA),
        "ss_output_name": name,
        "ss_v2": "False",
        "ss_training_comment": f"render test kit: random weights ({modules})",
        "ss_resolution": "(64, 64)",
    }


def build_kohya_sd15(pipe: Any, path: Path, seed: int, *, with_mlp: bool) -> None:
    """A kohya LoRA for tiny-sd15: diffusers-style UNet names, ``lora_te_`` text encoder."""
    gen = torch.Generator().manual_seed(seed)
    unet_targets = _UNET_TARGETS + (("ff.net.0.proj", "ff.net.2") if with_mlp else ())
    te_targets = _TE_TARGETS + (("fc1", "fc2") if with_mlp else ())
    tensors = _kohya_pairs(gen, _linears(pipe.unet, unet_targets), kohya_unet_name)
    tensors |= _kohya_pairs(gen, _linears(pipe.text_encoder, te_targets), kohya_te_name)
    modules = "attention + mlp" if with_mlp else "attention"
    save_safetensors(tensors, path, _kohya_metadata(path.stem, "sd_v1", modules))


def build_kohya_sdxl(pipe: Any, path: Path, seed: int) -> None:
    """A kohya SDXL LoRA: SGM/LDM UNet names (``input_blocks_4_1_...``), te1 and te2."""
    gen = torch.Generator().manual_seed(seed)
    layout = UNetLayout(pipe.unet.config)
    tensors = _kohya_pairs(
        gen, _linears(pipe.unet, _UNET_TARGETS), lambda n: kohya_unet_name(n, layout)
    )
    tensors |= _kohya_pairs(
        gen, _linears(pipe.text_encoder, _TE_TARGETS), lambda n: kohya_te_name(n, "lora_te1")
    )
    tensors |= _kohya_pairs(
        gen, _linears(pipe.text_encoder_2, _TE_TARGETS), lambda n: kohya_te_name(n, "lora_te2")
    )
    save_safetensors(tensors, path, _kohya_metadata(path.stem, "sdxl_base_v1-0", "attention"))


def build_peft_sd15(pipe: Any, path: Path, seed: int) -> None:
    """A diffusers/peft LoRA, written by ``save_lora_weights`` exactly as training scripts do."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    text_encoder = copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(_UNET_TARGETS))
    )
    text_encoder.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(_TE_TARGETS))
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
                if ".lora_A." in name or ".lora_B." in name:
                    param.copy_(_normal(gen, tuple(param.shape), LORA_STD))
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        weight_name=path.name,
        unet_lora_adapter_metadata=_sorted_config(unet.peft_config["default"]),
        text_encoder_lora_adapter_metadata=_sorted_config(text_encoder.peft_config["default"]),
    )
    rewrite_safetensors(path)  # two metadata keys: fix their order


def _sorted_config(config: Any) -> dict[str, Any]:
    """LoraConfig.to_dict() holds sets (target_modules): their order follows str hashing,
    which changes per process, so make them sorted lists."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


# ----------------------------------------------------------------------------- embeddings


def build_embeddings(sd15: Any, sdxl: Any, folder: Path, seed: int) -> None:
    """A1111 textual inversions: ``emb_params`` for SD1.x, ``clip_l``/``clip_g`` for SDXL."""
    gen = torch.Generator().manual_seed(seed)
    width = sd15.text_encoder.config.hidden_size
    save_safetensors(
        {"emb_params": _normal(gen, (2, width), EMBEDDING_STD)}, folder / "tiny-emb.safetensors"
    )
    save_safetensors(
        {
            "clip_l": _normal(gen, (2, sdxl.text_encoder.config.hidden_size), EMBEDDING_STD),
            "clip_g": _normal(gen, (2, sdxl.text_encoder_2.config.hidden_size), EMBEDDING_STD),
        },
        folder / "tiny-emb-xl.safetensors",
    )


# ---------------------------------------------------------------------------------- build


def build_into(root: Path) -> dict[str, float]:
    """Write every kit file under ``root`` (which should be empty); return seconds per step."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars

    diffusers_logging.disable_progress_bar()  # "Writing model shards" bars are noise here
    disable_progress_bars()
    timings: dict[str, float] = {}
    scratch = root / ".scratch"
    start = time.perf_counter()

    def lap(label: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[label] = now - start
        start = now

    p = {name: root / rel for name, rel in PATHS.items()}
    sd15 = build_sd15(p["tiny-sd15"], scratch)
    lap("tiny-sd15")
    build_sd15_single(sd15, p["tiny-sd15-single"])
    lap("tiny-sd15-single")
    sdxl = build_sdxl(p["tiny-sdxl"], scratch)
    lap("tiny-sdxl")
    build_sd2_depth(p["tiny-sd2-depth"], scratch)
    lap("tiny-sd2-depth")
    build_kohya_sd15(sd15, p["tiny-lora-a"], 101, with_mlp=False)
    build_kohya_sd15(sd15, p["tiny-lora-b"], 102, with_mlp=True)
    build_peft_sd15(sd15, p["tiny-lora-peft"], 103)
    build_kohya_sdxl(sdxl, p["tiny-lora-xl"], 104)
    lap("loras")
    build_embeddings(sd15, sdxl, p["tiny-emb"].parent, 201)
    lap("embeddings")
    build_controlnet(sd15.unet, p["tiny-controlnet-sd15"], 301)
    build_controlnet(sdxl.unet, p["tiny-controlnet-sdxl"], 302)
    lap("controlnets")
    from .upscalers import build_upscalers  # imports spandrel (~2.5 s, most of this lap)

    build_upscalers(p, 401)
    lap("upscalers")
    from .motion import build_motion_modules

    build_motion_modules(SD15_UNET, SDXL_UNET, p, 501)
    lap("motion modules")
    shutil.rmtree(scratch)
    return timings


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    from filelock import FileLock  # a dependency of torch, transformers and diffusers

    with FileLock(str(root / ".tiny-kit.lock")):
        yield


def build_models(root: Path, *, force: bool = False) -> dict[str, Path]:
    """Build under a lock into a temp folder, then move each entry into place.

    The marker is written last, so a reader that sees it sees complete files; a crash leaves
    no marker and the next call rebuilds.
    """
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / rel for name, rel in PATHS.items()}
    if not force and _is_complete(root):
        return paths
    with _locked(root):
        if not force and _is_complete(root):
            return paths
        (root / MARKER).unlink(missing_ok=True)
        for stale in root.glob(".tiny-kit-build-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-kit-build-", dir=root))
        try:
            build_into(tmp)
            for rel in PATHS.values():
                src, dst = tmp / rel, root / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                os.replace(src, dst)
            marker = {"kit_version": KIT_VERSION, "files": sorted(PATHS.values())}
            part = root / (MARKER + ".part")
            part.write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(part, root / MARKER)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths
