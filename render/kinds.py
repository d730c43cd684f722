"""Kinds of model file: where A1111 and ComfyUI keep each, and which hashes its infotext shows.

A plugin that needs a new kind of file (a LUT, a hypernetwork, a motion module) registers it
through the ``register_model_kinds`` hook; the resolver then finds those files by name in
every ``model_dirs`` folder exactly as it finds checkpoints. The core registers only what the
core keys use (``model``, ``vae``); every feature registers its own.

Example::

    from render.api import ModelKind, hookimpl

    @hookimpl
    def register_model_kinds(register):
        register(ModelKind("lut", folders=("LUTs", "luts"), extensions=(".cube",)))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from render.hookspecs import hookimpl
from render.weights import WEIGHT_EXTS

_HASH_SPEC = re.compile(r"^(sha256|addnet|legacy)(?::(\d+))?$")


@dataclass(frozen=True)
class ModelKind:
    """One kind of model file and how to find, hash and describe it.

    - ``folders``: folder names inside a ``models/`` folder, matched in any case; A1111's
      names first, then ComfyUI's (``("Lora", "LyCORIS", "loras")``).
    - ``beside``: folders next to a ``models/`` folder (A1111 keeps ``embeddings/`` there).
    - ``extensions``: file endings a name without extension tries, in order of preference.
      Diffusers folders (``config.json`` / ``model_index.json``) always match.
    - ``family``: read sd1/sd2/sdxl from the tensor shapes, so preflight can refuse an SDXL
      file on an SD1.5 model.
    - ``hashes``: extra hash fields the ``FileRef`` carries, name -> ``"sha256[:N]"``,
      ``"addnet[:N]"`` (A1111's hash of a LoRA's tensors, after the safetensors header) or
      ``"legacy"`` (A1111's old 8-digit model hash, still shown by sd-webui-controlnet).
    - ``infotext``: the A1111 infotext field the plugin writes those hashes to (for
      ``--list-plugins`` and the README; the plugin writes the field itself).
    - ``weights_only_pickles``: pickle files (``.pth``) of this kind are found without an
      ``allow_pickle`` alias, because the plugin promises to read them only through torch's
      weights-only unpickler (``load_state_dict``), which refuses a pickle that would run code.
      For kinds whose files are pickles by convention (ESRGAN upscalers); checkpoints,
      LoRAs and the like keep needing the alias.
    """

    name: str
    folders: tuple[str, ...]
    beside: tuple[str, ...] = ()
    extensions: tuple[str, ...] = WEIGHT_EXTS
    family: bool = False
    hashes: Mapping[str, str] = field(default_factory=dict)
    infotext: str = ""
    weights_only_pickles: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"model kind name {self.name!r}: use lower-case letters, digits, _")
        if isinstance(self.folders, str) or not self.folders:
            raise ValueError(f"model kind {self.name!r}: folders must be a tuple of names")
        if not all(e.startswith(".") and e == e.lower() for e in self.extensions):
            raise ValueError(f"model kind {self.name!r}: extensions look like '.safetensors'")
        for label, spec in self.hashes.items():
            if not _HASH_SPEC.match(spec):
                raise ValueError(f"model kind {self.name!r}: hash {label!r} must be "
                                 f"'sha256[:N]', 'addnet[:N]' or 'legacy', got {spec!r}")


def hash_spec(spec: str) -> tuple[str, int | None]:
    """``"addnet:12"`` -> ``("addnet", 12)``; ``"sha256"`` -> ``("sha256", None)``."""
    match = _HASH_SPEC.match(spec)
    assert match, spec  # checked when the kind was made
    return match[1], int(match[2]) if match[2] else None


class CoreKinds:
    """The kinds the core's own keys need (``model``, ``vae``), registered like any
    plugin's."""

    @hookimpl
    def register_model_kinds(self, register):  # noqa: ANN001 - the hook's documented shape
        register(ModelKind("checkpoint", ("Stable-diffusion", "checkpoints", "diffusers")))
        register(ModelKind("vae", ("VAE", "vae")))


core_kinds = CoreKinds()
