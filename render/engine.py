"""The render stage: resident pipelines, task variants via ``from_pipe``, one call per batch.

Design points (the why):

- One resident base pipeline per model file, loaded once. Every task kind (txt2img, img2img,
  inpaint, a plugin's ControlNet or depth pipeline) is a view made by diffusers' ``from_pipe``
  that shares the base's modules, so switching kinds costs nothing and never reloads weights.
  The base object itself is never changed: its scheduler config and VAE are kept at load, and
  each batch sets its own scheduler and VAE on the view it uses.
- One ``torch.Generator`` per image, seeded with the task's seed, so an image is the same
  whatever batch it lands in (up to float noise of batched kernels).
- The text the encoder sees has A1111 extra-network tags (``<lora:x:0.6>``) taken out; the
  plugins that own them act on the task's sections.
- Out of memory: free, split the batch in halves down to one image, then turn on attention
  slicing, then VAE slicing and tiling. What was used is recorded in ``Result.notes``, and
  the batch size that worked is remembered for :meth:`Engine.batch_size_for`.

Single-file checkpoints load with the diffusers config chosen at resolve time
(``render.models.ModelResolver.single_file_config``: the alias's ``config:``, a same-stem
diffusers folder beside the file, or a config shipped in ``render/configs/``). Pickle files
(``.ckpt``/``.pt``/``.bin``/``.pth``) load only when their alias says ``allow_pickle: true``,
and then through torch's weights-only unpickler.

torch and diffusers are imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import gc
import inspect
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from render.errors import UserError
from render.images import load_image
from render.prompts import strip_extra_networks
from render.tasks import DEFAULT_STRENGTH, Batch, FileRef, Result, Task
from render.weights import check_pickle, load_state_dict, quiet_logger

#: A1111 extra-network tags (``<lora:name:0.6>``, ``<hypernet:x:1>``): not prompt text.

#: The core's pipeline for each family and task kind.
DEFAULT_PIPELINES: dict[str, dict[str, str]] = {
    "sd1": {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    "sdxl": {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
}
DEFAULT_PIPELINES["sd2"] = DEFAULT_PIPELINES["sd1"]

#: Memory savers turned on, in this order, when one image still does not fit.
MEMORY_STEPS = ("attention slicing", "vae slicing", "vae tiling")

#: Pipeline views kept per resident model (each is cheap: it shares the base's modules).
MAX_VIEWS = 16


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def default_pipeline_class(task: Task, family: str, in_channels: int = 4) -> str:
    """The core's answer to ``pipeline_class``: the family's txt2img/img2img/inpaint class.

    A 9-channel (inpainting) UNet always needs the inpaint pipeline and a mask; a 5-channel
    (depth) UNet needs StableDiffusionDepth2ImgPipeline and an init image.
    """
    if family not in DEFAULT_PIPELINES:
        raise UserError(f"unknown model family {family!r}; expected sd1, sd2 or sdxl")
    kind = task.kind
    if in_channels == 9 and kind != "inpaint":
        raise UserError(
            f"model '{task.model}' is an inpainting model (9-channel UNet): give the task an"
            " image and a mask"
        )
    if in_channels == 5:
        if kind == "txt2img":
            raise UserError(
                f"model '{task.model}' is a depth-to-image model: give the task an image (or"
                " a depth: section)"
            )
        return "StableDiffusionDepth2ImgPipeline"
    return DEFAULT_PIPELINES[family][kind]


#: How the allocators word running out: CUDA/MPS ("out of memory"), the CPU allocator
#: ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."), oneDNN/MKL.
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory",
              "failed to allocate memory")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors (the savers help on every device)."""
    import torch

    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None),
                    getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None
    )
    if isinstance(exc, MemoryError) or (oom_types and isinstance(exc, oom_types)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXTS)


class NonFiniteImage(RuntimeError):
    """The pipeline returned NaN/inf pixels (it would be saved as a black image)."""


def probe_v_prediction(unet: Any, device: Any, dtype: Any) -> bool:
    """Whether an SD 2.x UNet predicts v, by running it once (shapes cannot tell).

    At the last training timestep the input is almost pure noise (sqrt(alpha_bar) ~ 0.07).
    An epsilon model's best answer is then the input itself (cosine ~ 1); a v model answers
    ~ -x0, an image estimate nearly uncorrelated with the noise (cosine ~ 0).
    """
    import torch

    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 64, 64, generator=gen).to(device, dtype)
    context_dim = unet.config.cross_attention_dim
    if isinstance(context_dim, (list, tuple)):
        context_dim = context_dim[0]
    context = torch.zeros(1, 77, int(context_dim), device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=context).sample
    cos = torch.nn.functional.cosine_similarity(
        out.flatten().float(), x[:, : out.shape[1]].flatten().float(), dim=0
    )
    return float(cos) < 0.5


class ComponentCache:
    """Components plugins need (ControlNetModel, MotionAdapter), built once per process.

    ``get(key, build)`` calls ``build()`` the first time and moves a torch module to the
    engine's device and dtype; later calls return the same object.
    """

    def __init__(self, device: str, dtype: Any) -> None:
        self.device = device
        self.dtype = dtype
        self._items: dict[Any, Any] = {}
        self.builds = 0

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._items:
            obj = build()
            if _is_module(obj):
                with quiet_logger("diffusers.models.modeling_utils"):
                    obj = obj.to(self.device, self.dtype)
            self._items[key] = obj
            self.builds += 1
        return self._items[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


@dataclass
class Resident:
    """A loaded base pipeline and what the engine keeps beside it."""

    ref: FileRef
    pipe: Any
    family: str
    in_channels: int
    scheduler_config: Any          # the model's own scheduler config, as loaded
    vae: Any                       # the model's own VAE
    config_dir: Path               # a diffusers folder with this model's component configs
    load_seconds: float
    views: dict[Any, Any] = field(default_factory=dict)
    memory: list[str] = field(default_factory=list)   # MEMORY_STEPS turned on after OOMs
    notes: list[str] = field(default_factory=list)    # e.g. "prediction v (probed)"
    sliced: bool = False


class Engine:
    """Renders batches on one device; see the module docstring for the design.

    Tasks arrive preflighted: their ``files`` name every checkpoint and VAE to load.
    ``max_batch`` caps :meth:`batch_size_for`; ``max_resident`` is how many base pipelines
    stay loaded at once (the planner orders batches so each model loads once).
    """

    def __init__(
        self,
        pm: Any,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_batch: int | None = None,
        max_resident: int = 1,
    ) -> None:
        import torch

        self.pm = pm
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(self.device, dtype)
        self.torch_dtype = getattr(torch, self.dtype)
        self.max_batch = max_batch
        self.max_resident = max(1, max_resident)
        self.components = ComponentCache(self.device, self.torch_dtype)
        self.residents: OrderedDict[str, Resident] = OrderedDict()
        self.loads: dict[str, int] = {}          # model path -> times loaded (tests, stats)
        self._vaes: dict[tuple[str, str], Any] = {}
        self._limits: dict[tuple[Any, ...], int] = {}  # batch sizes that fit after an OOM
        self.renderer = Renderer(self.device, self.torch_dtype, engine=self)

    # -- provenance ------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Device, dtype and library versions for the provenance chunk."""
        import platform

        import diffusers
        import torch
        import transformers

        if self.device.startswith("cuda"):
            name = torch.cuda.get_device_name(torch.device(self.device))
        elif self.device == "mps":
            name = f"Apple MPS ({platform.machine()})"
        else:
            name = f"CPU ({platform.processor() or platform.machine()})"
        versions = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }
        if torch.version.cuda and self.device.startswith("cuda"):
            versions["cuda"] = torch.version.cuda
        return {"device": name, "device_type": self.device, "dtype": self.dtype,
                "versions": versions}

    # -- models ----------------------------------------------------------------------------
    @staticmethod
    def _model_ref(task: Task) -> FileRef:
        """The checkpoint preflight resolved (the engine never resolves names itself)."""
        ref = task.files.get("model")
        if ref is None:
            raise RuntimeError(f"task {task.short_id} reached the engine without preflight")
        return ref

    def resident(self, ref: FileRef, *, room: int = 0) -> Resident:
        """The base pipeline of ``ref``, loading it (and evicting the oldest) if needed.

        ``room`` more models may stay loaded besides the usual ``max_resident``: a second
        pass on another checkpoint keeps the first pass's model.
        """
        key = ref.path
        if key in self.residents:
            self.residents.move_to_end(key)
            return self.residents[key]
        while len(self.residents) >= self.max_resident + room:
            _, old = self.residents.popitem(last=False)
            del old
            self._free()
        res = self._load(ref)
        self.residents[key] = res
        self.loads[key] = self.loads.get(key, 0) + 1
        return res

    def _load(self, ref: FileRef) -> Resident:
        # from_single_file casts with .to(dtype), which makes diffusers warn about nothing.
        with _no_progress_bars(), quiet_logger("diffusers.models.modeling_utils"):
            return self._load_quietly(ref)

    def _load_quietly(self, ref: FileRef) -> Resident:
        import diffusers

        from render.weights import checkpoint_info

        start = time.perf_counter()
        path = Path(ref.path)
        extra = dict(ref.extra or {})
        info = None
        if "format" not in extra:  # a FileRef made without resolve_model
            info = checkpoint_info(path)
            extra.update(format=info.format, in_channels=info.in_channels)
        family = ref.family or (info or checkpoint_info(path)).family
        in_channels = int(extra.get("in_channels") or 4)
        dtype = self.torch_dtype
        notes: list[str] = []
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            cls = getattr(diffusers, str(index.get("_class_name")), diffusers.DiffusionPipeline)
            kwargs: dict[str, Any] = {}
            if "safety_checker" in index:  # A1111 has none; neither do we
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            try:
                pipe = cls.from_pretrained(
                    str(path), local_files_only=True, **_dtype_kw(dtype), **kwargs
                )
            except OSError as exc:
                raise UserError(f"cannot load diffusers folder {path}: {exc}") from exc
            config_dir = path
        else:
            config_dir = self._single_file_config(ref, extra)
            index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
            cls_name = str(index.get("_class_name"))
            if in_channels == 9:
                cls_name = DEFAULT_PIPELINES[family]["inpaint"]
            cls = getattr(diffusers, cls_name)
            kwargs = {"config": str(config_dir), "local_files_only": True, **_dtype_kw(dtype)}
            check_pickle(path, bool(extra.get("allow_pickle")))
            unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
            if in_channels != int(unet_config.get("in_channels", 4)):
                kwargs["unet"] = diffusers.UNet2DConditionModel.from_single_file(
                    str(path), config=str(config_dir), subfolder="unet",
                    in_channels=in_channels, local_files_only=True, **_dtype_kw(dtype),
                )
            pipe = cls.from_single_file(str(path), **kwargs)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if (
            family == "sd2" and in_channels == 4 and extra.get("format") == "single_file"
            and extra.get("shipped_config") and not extra.get("prediction")
        ):
            v = probe_v_prediction(pipe.unet, self.device, dtype)
            notes.append(f"prediction {'v' if v else 'epsilon'} (probed)")
            if v:
                pipe.scheduler = type(pipe.scheduler).from_config(
                    pipe.scheduler.config, prediction_type="v_prediction"
                )
        elif extra.get("prediction") == "v":
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, prediction_type="v_prediction"
            )
        elif extra.get("prediction") == "epsilon":
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, prediction_type="epsilon"
            )
        return Resident(
            ref=ref, pipe=pipe, family=family, in_channels=in_channels,
            scheduler_config=pipe.scheduler.config, vae=pipe.vae, config_dir=config_dir,
            load_seconds=time.perf_counter() - start, notes=notes,
        )

    @staticmethod
    def _single_file_config(ref: FileRef, extra: Mapping[str, Any]) -> Path:
        if extra.get("config"):
            return Path(str(extra["config"]))
        shipped = extra.get("shipped_config")
        if not shipped:  # preflight decides the config of every single file
            raise RuntimeError(f"{ref.path}: no config was decided for this single file")
        from render.configs import shipped_config_dir

        return shipped_config_dir(str(shipped))

    def vae_for(self, res: Resident, ref: FileRef | None) -> Any:
        """The VAE a batch decodes with: the model's own, or an override (cached)."""
        if ref is None:
            return res.vae
        key = (ref.path, str(res.config_dir))
        if key not in self._vaes:
            with _no_progress_bars(), quiet_logger("diffusers.models.modeling_utils"):
                self._vaes[key] = self._load_vae(res, ref)
        return self._vaes[key]

    def _load_vae(self, res: Resident, ref: FileRef) -> Any:
        from diffusers import AutoencoderKL

        path = Path(ref.path)
        dtype = self.torch_dtype
        if path.is_dir():
            sub = "vae" if (path / "model_index.json").is_file() else None
            vae = AutoencoderKL.from_pretrained(
                str(path), subfolder=sub, local_files_only=True, **_dtype_kw(dtype)
            )
        else:
            state = load_state_dict(path, allow_pickle=bool((ref.extra or {}).get("allow_pickle")))
            vae = AutoencoderKL.from_single_file(
                state, config=str(res.config_dir), subfolder="vae", local_files_only=True,
                **_dtype_kw(dtype),
            )
        return vae.to(self.device)

    # -- views -----------------------------------------------------------------------------
    def pipeline_for(self, res: Resident, task: Task) -> Any:
        """The pipeline serving ``task``: a ``from_pipe`` view of the resident base."""
        import diffusers

        hook = self.pm.hook
        answer = hook.pipeline_class(task=task, family=res.family)
        if answer is None:
            answer = default_pipeline_class(task, res.family, res.in_channels)
        if isinstance(answer, str):
            cls = getattr(diffusers, answer, None)
            if cls is None:
                raise UserError(f"diffusers {diffusers.__version__} has no pipeline {answer!r}")
        else:
            cls = answer
        components: dict[str, Any] = {}
        for part in hook.pipeline_components(task=task, family=res.family, loader=self.components):
            for name, value in (part or {}).items():
                if name in components and components[name] is not value:
                    raise UserError(f"two plugins give the pipeline component {name!r}")
                components[name] = value
        key = (cls.__name__, tuple(sorted((k, id(v)) for k, v in components.items())))
        return self._view(res, key, cls, components)

    def _view(self, res: Resident, key: Any, cls: Any, components: Mapping[str, Any]) -> Any:
        """The ``from_pipe`` view of ``res`` under ``key``, made once and kept (the oldest
        dropped past MAX_VIEWS)."""
        if key not in res.views:
            # from_pipe casts every module to its dtype, float32 by default: without it
            # a half-precision base would be silently converted (and double its memory).
            with quiet_logger("diffusers.models.modeling_utils"):
                view = cls.from_pipe(res.pipe, **_dtype_kw(self.torch_dtype), **components)
            view.set_progress_bar_config(disable=True)
            res.views[key] = view
            while len(res.views) > MAX_VIEWS:  # plugins that rebuild components each time
                res.views.pop(next(iter(res.views)))
        return res.views[key]

    def second_pass_pipeline(self, res: Resident) -> Any:
        """The plain img2img view of ``res`` (no plugin's pipeline or components): the
        pipeline a second pass (hires fix) renders with."""
        import diffusers

        if res.in_channels not in (4, 5):
            raise UserError(f"model '{res.ref.name}' has a {res.in_channels}-channel UNet (an "
                            "inpainting model): it cannot render a second img2img pass")
        name = ("StableDiffusionDepth2ImgPipeline" if res.in_channels == 5
                else DEFAULT_PIPELINES[res.family]["img2img"])
        return self._view(res, ("second pass", name), getattr(diffusers, name), {})

    # -- batch sizes -----------------------------------------------------------------------
    def batch_size_for(self, task: Task) -> int:
        """How many images of this task's size to render per call (``--batch-size 0``).

        CUDA: free memory over a per-image estimate (about 5 KiB per output pixel in half
        precision for SD1/2, 6 KiB for SDXL, covering UNet activations and the VAE decode),
        less the model's weights if they are not loaded yet. A heuristic: an OOM still
        splits the batch, and the size that worked is remembered. CPU: batching buys little,
        so 1-4 by image size. Capped by ``max_batch`` (default 8).
        """
        cap = self.max_batch or 8
        pixels = task.width * task.height
        model = task.files.get("model")
        learned = self._limits.get(self._limit_key(task))
        if learned:
            cap = min(cap, learned)
        if self.device.startswith("cuda"):
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            family = model.family if model else "sd1"
            per_pixel = (6 if family == "sdxl" else 5) * 1024
            per_image = pixels * per_pixel * (2 if self.dtype == "float32" else 1)
            if model is None or model.path not in self.residents:
                free -= _weights_size(model) if model else 0
            return max(1, min(cap, int(free * 0.85 // per_image)))
        if self.device == "mps":
            return max(1, min(cap, 2 if pixels <= 512 * 512 else 1))
        if pixels <= 256 * 256:
            return max(1, min(cap, 4))
        return max(1, min(cap, 2 if pixels <= 512 * 512 else 1))

    def _limit_key(self, task: Task) -> tuple[Any, ...]:
        model = task.files.get("model")
        return (model.path if model else task.model, task.width, task.height, task.kind)

    # -- rendering -------------------------------------------------------------------------
    def render(self, batch: Batch) -> list[Result]:
        """Render every task of ``batch`` (they share model, kind, size, steps, sampler ...).

        Returns one Result per task, in order, with ``images`` (PIL), ``timings`` in seconds
        (``load``, ``encode``, ``sample``, ``per_image``) and ``notes``.
        """
        tasks = list(batch.tasks)
        if not tasks:
            return []
        first = tasks[0]
        model = self._model_ref(first)
        loaded_before = model.path in self.residents
        res = self.resident(model)
        load_s = 0.0 if loaded_before else res.load_seconds
        pipe = self.pipeline_for(res, first)
        pipe.vae = self.vae_for(res, first.files.get("vae"))
        pipe.scheduler = self._scheduler(first, res)
        self.pm.hook.configure_pipeline(pipe=pipe, batch=batch)
        results: list[Result] = []
        # A pipeline call takes one strength, and pads every prompt to the longest one's
        # chunk count (which would change a short prompt's image): tasks that differ in
        # either go in separate calls, so a task's pixels never depend on its neighbours.
        for group in _groups_by(tasks, lambda t: (t.strength, _chunks(pipe, t))):
            notes: list[str] = []
            out = self._render_finite(res, pipe, group, notes)
            for task, (images, timing, call_notes) in zip(group, out, strict=True):
                timings = {"load": load_s, **timing}
                load_s = 0.0
                all_notes = [*res.notes, *notes, *call_notes]
                results.append(Result(task=task, images=images, timings=timings,
                                      notes=list(dict.fromkeys(all_notes))))
        order = {id(task): i for i, task in enumerate(tasks)}
        return sorted(results, key=lambda r: order[id(r.task)])

    def _scheduler(self, task: Task, res: Resident) -> Any:
        from render.samplers import make_scheduler

        try:
            return make_scheduler(task.sampler, task.schedule, res.scheduler_config)
        except ValueError as exc:
            raise UserError(str(exc)) from exc

    def _render_finite(
        self, res: Resident, pipe: Any, tasks: list[Task], notes: list[str],
        inits: list[Any] | None = None,
    ) -> list[tuple[list[Any], dict[str, float], list[str]]]:
        """Render; an image with NaN/inf pixels (saved, it would be black) is rendered again
        with the VAE decoding in float32 (the half-precision SD1.5/SDXL VAE overflows on some
        latents, a known case), and still non-finite, fails its batch with a clear message."""
        out = self._render_fitting(res, pipe, tasks, notes, inits)
        bad = [k for k, (images, _, _) in enumerate(out) if not _finite(images)]
        if bad and _dtype_name(pipe.vae) != "float32":
            with _float32_decode(pipe.vae):
                again = self._render_fitting(res, pipe, [tasks[k] for k in bad], notes,
                                             [inits[k] for k in bad] if inits else None)
            for k, (images, timing, call_notes) in zip(bad, again, strict=True):
                out[k] = (images, timing, [*call_notes, "VAE decoded in float32 after NaN"])
            bad = [k for k, (images, _, _) in enumerate(out) if not _finite(images)]
        if bad:
            seeds = ", ".join(str(tasks[k].seed) for k in bad)
            raise NonFiniteImage(
                f"the image came out NaN/inf (it would be a black image; seed {seeds}), also "
                "with the VAE in float32: the model or a weight overflows (an absurd LoRA or "
                "ControlNet weight, a broken checkpoint, an extreme cfg?)")
        return [([_to_pil(image) for image in images], timing, call_notes)
                for images, timing, call_notes in out]

    def _render_fitting(
        self, res: Resident, pipe: Any, tasks: list[Task], notes: list[str],
        inits: list[Any] | None = None,
    ) -> list[tuple[list[Any], dict[str, float], list[str]]]:
        """Call the pipeline; on OOM split in halves, then turn on memory savers."""
        while True:
            try:
                return self._call(res, pipe, tasks, inits)
            except Exception as exc:
                if not is_oom(exc):
                    raise
            # Outside the except block: the exception's frames (and tensors) are gone.
            self._free()
            vae = pipe.vae  # an OOM in an upcast decode leaves the VAE in float32
            if getattr(vae, "dtype", self.torch_dtype) != self.torch_dtype:
                vae.to(dtype=self.torch_dtype)
            if len(tasks) > 1:
                half = (len(tasks) + 1) // 2
                key = self._limit_key(tasks[0])
                self._limits[key] = min(self._limits.get(key, half), half)
                notes.append(f"batch split {len(tasks)}->{half} after out of memory")
                return (self._render_fitting(res, pipe, tasks[:half], notes,
                                             inits[:half] if inits else None)
                        + self._render_fitting(res, pipe, tasks[half:], notes,
                                               inits[half:] if inits else None))
            step = next((s for s in MEMORY_STEPS if s not in res.memory), None)
            if step is None:
                raise UserError(
                    f"out of memory on {self.device} rendering one {tasks[0].width}x"
                    f"{tasks[0].height} image, even with {', '.join(MEMORY_STEPS)}"
                )
            if step == "attention slicing":
                res.memory.append(step)
            else:  # VAE slicing and tiling go together
                res.memory.extend(s for s in MEMORY_STEPS[1:] if s not in res.memory)

    def _apply_memory(self, res: Resident, pipe: Any) -> None:
        if "attention slicing" in res.memory and not res.sliced:
            pipe.enable_attention_slicing()  # sets the shared UNet's processors: all views
            res.sliced = True
        vae = pipe.vae
        if hasattr(vae, "enable_slicing"):
            (vae.enable_slicing if "vae slicing" in res.memory else vae.disable_slicing)()
        if hasattr(vae, "enable_tiling"):
            (vae.enable_tiling if "vae tiling" in res.memory else vae.disable_tiling)()

    def _call(
        self, res: Resident, pipe: Any, tasks: list[Task], inits: list[Any] | None = None
    ) -> list[tuple[list[Any], dict[str, float], list[str]]]:
        """One pipeline call. ``inits``: an init image (PIL) or latent (1x4xhxw tensor) per
        task, in memory, instead of the tasks' ``image`` files (a second pass)."""
        import torch

        from render.prompts import encode_schedules

        first = tasks[0]
        self._apply_memory(res, pipe)
        params = _call_params(pipe)
        start = time.perf_counter()
        prompts = [strip_extra_networks(t.prompt) for t in tasks]
        negatives = [strip_extra_networks(t.negative) for t in tasks]
        with torch.no_grad():
            conditioning = encode_schedules(
                pipe, prompts, negatives, steps=loop_steps(pipe, first, init=inits is not None),
                clip_skip=first.clip_skip)
        encoded = time.perf_counter()
        gen_device = "cpu" if self.device in ("cpu", "mps") else self.device
        kwargs: dict[str, Any] = {
            **conditioning.kwargs,
            "num_inference_steps": first.steps,
            "guidance_scale": first.cfg,
            "generator": [torch.Generator(gen_device).manual_seed(t.seed) for t in tasks],
            # Arrays, not PIL: NaN pixels are still visible here (as PIL they are black).
            "output_type": "np",
        }
        if "height" in params:
            kwargs.update(height=first.height, width=first.width)
        if inits is not None:
            kwargs["image"] = (torch.cat(inits) if _is_tensor(inits[0]) else list(inits))
        elif first.image and "image" in params:   # video-to-video pipelines take ``video``
            kwargs["image"] = [load_image(t.image, t.width, t.height, "RGB") for t in tasks]
        strength = _call_strength(first, params, init=inits is not None)
        if strength is not None:
            kwargs["strength"] = strength
        if first.mask:
            kwargs["mask_image"] = [load_image(t.mask, t.width, t.height, "L") for t in tasks]
        kwargs.update(self._task_inputs(tasks, pipe))
        if conditioning.callback is not None:
            kwargs.update(_step_callback(pipe, params, kwargs, conditioning))
        output = pipe(**kwargs)
        done = time.perf_counter()
        frames = getattr(output, "frames", None)
        per_task: list[list[Any]]
        if frames is not None:  # animations: one list of frames per task
            per_task = [list(f) for f in frames]
        else:
            per_task = [[image] for image in output.images]
        if len(per_task) != len(tasks):
            raise RuntimeError(f"{type(pipe).__name__} returned {len(per_task)} outputs for"
                               f" {len(tasks)} tasks")
        timing = {
            "encode": encoded - start,
            "sample": done - encoded,
            "per_image": (done - start) / len(tasks),
            "batch": float(len(tasks)),
        }
        call_notes = list(res.memory)
        return [(images, dict(timing), call_notes) for images in per_task]

    def _task_inputs(self, tasks: Sequence[Task], pipe: Any) -> dict[str, Any]:
        """Merge the ``task_inputs`` of every task: a value shared by all tasks is passed
        once, differing values go as a list in task order."""
        per_task: list[dict[str, Any]] = []
        for task in tasks:
            merged: dict[str, Any] = {}
            for part in self.pm.hook.task_inputs(task=task, pipe=pipe):
                merged.update(part or {})
            per_task.append(merged)
        keys = list(dict.fromkeys(k for d in per_task for k in d))
        out: dict[str, Any] = {}
        for key in keys:
            missing = [t.index for t, d in zip(tasks, per_task, strict=True) if key not in d]
            if missing:
                raise UserError(f"task_inputs gave {key!r} for some tasks of a batch only")
            values = [d[key] for d in per_task]
            out[key] = values[0] if all(_same(values[0], v) for v in values[1:]) else values
        return out

    # -- memory ----------------------------------------------------------------------------
    def _free(self) -> None:
        _free_memory(self.device)

    def close(self) -> None:
        """Drop every pipeline, VAE and component, and return the memory."""
        self.residents.clear()
        self._vaes.clear()
        self.components.clear()
        self._free()


class Renderer:
    """What the ``postprocess`` hook may use of the engine (its ``renderer`` argument).

    - ``device`` and ``dtype`` (a torch dtype): where and how the engine computes.
    - ``components``: the engine's :class:`ComponentCache` (an upscaler model is loaded once
      per process and stays on the device while batches use it).
    - ``is_oom(exc)`` and ``free()``: to shrink and retry a step that ran out of memory.
    - ``img2img`` and ``encode``: further diffusion passes on the resident models (a hires
      fix's second pass), with the engine's OOM splitting, NaN retry and prompt editing.

    ``Renderer("cpu", torch.float32)`` without an engine serves plugins that only compute
    (an upscaler in a unit test); the passes then raise.
    """

    def __init__(self, device: str, dtype: Any, *, engine: Engine | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self._engine = engine
        self.components = engine.components if engine else ComponentCache(device, dtype)

    @staticmethod
    def is_oom(exc: BaseException) -> bool:
        return is_oom(exc)

    def free(self) -> None:
        """Collect garbage and return cached device memory (after an OOM)."""
        _free_memory(self.device)

    def _second_pass(self, task: Task, model: FileRef | None) -> tuple[Resident, Any]:
        engine = self._engine
        if engine is None:
            raise RuntimeError("this renderer has no engine: it cannot run diffusion passes")
        first = engine._model_ref(task)
        ref = model or first
        res = engine.resident(ref, room=0 if ref.path == first.path else 1)
        pipe = engine.second_pass_pipeline(res)
        pipe.vae = engine.vae_for(res, task.files.get("vae"))
        return res, pipe

    def encode(self, images: Sequence[Any], task: Task, *, model: FileRef | None = None) -> Any:
        """The latents (scaled, as the UNet sees them) of PIL ``images`` under the VAE the
        second pass of ``task`` on ``model`` (default: the task's) decodes with."""
        import torch
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
            retrieve_latents,
        )

        _, pipe = self._second_pass(task, model)
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(list(images)).to(self.device, vae.dtype)
        with torch.no_grad():
            latents = retrieve_latents(vae.encode(pixels), sample_mode="argmax")
        return latents * vae.config.scaling_factor

    def img2img(self, task: Task, inits: Sequence[Any], *,
                model: FileRef | None = None) -> tuple[list[Any], list[str]]:
        """Render ``task`` (its prompt, negative, steps, sampler, cfg, strength, seed) as
        img2img from ``inits`` (PIL images or 1x4xhxw latents, one image out per init) on
        ``model`` (default: the task's checkpoint; another one is loaded beside it).

        Plugins configure the pass as a batch of ``task`` (``configure_pipeline``: LoRA
        weights), so the task's networks act in it too. Returns the images and the notes.
        """
        engine = self._engine
        res, pipe = self._second_pass(task, model)
        pipe.scheduler = engine._scheduler(task, res)
        engine.pm.hook.configure_pipeline(pipe=pipe, batch=Batch(("second pass",), (task,)))
        notes: list[str] = []
        out = engine._render_finite(res, pipe, [task] * len(inits), notes, list(inits))
        images = [image for images, _, _ in out for image in images]
        return images, list(dict.fromkeys([*notes, *(n for _, _, ns in out for n in ns)]))


# -- helpers --------------------------------------------------------------------------------
def _free_memory(device: str) -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if device == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def _pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _pick_dtype(device: str, dtype: str | None) -> str:
    """bf16 on Ampere and newer, fp16 on older CUDA and MPS, fp32 on CPU."""
    import torch

    if dtype:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        return _DTYPES[key]
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return "bfloat16" if major >= 8 else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def _weights_size(ref: FileRef) -> int:
    path = Path(ref.path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for file in (path / sub).glob("*.safetensors"):
            total += file.stat().st_size
    return total


def _dtype_kw(dtype: Any) -> dict[str, Any]:
    """``dtype=`` for diffusers that renamed it (0.42 deprecates ``torch_dtype=``)."""
    from diffusers.utils import deprecation_utils

    name = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {name: dtype}


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No "Loading pipeline components" bars in a cron log; restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _call_params(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def _call_strength(task: Task, params: set[str], *, init: bool = False) -> float | None:
    """The ``strength`` the engine passes for ``task``: img2img-style pipelines only
    (``init``: the init image is given in memory, not as the task's ``image``)."""
    if not (task.image or init) or "strength" not in params:
        return None
    return DEFAULT_STRENGTH if task.strength is None else task.strength


def loop_steps(pipe: Any, task: Task, *, init: bool = False) -> int:
    """How many denoising steps ``pipe`` will run for ``task``: what prompt editing counts.

    diffusers' loop runs one step per timestep: ``steps`` for most samplers, one more for
    PLMS, about twice as many model calls for second-order ones (Heun, DPM2); img2img and
    inpainting skip the first ``steps - int(steps * strength)`` of them (``get_timesteps``).
    Worked out on a fresh scheduler of the pipeline's kind; the pipeline's own is untouched.
    """
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(task.steps)
    timesteps = scheduler.timesteps
    strength = _call_strength(task, _call_params(pipe), init=init)
    if strength is not None:
        skipped = max(task.steps - min(int(task.steps * strength), task.steps), 0)
        timesteps = timesteps[skipped * scheduler.order:]
    return len(timesteps)


def _chunks(pipe: Any, task: Task) -> int:
    from render.prompts import conditioning_chunks

    return conditioning_chunks(pipe, strip_extra_networks(task.prompt),
                               strip_extra_networks(task.negative), clip_skip=task.clip_skip,
                               steps=loop_steps(pipe, task))


def _step_callback(pipe: Any, params: set[str], kwargs: dict[str, Any],
                   conditioning: Any) -> dict[str, Any]:
    """The ``callback_on_step_end`` arguments that switch prompt embeddings between steps."""
    allowed = set(getattr(pipe, "_callback_tensor_inputs", ()))
    if "callback_on_step_end" not in params or not set(conditioning.tensor_inputs) <= allowed:
        raise UserError(f"{type(pipe).__name__} cannot switch prompts between steps (no "
                        f"callback_on_step_end for {', '.join(conditioning.tensor_inputs)}): "
                        f"prompt editing and alternation need it")
    if "callback_on_step_end" in kwargs:
        raise UserError("a plugin's task_inputs sets callback_on_step_end, which prompt "
                        "editing and alternation need for themselves")
    return {"callback_on_step_end": conditioning.callback,
            "callback_on_step_end_tensor_inputs": conditioning.tensor_inputs}


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _dtype_name(module: Any) -> str:
    return str(getattr(module, "dtype", "float32")).removeprefix("torch.")


def _finite(images: Sequence[Any]) -> bool:
    """Whether every pixel of these pipeline outputs (arrays; PIL images pass) is finite."""
    import numpy as np

    return all(not isinstance(im, np.ndarray) or bool(np.isfinite(im).all()) for im in images)


def _to_pil(image: Any) -> Any:
    """A pipeline's float array in [0, 1] as PIL, exactly as its own ``output_type="pil"``."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    if not isinstance(image, np.ndarray):
        return image
    return VaeImageProcessor.numpy_to_pil(image[None])[0]


@contextmanager
def _float32_decode(vae: Any) -> Iterator[None]:
    """While active, ``vae.decode`` runs in float32 (weights and latents upcast for the call
    and cast back after), and encoding stays as it was: img2img's encode keeps its dtype.

    By hand because diffusers upcasts only SDXL VAEs with ``force_upcast`` and only when
    they are float16; this retry covers every pipeline and bfloat16 too.
    """
    import torch

    decode = type(vae).decode

    def decode_float32(z: Any, *args: Any, **kwargs: Any) -> Any:
        dtype = vae.dtype
        vae.to(dtype=torch.float32)
        try:
            return decode(vae, z.to(torch.float32), *args, **kwargs)
        finally:
            vae.to(dtype=dtype)

    vae.decode = decode_float32
    try:
        yield
    finally:
        del vae.decode


def _groups_by(tasks: list[Task], key: Callable[[Task], Any]) -> list[list[Task]]:
    groups: dict[Any, list[Task]] = {}
    for task in tasks:
        groups.setdefault(key(task), []).append(task)
    return list(groups.values())


def _same(a: Any, b: Any) -> bool:
    """Identical objects, or equal plain values (numbers, strings, lists of them)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (str, int, float, bool, type(None))):
        return bool(a == b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


