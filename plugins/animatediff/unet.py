"""The motion UNet of an AnimateDiff view, made of the resident base UNet's own modules, and
the per-call memory split of long animations.

diffusers' ``UNetMotionModel.from_unet2d`` copies every spatial weight of the base UNet into a
new model: each AnimateDiff view (txt2img, ControlNet, video-to-video) would hold another full
UNet (1.7 GB in fp16 for SD1.5). :func:`shared_motion_unet` builds the motion UNet's skeleton
on the meta device and puts the base UNet's modules into it (conv_in, time embedding, every
block's resnets, attentions and samplers, conv_out), and the MotionAdapter's own motion modules:
nothing is copied, a LoRA the LoRA plugin loads through any view acts in every view, and
peft's adapter registry (``peft_config``) is the base UNet's.

:func:`frame_split` is diffusers' FreeNoise split inference done for one call only: while it
is active the spatial layers run on at most ``frames`` frames at a time and the motion modules
on at most ``rows`` pixel rows, so a 64-frame animation peaks like a 16-frame one. By hand
because ``enable_free_noise_split_inference`` replaces the modules with wrappers for good,
renaming them (``attentions.0.module...``): the base UNet's modules are shared here, and a LoRA
loaded later would not find its layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

#: The spatial parts of each block that :func:`shared_motion_unet` takes from the base UNet.
_BLOCK_PARTS = ("resnets", "attentions", "downsamplers", "upsamplers")
#: The top-level modules it takes (those the base has; SDXL adds the text-time embedding).
_TOP_PARTS = ("conv_in", "time_proj", "time_embedding", "encoder_hid_proj", "add_time_proj",
              "add_embedding", "conv_norm_out", "conv_act", "conv_out")


def shared_motion_unet(unet: Any, adapter: Any) -> Any:
    """A ``UNetMotionModel`` over ``unet`` (a UNet2DConditionModel) and ``adapter``'s motion
    modules, sharing their modules (see the module docstring)."""
    import torch
    from accelerate import init_empty_weights
    with init_empty_weights():
        motion = _shared_unet_class().from_unet2d(unet, adapter, load_weights=False)
    for name in _TOP_PARTS:
        if getattr(unet, name, None) is not None:
            setattr(motion, name, getattr(unet, name))
    pairs = [*zip(motion.down_blocks, unet.down_blocks, adapter.down_blocks, strict=True),
             *zip(motion.up_blocks, unet.up_blocks, adapter.up_blocks, strict=True)]
    for ours, base, theirs in pairs:
        _take_block(ours, base)
        ours.motion_modules = theirs.motion_modules
    _take_block(motion.mid_block, unet.mid_block)
    if hasattr(motion.mid_block, "motion_modules"):
        motion.mid_block.motion_modules = adapter.mid_block.motion_modules
    left = [n for n, p in motion.named_parameters() if p.device == torch.device("meta")]
    left += [n for n, b in motion.named_buffers() if b.device == torch.device("meta")]
    if left:  # a UNet layout this code does not know: a bug to report, not to render with
        raise RuntimeError(f"the motion UNet over {type(unet).__name__} has parts that are "
                           f"not the base UNet's nor the motion module's: {left[:3]}")
    motion._render_base = [unet]   # a list: not registered as a submodule
    return motion


def _take_block(ours: Any, base: Any) -> None:
    """Put ``base``'s spatial layers into ``ours``: new ModuleLists holding the same layers
    (:func:`frame_split` swaps entries of ours without touching the base's lists)."""
    import torch

    for part in _BLOCK_PARTS:
        layers = getattr(base, part, None)
        if layers is None:
            continue
        if getattr(ours, part, None) is None:
            raise RuntimeError(f"the motion UNet's {type(ours).__name__} has no {part}")
        setattr(ours, part, torch.nn.ModuleList(list(layers)))


@cache
def _shared_unet_class() -> type:
    """The SharedMotionUNet class, made on first use (importing diffusers is slow)."""
    from diffusers import UNetMotionModel

    class SharedMotionUNet(UNetMotionModel):
        """UNetMotionModel whose peft adapter registry is the base UNet's (its layers are)."""

        @property
        def peft_config(self) -> Any:
            try:
                return self._render_base[0].peft_config
            except AttributeError:
                raise AttributeError("peft_config") from None

        @peft_config.setter
        def peft_config(self, value: Any) -> None:
            self._render_base[0].peft_config = value

        @property
        def _hf_peft_config_loaded(self) -> Any:
            return getattr(self._render_base[0], "_hf_peft_config_loaded", False)

        @_hf_peft_config_loaded.setter
        def _hf_peft_config_loaded(self, value: Any) -> None:
            base = self.__dict__.get("_render_base")
            if base:   # set by diffusers' __init__ before the base is known: ignore that one
                base[0]._hf_peft_config_loaded = value

    return SharedMotionUNet


# -- split inference ------------------------------------------------------------------------

@contextmanager
def frame_split(unet: Any, *, frames: int, rows: int = 256) -> Iterator[None]:
    """While active, ``unet``'s spatial layers see at most ``2 * frames`` images at once
    (classifier-free guidance doubles the batch) and its motion modules at most ``rows``
    pixel rows; outputs are the same, peak memory no longer grows with the frame count."""
    wrapped: list[Any] = []
    try:
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            for part in _BLOCK_PARTS:
                for layer in getattr(block, part, None) or ():
                    wrapped.append(_chunk_forward(layer, 2 * frames))
            for module in getattr(block, "motion_modules", None) or ():
                for layer in (module.proj_in, *module.transformer_blocks, module.proj_out):
                    wrapped.append(_chunk_forward(layer, rows))
        yield
    finally:
        for layer, before in reversed(wrapped):
            if before is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = before


def _chunk_forward(layer: Any, size: int) -> tuple[Any, Any]:
    """Make ``layer`` run its forward on slices of at most ``size`` along the batch axis:
    every tensor argument as long as the first one is cut, the outputs are concatenated."""
    import torch

    before = layer.__dict__.get("forward")   # an instance forward already (a hook's)
    forward = layer.forward

    def chunked(*args: Any, **kwargs: Any) -> Any:
        tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
        n = tensors[0].shape[0] if tensors else 0
        if n <= size:
            return forward(*args, **kwargs)

        def part(v: Any, i: int) -> Any:
            return v[i:i + size] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v

        outs = [forward(*(part(a, i) for a in args), **{k: part(v, i) for k, v in kwargs.items()})
                for i in range(0, n, size)]
        first = outs[0]
        if torch.is_tensor(first):
            return torch.cat(outs)
        if isinstance(first, tuple):
            return type(first)(torch.cat(parts) for parts in zip(*outs, strict=True))
        raise RuntimeError(f"{type(layer).__name__} returned {type(first).__name__}: cannot "
                           "be split by frames")

    layer.forward = chunked
    return layer, before
