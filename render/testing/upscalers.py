"""Tiny random-weight upscalers and a face restorer for the kit (imports torch and spandrel).

Each is built from spandrel's own architecture class, so spandrel detects and loads it exactly
as it loads a downloaded file, and saved in the layout such files come in:

- ``tiny-esrgan-x4.pth``: ESRGAN x4 (RRDBNet, 16 filters, 1 block) in Real-ESRGAN's (new)
  key layout (``conv_first``, ``body.0.rdb1.conv1``, ``conv_up1`` ...), wrapped in
  ``{"params_ema": ...}`` as the official Real-ESRGAN releases are; a torch zip pickle.
- ``tiny-compact-x2.safetensors``: Real-ESRGAN Compact (SRVGGNetCompact, 16 features,
  2 convolutions) x2.
- ``tiny-restoreformer.safetensors``: RestoreFormer with 32 channels, 5 levels, 1 residual
  block per level, a 64-entry codebook. The smallest spandrel still detects and that runs
  on a 512x512 face (its attention sits at 32x32 there). GFPGAN cannot be made small:
  spandrel builds it with fixed sizes (512 px, 512 style features, channel multiplier 2:
  ~340 MB of weights), and CodeFormer needs spandrel-extra-arches.

Random weights make noise, not images: an ESRGAN drawn at random outputs a near-constant
grey (std ~1e-5). So the convolutions that carry the image from input to output (first, up,
high-resolution and last) get a pass-through of the three colour channels at their centre
tap on top of small random weights, and the trunk stays random: the output is the input,
nearest-upsampled, with a visible random texture (mean difference from a Lanczos resize
well above 5/255). Compact already adds its nearest-upsampled input; its last convolution is
scaled to keep the texture at a similar strength. Seeded, so builds are byte-identical.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .stfile import save_safetensors

#: Standard deviation of the random weights on the pass-through convolutions of the ESRGAN.
ESRGAN_STD = 0.005
#: Scale of Compact's last convolution (its random output is otherwise ~28/255 of noise).
COMPACT_LAST_GAIN = 0.7


def _esrgan_model(seed: int, *, num_filters: int = 16, num_blocks: int = 1, scale: int = 4
                  ) -> Any:
    """spandrel's RRDBNet (old key layout) with pass-through weights on its outer convs."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    trunk_end = f"model.1.sub.{num_blocks}."
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("model.1.sub.") and not key.startswith(trunk_end):
                continue  # the RRDB blocks keep spandrel's (random) initialisation
            if key.endswith(".bias"):
                value.zero_()
                continue
            value.copy_(torch.randn(value.shape, generator=gen) * ESRGAN_STD)
            if not key.startswith(trunk_end):  # the trunk's end adds texture only
                for c in range(3):
                    value[c, c, 1, 1] += 1.0
    model.load_state_dict(state)
    return model.eval()


def esrgan_state(seed: int, **config: int) -> dict[str, torch.Tensor]:
    """A tiny ESRGAN's state dict in the old (ESRGAN repo) layout: ``model.0.weight`` ..."""
    return {k: v.detach().clone() for k, v in _esrgan_model(seed, **config).state_dict().items()}


def to_new_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old ESRGAN keys -> Real-ESRGAN's RRDBNet keys (what ``RealESRGAN_x4plus.pth`` holds).

    ``model.0`` -> ``conv_first``; ``model.1.sub.N.RDBj.convk.0`` -> ``body.N.rdbj.convk``;
    the trunk's last conv -> ``conv_body``; the up convs (``model.3``, ``model.6``) ->
    ``conv_up1``, ``conv_up2``; then ``conv_hr`` and ``conv_last``.
    """
    seq = sorted({int(k.split(".")[1]) for k in old if re.match(r"model\.\d+\.", k)})
    blocks = {int(m[1]) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))}
    n_blocks = max(blocks) + 1
    tail = [i for i in seq if i > 1]
    ups, hr, last = tail[:-2], tail[-2], tail[-1]
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last"}
    names.update({index: f"conv_up{n + 1}" for n, index in enumerate(ups)})
    new: dict[str, torch.Tensor] = OrderedDict()
    for key, value in old.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.fullmatch(rf"model\.1\.sub\.{n_blocks}\.(weight|bias)", key):
            new[f"conv_body.{m[1]}"] = value
        elif m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key):
            new[f"{names[int(m[1])]}.{m[2]}"] = value
        else:
            raise ValueError(f"unexpected ESRGAN key {key!r}")
    return new


def build_esrgan_x4(path: Path, seed: int) -> None:
    """``{"params_ema": <Real-ESRGAN layout>}`` saved with ``torch.save`` (a zip pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": to_new_layout(esrgan_state(seed))}, str(path))


def build_compact_x2(path: Path, seed: int) -> None:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_feat=16, num_conv=2, upscale=2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    last = max(int(k.split(".")[1]) for k in state)
    state[f"body.{last}.weight"] *= COMPACT_LAST_GAIN
    state[f"body.{last}.bias"] *= COMPACT_LAST_GAIN
    save_safetensors(state, path)


#: The tiny RestoreFormer's configuration (spandrel reads all of it back from the shapes).
RESTOREFORMER = {"n_embed": 64, "embed_dim": 32, "ch": 32, "ch_mult": (1, 1, 1, 1, 1),
                 "num_res_blocks": 1, "z_channels": 32}


def build_restoreformer(path: Path, seed: int) -> None:
    from spandrel.architectures.RestoreFormer import RestoreFormer

    torch.manual_seed(seed)
    model = RestoreFormer(**RESTOREFORMER)
    save_safetensors({k: v.detach().clone() for k, v in model.state_dict().items()}, path)


def build_upscalers(paths: dict[str, Path], seed: int) -> None:
    """Write the kit's three spandrel models to ``paths`` (kit entry name -> file)."""
    build_esrgan_x4(paths["tiny-esrgan-x4"], seed)
    build_compact_x2(paths["tiny-compact-x2"], seed + 1)
    build_restoreformer(paths["tiny-restoreformer"], seed + 2)
