"""The built-in plugins: LoRA, embeddings, ControlNet, depth-to-image, ...

This folder ships inside the installed package as ``render.builtin_plugins`` (see
``[tool.setuptools.package-dir]`` in pyproject.toml). Every module or sub-package in it is
loaded at start-up, through the plugin API only, exactly as a plugin of a user's would be:
read them as examples. A file dropped here in a checkout loads the same way.
"""
