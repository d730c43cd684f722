"""The plugin API: the one module of render a plugin imports from.

Built-in plugins (``plugins/``) use only this module, so anything they can do a user's plugin
can do too; what is not here is the core's business and may change. Importing it does not
import torch: validation and ``--dry-run`` load every plugin without it.

- ``hookimpl``: decorate hook functions (the hooks are documented in ``render.hookspecs``).
- Values that flow between stages: ``Task``, ``FileRef``, ``Batch``, ``Result``,
  ``RunReport``; ``DEFAULT_STRENGTH`` (A1111's 0.75) and ``load_image`` (inputs at a
  size); ``load_frames``, ``frame_count``, ``first_frame`` and ``frame_files`` (the frames
  of a GIF, animated WebP, video or folder of images).
- ``UserError``: a mistake of the user's found at render time (one line, no traceback).
- Job-file keys: ``FieldError``, ``FieldContext`` and the ``expect_*`` validators
  (``expect_sampler``: an A1111 sampler name -> ``(sampler, schedule or None)``;
  ``expect_schedule``: an A1111 schedule type, e.g. ``Karras``);
  ``FieldErrors`` / ``raise_all`` report several problems of one task at once.
- Model files: ``ModelKind`` (for ``register_model_kinds``), ``WEIGHT_EXTS``, ``PICKLE_EXTS``,
  the readers that need no torch (``tensor_shapes``, ``safetensors_metadata``,
  ``checkpoint_info``, ``detect_family``, ``inert_pickle``: a pickle's contents as shapes,
  and the foreign globals it names) and ``load_state_dict`` (torch's weights-only
  unpickler for pickles); families: ``FAMILY_NAMES``, ``CONTEXT_FAMILY``, ``family_text``.
- Prompts: ``extra_network_tags`` and ``strip_extra_networks`` (A1111's ``<lora:x:1>`` tags),
  ``has_prompt_editing`` (``[a:b:0.5]``, ``[a|b]``), ``encode_prompts`` (the core's A1111
  prompt encoder: emphasis, long prompts; embeddings for ``pipe(...)``).
- Folders: ``walk_models`` (``os.walk`` of a model folder, bounded: links followed once,
  ``/proc``-like and unreadable folders skipped; ``TreeTooBig`` past the limits).
- Caching and output: ``per_file_version``, ``cache_dir``, ``atomic_write``,
  ``format_number`` (numbers as A1111's infotext writes them), ``quiet_logger``,
  ``shipped_config_source`` (the diffusers configs of SD1.5/SD2/SDXL that render ships).
- Metadata for a writer of its own format (``write_output``), as the core embeds it:
  ``png_info`` (PNG chunks: infotext + provenance), ``exif_bytes`` (EXIF UserComment holding
  the infotext), ``xmp_packet`` (XMP holding the provenance), ``provenance_json``,
  ``gif_with_xmp`` (a GIF's bytes with an XMP block), ``frame_infotext`` and
  ``frame_pnginfo`` (one frame of an animation as a PNG: its infotext, a marker naming the
  task); ``render.metadata.read_metadata`` reads each of them back.
"""

from __future__ import annotations

from render.configs import source_dir as shipped_config_source
from render.errors import FieldError, FieldErrors, UserError, raise_all
from render.fields import (
    FieldContext,
    describe,
    expect_bool,
    expect_file,
    expect_int,
    expect_number,
    expect_str,
)
from render.fields import validate_sampler as expect_sampler
from render.fields import validate_schedule as expect_schedule
from render.folders import TreeTooBig
from render.folders import walk as walk_models
from render.grids import section_axis_label
from render.hashing import cache_dir, per_file_version
from render.hookspecs import hookimpl
from render.images import first_frame, frame_count, frame_files, load_frames, load_image
from render.kinds import ModelKind
from render.metadata import (
    exif_bytes,
    format_number,
    frame_infotext,
    frame_pnginfo,
    gif_with_xmp,
    png_info,
    provenance_json,
    xmp_packet,
)
from render.output import atomic_write
from render.prompts import (
    encode_prompts,
    extra_network_tags,
    has_prompt_editing,
    strip_extra_networks,
)
from render.runner import RunReport
from render.tasks import DEFAULT_STRENGTH, Batch, FileRef, Result, Task
from render.weights import (
    CONTEXT_FAMILY,
    FAMILY_NAMES,
    PICKLE_EXTS,
    SAFE_EXTS,
    WEIGHT_EXTS,
    checkpoint_info,
    detect_family,
    family_text,
    inert_pickle,
    load_state_dict,
    quiet_logger,
    safetensors_metadata,
    tensor_shapes,
)

__all__ = [
    "DEFAULT_STRENGTH",
    "PICKLE_EXTS",
    "SAFE_EXTS",
    "WEIGHT_EXTS",
    "CONTEXT_FAMILY",
    "FAMILY_NAMES",
    "Batch",
    "FieldContext",
    "FieldError",
    "FieldErrors",
    "FileRef",
    "ModelKind",
    "Result",
    "RunReport",
    "Task",
    "TreeTooBig",
    "UserError",
    "atomic_write",
    "cache_dir",
    "checkpoint_info",
    "describe",
    "detect_family",
    "encode_prompts",
    "extra_network_tags",
    "has_prompt_editing",
    "family_text",
    "strip_extra_networks",
    "expect_bool",
    "expect_file",
    "expect_int",
    "expect_number",
    "expect_sampler",
    "expect_schedule",
    "expect_str",
    "exif_bytes",
    "format_number",
    "frame_infotext",
    "frame_pnginfo",
    "gif_with_xmp",
    "png_info",
    "provenance_json",
    "xmp_packet",
    "hookimpl",
    "inert_pickle",
    "first_frame",
    "frame_count",
    "frame_files",
    "load_frames",
    "load_image",
    "load_state_dict",
    "per_file_version",
    "quiet_logger",
    "raise_all",
    "shipped_config_source",
    "safetensors_metadata",
    "section_axis_label",
    "tensor_shapes",
    "walk_models",
]
