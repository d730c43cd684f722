"""render: a plugin-driven batch renderer for Stable Diffusion.

Importing this package (or any core module that validation and ``--dry-run`` use) must not
import torch or diffusers: those are imported lazily inside the render stage.
"""

from render.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
