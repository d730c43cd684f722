"""Every hook a plugin can implement, in the order the stages call them.

A plugin is a module, package (or object) with functions named like these, decorated with
``hookimpl`` from ``render.api``, the plugin API (the types below are its types). Built-in
features in ``plugins/`` use exactly the same hooks and import nothing else from render.
Misspelled hook names are rejected at start-up (pluggy's ``check_pending``).

Example, a plugin that claims a ``grain:`` key and adds film grain after rendering::

    from render.api import hookimpl

    @hookimpl
    def register_task_fields(register):
        register("grain", lambda value, ctx: float(value))

    @hookimpl
    def postprocess(result, task):
        amount = task.sections.get("grain")
        if amount:
            result.images = [add_grain(im, amount) for im in result.images]
        return result
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the plugin API's types, named without importing them at run time
    from pathlib import Path

    from render.api import Batch, FileRef, Result, RunReport, Task
    from render.engine import ComponentCache, Renderer
    from render.models import ModelResolver

hookspec = pluggy.HookspecMarker("render")
hookimpl = pluggy.HookimplMarker("render")


# -- load ------------------------------------------------------------------------------------
@hookspec
def register_task_fields(register: Callable[..., None]) -> None:
    """Claim job-file keys. Call ``register(key, validator, *, where="task", doc="", stage=...,
    animates=False)``.

    ``validator(value, ctx)`` returns the normalised value or raises
    ``FieldError(message, subkey)``; ``ctx`` is a ``FieldContext`` (both in ``render.api``)
    (``ctx.base_dir`` to resolve relative paths, ``ctx.file``). ``where="output"`` claims a
    key of the ``output:`` section instead (e.g. ``save_control``). ``stage="post"`` says the
    key acts only on the rendered images (in ``postprocess``): tasks that differ only in such
    keys render their first pass once and each is postprocessed from a copy (a grid over
    upscalers renders once); label the files such a key's ``task_files`` returns
    ``"<key>:..."``. ``animates=True`` says a task with the key (not null) renders an
    animation: its job's ``output.format`` defaults to ``gif`` and a still format (png, jpg)
    there is an error at the key. A key nobody claims is an error with a did-you-mean.
    Example::

        @hookimpl
        def register_task_fields(register):
            register("lora", validate_lora_section, doc="LoRA name -> weight")
    """


@hookspec
def register_model_kinds(register: Callable[..., None]) -> None:
    """Declare kinds of model file. Call ``register(ModelKind(...))`` (``render.api``).

    A kind names its A1111 and ComfyUI folders, its extensions and the hashes its files
    carry; ``models.find(kind, name)`` in ``task_files`` then finds them by name in every
    ``model_dirs`` folder, and ``models.file_ref`` hashes them. A kind another plugin holds is
    refused (that plugin is not loaded). Example::

        @hookimpl
        def register_model_kinds(register):
            register(ModelKind("lut", folders=("LUTs", "luts"), extensions=(".cube",)))
    """


@hookspec
def register_output_formats(register: Callable[..., None]) -> None:
    """Declare values of ``output.format``. Call
    ``register(name, extension, *, animated=False, doc="")``.

    ``name`` is what a job file writes (lower case, e.g. ``"gif"``), ``extension`` the file
    extension with its dot (``".gif"``; a format written as a folder of files still names
    one). ``animated=True`` says the format holds an animation (a result with more than one
    image, see ``Result``). A format nobody registers is a job-file error with a
    did-you-mean; a name another plugin holds is refused (that plugin is not loaded). The
    core registers png, webp and jpg (alias jpeg); a plugin's ``write_output`` writes its
    formats. Example::

        @hookimpl
        def register_output_formats(register):
            register("gif", ".gif", animated=True, doc="animated GIF (Pillow)")
    """


# -- expand ----------------------------------------------------------------------------------
@hookspec
def expand_task(task: Task) -> list[Task] | None:
    """Rewrite or multiply a freshly expanded task; return a list to replace it, None to keep.

    Runs after wildcards, grid and seeds, before preflight. The LoRA plugin uses it to merge
    inline ``<lora:name:w>`` tags into its section. Example::

        @hookimpl
        def expand_task(task):
            if "<lora:" in task.prompt:
                return [dataclasses.replace(task, sections={**task.sections, "lora": ...})]
    """


# -- plan (preflight) ------------------------------------------------------------------------
@hookspec
def task_files(task: Task, models: ModelResolver) -> dict[str, FileRef] | None:
    """Resolve every file the plugin's section names; return ``{label: FileRef}``.

    ``models`` is the run's ``render.models.ModelResolver`` (``models.find(kind, name)``,
    ``models.file_ref(kind, name, path)``); ``task.files`` (read only) holds what the core
    and earlier plugins resolved: ``task.files["model"]``'s ``family`` says sd1/sd2/sdxl.
    Raise ``FieldError(message, subkey)`` for a missing or incompatible file: it becomes a
    ``file:line`` error before anything renders. The hashes go into the task id, the
    infotext and the provenance. ``models.deep_checks`` is True in a
    run and False in ``--dry-run``: only then may a check import torch and open weights (to
    detect an architecture); a dry run stays torch-free. Example::

        @hookimpl
        def task_files(task, models):
            names = task.sections.get("lora") or {}
            return {f"lora:{n}": models.file_ref("lora", n, models.find("lora", n)) for n in names}
    """


@hookspec
def group_key(task: Task) -> Any:
    """Return a hashable value: tasks with different values never share a pipeline call.

    Example: the LoRA stack ``tuple(sorted(task.sections["lora"].items()))``.
    """


# -- render ----------------------------------------------------------------------------------
@hookspec(firstresult=True)
def pipeline_class(task: Task, family: str) -> str | None:
    """Name the diffusers pipeline class for this task (first non-None answer wins).

    A name of a diffusers class, or a class itself: the engine makes the task's view with
    ``cls.from_pipe(resident_base, **components)`` (the AnimateDiff plugin answers a class
    whose ``from_pipe`` picks its ControlNet variant when a ``controlnet`` component is
    given). The core answers last with the family's txt2img/img2img/inpaint pipeline.
    Example::

        @hookimpl
        def pipeline_class(task, family):
            if task.sections.get("controlnet"):
                return "StableDiffusionXLControlNetPipeline" if family == "sdxl" else ...
    """


@hookspec
def pipeline_components(task: Task, family: str,
                        loader: ComponentCache) -> dict[str, Any] | None:
    """Extra components to pass to ``from_pipe`` (a ControlNetModel, a MotionAdapter).

    ``loader`` is the engine's ``render.engine.ComponentCache``: ``loader.get(key, build)``
    builds a component once per process and moves it to the engine's device and dtype.
    """


@hookspec
def configure_pipeline(pipe: Any, batch: Batch) -> None:
    """Prepare the pipeline for one batch: LoRA adapters and weights, memory options.

    Called before every batch with the batch's tasks (``batch.tasks``); undo here whatever a
    previous batch set that this one must not have.
    """


@hookspec
def task_inputs(task: Task, pipe: Any) -> dict[str, Any] | None:
    """Extra ``pipe(...)`` keyword arguments for one task (control image, depth map ...).

    When every task of a batch returns the identical object (``is``) or equal plain values
    for a keyword, it is passed once, as is; otherwise the values are stacked into a list in
    task order. Return the same cached object for per-call values (a ControlNet's scales,
    a shared control image) so a batch passes them once.
    """


# -- post ------------------------------------------------------------------------------------
@hookspec
def postprocess(result: Result, task: Task, renderer: Renderer) -> Result | None:
    """Transform a result after rendering (upscale, ...). Return the new result or None.

    Chained in call order (``tryfirst`` first: the hires fix, then face restoration, then
    upscaling, as A1111 orders them). ``renderer`` (``render.engine.Renderer``) is the
    engine's device, dtype and ``components`` cache (load an upscaler once per process), and
    ``renderer.img2img(task, inits, model=ref)`` runs a further diffusion pass on the resident
    models. It runs on the render thread while the writer saves earlier images. Example::

        @hookimpl
        def postprocess(result, task, renderer):
            if task.sections.get("grain"):
                result.images = [add_grain(im, renderer.device) for im in result.images]
                return result
    """


# -- write -----------------------------------------------------------------------------------
@hookspec
def result_metadata(task: Task, result: Result) -> dict[str, str] | None:
    """Fields for the A1111 infotext, e.g. ``{"Lora hashes": "a: 1234abcd, b: 5678ef90"}``.

    They are written after the core fields, in plugin order. Values are plain strings; the
    core quotes them as A1111 does (a value with ``,`` or ``:`` is JSON-quoted).
    """


@hookspec
def infotext_prompt(task: Task, prompt: str) -> str | None:
    """The prompt line of the A1111 infotext; return it with your tags added, or None.

    A1111 and civitai rebuild an image's networks from the ``<lora:name:w>`` tags in its
    prompt, so a plugin whose section (or a grid axis) added a network the prompt does not tag
    writes the tag here, with its effective weight: "send to txt2img" then renders the same
    image. Chained in call order, each implementation gets the previous one's prompt.
    Example::

        @hookimpl
        def infotext_prompt(task, prompt):
            missing = [n for n in task.sections.get("lora") or {} if f"<lora:{n}:" not in prompt]
            return prompt + "".join(f" <lora:{n}:1>" for n in missing) if missing else None
    """


@hookspec(firstresult=True)
def write_output(result: Result, path: Path, fmt: str) -> list[Path] | None:
    """Write ``result`` to ``path`` (extension already set) in format ``fmt``.

    Return the list of files written (side files included: they are recorded in the
    ledger), or None when this plugin does not handle ``fmt``. ``result.provenance`` holds
    the provenance with the final infotext under ``"infotext"``. Write atomically
    (``atomic_write`` from ``render.api``). The core handles png, webp and jpg, writing
    ``result.images[0]``. A result with more than one image is an animation (its frames, with
    ``result.fps`` and ``result.loop``): a writer of an animated format writes every frame;
    the built-in ``animation`` plugin takes ``webp`` when there is more than one image and
    leaves a single image to the core (it runs before the core's writer).
    """


# -- report ----------------------------------------------------------------------------------
@hookspec(firstresult=True)
def axis_label(key: str) -> str | None:
    """The name grid sheets print for the axis ``key`` of your section, or None (not yours).

    Sheets label a cell ``<name>: <value>`` as A1111's X/Y/Z plot does; the core names its
    own keys (``cfg`` -> ``CFG Scale``) and prints any other key as written. Example::

        @hookimpl
        def axis_label(key):
            if key.startswith("grain."):
                return "Film grain " + key.split(".", 1)[1]
            return "Film grain" if key == "grain" else None
    """


@hookspec
def run_finished(run: RunReport) -> None:
    """Called once after the last write, also for partial or failed runs.

    ``run`` is a ``render.api.RunReport`` (output roots, ledgers, jobs, counts, sheets). Grid sheets
    and the gallery are built here by the core.
    """
