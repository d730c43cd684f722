"""A deterministic safetensors writer.

``safetensors.torch.save_file`` serialises the ``__metadata__`` mapping in hash-map order,
which changes from one process to the next whenever there is more than one metadata key
(safetensors 0.8.0 here). Kohya LoRAs carry a dozen ``ss_*`` keys, so the kit writes its own
files: sorted metadata, sorted tensor names, byte-for-byte reproducible. The format is the
public safetensors layout: an 8-byte little-endian header length, a JSON header padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` so that equal inputs always give equal bytes."""
    import torch

    if sys.byteorder != "little":  # pragma: no cover - every supported platform is
        raise RuntimeError("save_safetensors writes native bytes and needs a little-endian host")
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str: {bad}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} not supported")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for blob in blobs:
            fh.write(blob)
    os.replace(tmp, path)
    return path


def rewrite_safetensors(path: str | Path) -> Path:
    """Re-save a file written by another library so its metadata order is fixed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        names = list(fh.keys())
        tensors = {key: fh.get_tensor(key) for key in names}
    return save_safetensors(tensors, path, metadata)
