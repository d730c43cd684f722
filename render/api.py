"""The plugin API: the one module of render a plugin imports from.

Built-in plugins (``plugins/``) use only this module, so anything they can do a user's plugin
can do too; what is not here is the core's business and may change. Importing it does not
import torch: validation and ``--dry-run`` load every plugin without it.

- ``hookimpl``: decorate hook functions (the hooks are documented in ``render.hookspecs``).
- Values that flow between stages: ``Task``, ``FileRef``, ``Batch``, ``Result``.
- Job-file keys: ``FieldError``, ``FieldContext`` and the ``expect_*`` validators.
- Model files: ``ModelKind`` (for ``register_model_kinds``), ``WEIGHT_EXTS``, ``PICKLE_EXTS``,
  the readers that need no torch (``tensor_shapes``, ``safetensors_metadata``,
  ``checkpoint_info``, ``detect_family``) and ``load_state_dict`` (torch's weights-only
  unpickler for pickles).
- Caching and output: ``per_file_version``, ``cache_dir``, ``atomic_write``,
  ``format_number`` (numbers as A1111's infotext writes them), ``quiet_logger``,
  ``shipped_config_source`` (the diffusers configs of SD1.5/SD2/SDXL that render ships).
"""

from __future__ import annotations

from render.configs import source_dir as shipped_config_source
from render.errors import FieldError
from render.fields import (
    FieldContext,
    describe,
    expect_bool,
    expect_file,
    expect_int,
    expect_number,
    expect_str,
)
from render.hashing import cache_dir, per_file_version
from render.hookspecs import hookimpl
from render.kinds import ModelKind
from render.metadata import format_number
from render.output import atomic_write
from render.tasks import Batch, FileRef, Result, Task
from render.weights import (
    PICKLE_EXTS,
    SAFE_EXTS,
    WEIGHT_EXTS,
    checkpoint_info,
    detect_family,
    load_state_dict,
    quiet_logger,
    safetensors_metadata,
    tensor_shapes,
)

__all__ = [
    "PICKLE_EXTS",
    "SAFE_EXTS",
    "WEIGHT_EXTS",
    "Batch",
    "FieldContext",
    "FieldError",
    "FileRef",
    "ModelKind",
    "Result",
    "Task",
    "atomic_write",
    "cache_dir",
    "checkpoint_info",
    "describe",
    "detect_family",
    "expect_bool",
    "expect_file",
    "expect_int",
    "expect_number",
    "expect_str",
    "format_number",
    "hookimpl",
    "load_state_dict",
    "per_file_version",
    "quiet_logger",
    "shipped_config_source",
    "safetensors_metadata",
    "tensor_shapes",
]
