"""A1111 hypernetwork files with random weights, for tests (not part of the kit build).

:func:`write_hypernetwork` writes what A1111's "Train > Create hypernetwork" saves: a
``torch.save`` pickle of a dict whose integer keys are context widths, each holding a pair of
state dicts (keys, values) of the ``Sequential`` A1111 builds (``Linear``, the activation, the
layer norm, dropout, per layer, so the indices have A1111's gaps), beside A1111's metadata
keys. Written with a ``.safetensors`` suffix, the same tensors go flattened as the
hypernetwork plugin reads them (``<width>.<0|1>.linear.<n>.weight``, metadata as JSON values).
The weights are scaled so that a 32-wide hypernetwork visibly changes a 64x64 render of the
kit's ``tiny-sd15`` (cross-attention width 32) at strength 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Default weight scale: each layer's output is about ``scale`` times its input in size.
HYPERNETWORK_SCALE = 1.0


def _module_state(gen: Any, width: int, layer_structure: Sequence[float], scale: float, *,
                  activation: bool, activate_output: bool, layer_norm: bool,
                  dropout: Sequence[float]) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {}
    index = 0
    layers = len(layer_structure) - 1
    for i in range(layers):
        fan_in, fan_out = int(width * layer_structure[i]), int(width * layer_structure[i + 1])
        std = scale / fan_in ** 0.5
        state[f"linear.{index}.weight"] = torch.randn((fan_out, fan_in), generator=gen) * std
        state[f"linear.{index}.bias"] = torch.randn((fan_out,), generator=gen) * 0.1 * scale
        index += 1
        if activation and (i < layers - 1 or activate_output):
            index += 1
        if layer_norm:
            state[f"linear.{index}.weight"] = 1 + torch.randn((fan_out,), generator=gen) * 0.1
            state[f"linear.{index}.bias"] = torch.randn((fan_out,), generator=gen) * 0.1
            index += 1
        if dropout[i + 1] > 0:
            index += 1
    return state


def write_hypernetwork(
    path: str | Path,
    widths: Sequence[int] = (32,),
    layer_structure: Sequence[float] = (1, 2, 1),
    seed: int = 0,
    scale: float = HYPERNETWORK_SCALE,
    *,
    activation_func: str = "linear",
    layer_norm: bool = False,
    activate_output: bool = False,
    use_dropout: bool = False,
    name: str | None = None,
) -> Path:
    """Write an A1111 hypernetwork (``.pt``; or flattened ``.safetensors``) to ``path``.

    ``widths``: the context widths it has modules for (32 for ``tiny-sd15``, 80 for
    ``tiny-sdxl``; 768 for a real SD 1.x one). The other arguments are A1111's creation
    options. Equal arguments give equal tensors (one ``torch.Generator`` seeded with
    ``seed``).
    """
    import torch

    path = Path(path)
    gen = torch.Generator("cpu").manual_seed(seed)
    structure = list(layer_structure)
    dropout = [0.0] * len(structure)
    if use_dropout:  # A1111's rule without last-layer dropout: 0.3 after all but the last two
        dropout = [0.0] + [0.3] * (len(structure) - 3) + [0.0, 0.0]
    options = {"activation": activation_func != "linear", "activate_output": activate_output,
               "layer_norm": layer_norm, "dropout": dropout}
    modules = {
        width: tuple(_module_state(gen, width, structure, scale, **options) for _ in range(2))
        for width in widths}
    metadata: dict[str, Any] = {
        "step": 0, "name": name or path.stem, "layer_structure": structure,
        "activation_func": activation_func, "is_layer_norm": layer_norm,
        "weight_initialization": "Normal", "sd_checkpoint": None, "sd_checkpoint_name": None,
        "activate_output": activate_output, "use_dropout": use_dropout,
        "dropout_structure": dropout, "last_layer_dropout": False, "optional_info": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from .stfile import save_safetensors

        flat = {f"{width}.{part}.{key}": tensor
                for width, pair in modules.items()
                for part, state in enumerate(pair) for key, tensor in state.items()}
        return save_safetensors(flat, path, {k: json.dumps(v) for k, v in metadata.items()})
    torch.save({**modules, **metadata}, path)
    return path
