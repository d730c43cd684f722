"""The render stage (render.engine) on the tiny model kit: 64x64, 2-3 steps, one thread."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from render import hookimpl, hookspecs
from render.errors import UserError
from render.models import ModelResolver
from render.tasks import Batch, FileRef, Result, Task

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pluggy = pytest.importorskip("pluggy")


def new_pm(*plugins: Any) -> Any:
    pm = pluggy.PluginManager("render")
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    return pm


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from render.testing import write_reference_images

    return write_reference_images(tmp_path_factory.mktemp("refs"))


@pytest.fixture(scope="module")
def resolver(kit: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelResolver:
    return ModelResolver(
        [kit], {"single": {"source": "tiny-sd15-single", "config": "tiny-sd15"}},
        tmp_path_factory.mktemp("job"),
    )


@pytest.fixture(scope="module")
def engine(resolver: ModelResolver) -> Any:
    from render.engine import Engine

    torch.set_num_threads(1)
    eng = Engine(new_pm(), device="cpu", max_resident=3)
    yield eng
    eng.close()


def make(resolver: ModelResolver, *, model: str = "tiny-sd15", seed: int = 1, **kw: Any) -> Task:
    values: dict[str, Any] = dict(
        job="t", index=seed, prompt="a red house, (sunny:1.2)", negative="blurry", seed=seed,
        model=model, width=64, height=64, steps=3, cfg=7.0, sampler="Euler a",
    )
    values.update(kw)
    task = Task(**values)
    files = {"model": resolver.resolve_model(task.model)}
    if task.vae:
        files["vae"] = resolver.resolve_vae(task.vae)
    return dataclasses.replace(task, files=files)


def render(engine: Any, *tasks: Task) -> list[Result]:
    return engine.render(Batch(("test",), tuple(tasks)))


def pixels(result: Result) -> Any:
    return np.asarray(result.images[0], dtype=np.float64)


def diff(a: Result, b: Result) -> float:
    return float(np.abs(pixels(a) - pixels(b)).max())


# -- rendering ------------------------------------------------------------------------------
def test_txt2img_sd15(engine: Any, resolver: ModelResolver) -> None:
    (result,) = render(engine, make(resolver))
    image = result.images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert {"load", "encode", "sample", "per_image"} <= set(result.timings)
    assert pixels(result).std() > 1  # not a flat image


def test_txt2img_sdxl(engine: Any, resolver: ModelResolver) -> None:
    (result,) = render(engine, make(resolver, model="tiny-sdxl", width=64, height=64))
    assert result.images[0].size == (64, 64)
    assert type(engine.residents[result.task.files["model"].path].pipe).__name__ \
        == "StableDiffusionXLPipeline"


def test_same_seed_is_bit_identical(engine: Any, resolver: ModelResolver) -> None:
    a, = render(engine, make(resolver, seed=7))
    b, = render(engine, make(resolver, seed=7))
    c, = render(engine, make(resolver, seed=8))
    assert diff(a, b) == 0
    assert diff(a, c) > 10


def test_batch_matches_single_renders(engine: Any, resolver: ModelResolver) -> None:
    tasks = [make(resolver, seed=s, prompt=f"a house number {s}") for s in (11, 12, 13)]
    batched = render(engine, *tasks)
    assert [r.task for r in batched] == tasks
    for task, result in zip(tasks, batched, strict=True):
        (single,) = render(engine, task)
        assert diff(single, result) <= 2


def test_img2img_and_inpaint(engine: Any, resolver: ModelResolver, refs: dict) -> None:
    plain, = render(engine, make(resolver))
    house = str(refs["house.png"])
    i2i, = render(engine, make(resolver, image=house, strength=0.5))
    strong, = render(engine, make(resolver, image=house, strength=0.9))
    inpaint, = render(engine, make(resolver, image=house, strength=0.9,
                                   mask=str(refs["mask.png"])))
    init = np.asarray(__import__("PIL.Image").Image.open(house).convert("RGB"), dtype=float)
    assert i2i.images[0].size == inpaint.images[0].size == (64, 64)
    assert diff(i2i, plain) > 10 and diff(i2i, strong) > 1 and diff(inpaint, strong) > 1
    # less denoising stays closer to the init image
    assert np.abs(pixels(i2i) - init).mean() < np.abs(pixels(strong) - init).mean()


def test_init_image_is_resized(engine: Any, resolver: ModelResolver, tmp_path: Path) -> None:
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (200, 120), (200, 30, 30)).save(big)
    (result,) = render(engine, make(resolver, image=str(big), strength=0.5))
    assert result.images[0].size == (64, 64)


def test_base_pipeline_loaded_once_across_kinds(kit: Path, refs: dict) -> None:
    from render.engine import Engine

    r = ModelResolver([kit], {}, kit)
    eng = Engine(new_pm(), device="cpu")
    house, mask = str(refs["house.png"]), str(refs["mask.png"])
    for task in (make(r), make(r, image=house, strength=0.5),
                 make(r, image=house, strength=0.9, mask=mask), make(r, seed=3)):
        render(eng, task)
    path = str((kit / "checkpoints" / "tiny-sd15").resolve())
    assert eng.loads == {path: 1}
    views = eng.residents[path].views
    assert sorted(k[0] for k in views) == ["StableDiffusionImg2ImgPipeline",
                                          "StableDiffusionInpaintPipeline",
                                          "StableDiffusionPipeline"]
    base = eng.residents[path].pipe
    assert all(v.unet is base.unet and v.vae is base.vae for v in views.values())


def test_single_file_equals_folder(engine: Any, resolver: ModelResolver) -> None:
    folder, = render(engine, make(resolver))
    single, = render(engine, make(resolver, model="single"))
    assert diff(folder, single) == 0


def test_inpainting_single_file(kit: Path, refs: dict, tmp_path: Path) -> None:
    """A 9-channel UNet in an A1111 single file loads with a 4-channel config's folder."""
    from diffusers import UNet2DConditionModel

    from render.engine import Engine
    from render.testing import tiny_pipeline
    from render.testing.ldm_keys import to_ldm_checkpoint
    from render.testing.stfile import save_safetensors

    pipe = tiny_pipeline(kit, "tiny-sd15")
    config = {**pipe.unet.config, "in_channels": 9}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    state = to_ldm_checkpoint(unet.state_dict(), unet.config, pipe.vae.state_dict(),
                              pipe.vae.config, pipe.text_encoder.state_dict())
    save_safetensors(state, tmp_path / "checkpoints" / "inpaint.safetensors")
    r = ModelResolver([tmp_path, kit], {"inp": {"source": "inpaint", "config": "tiny-sd15"}},
                      tmp_path)
    ref = r.resolve_model("inp")
    assert ref.extra["in_channels"] == 9
    eng = Engine(new_pm(), device="cpu")
    house, mask = str(refs["house.png"]), str(refs["mask.png"])
    (result,) = render(eng, make(r, model="inp", image=house, mask=mask, strength=1.0))
    base = eng.residents[ref.path].pipe
    assert type(base).__name__ == "StableDiffusionInpaintPipeline"
    assert base.unet.config.in_channels == 9 and result.images[0].size == (64, 64)
    with pytest.raises(UserError, match="inpainting model"):
        render(eng, make(r, model="inp"))


def test_extra_network_tags_are_not_encoded(engine: Any, resolver: ModelResolver) -> None:
    from render.prompts import strip_extra_networks

    assert strip_extra_networks("a <lora:add_detail:0.6>, b <hypernet:x:1>") == "a , b "
    tagged, = render(engine, make(resolver, prompt="a red house <lora:tiny-lora-a:0.8>"))
    plain, = render(engine, make(resolver, prompt="a red house"))
    assert diff(tagged, plain) == 0


def test_clip_skip_changes_pixels(engine: Any, resolver: ModelResolver) -> None:
    one, = render(engine, make(resolver, clip_skip=1))
    two, = render(engine, make(resolver, clip_skip=2))
    assert diff(one, two) > 1


def test_sampler_per_batch(engine: Any, resolver: ModelResolver) -> None:
    euler, = render(engine, make(resolver, sampler="Euler"))
    dpm, = render(engine, make(resolver, sampler="DPM++ 2M", schedule="Karras"))
    again, = render(engine, make(resolver, sampler="Euler"))
    assert diff(euler, dpm) > 1 and diff(euler, again) == 0
    base = engine.residents[euler.task.files["model"].path]
    assert type(base.pipe.scheduler).__name__ == "PNDMScheduler"  # the base is untouched


def test_vae_override(engine: Any, resolver: ModelResolver, kit: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(str(kit / "checkpoints" / "tiny-sd15"), subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.3
    vae.save_pretrained(tmp_path / "vae" / "bright")
    save_file(vae.state_dict(), str(tmp_path / "vae" / "bright-file.safetensors"))
    r = ModelResolver([tmp_path, kit], {}, tmp_path)
    plain, = render(engine, make(r))
    folder, = render(engine, make(r, vae="bright"))
    single, = render(engine, make(r, vae="bright-file"))
    back, = render(engine, make(r))
    assert diff(plain, folder) > 10
    assert diff(folder, single) == 0
    assert diff(plain, back) == 0  # the override does not stick to the model
    assert pixels(folder).mean() > pixels(plain).mean()
    assert len(engine._vaes) >= 2


def test_depth_model_uses_depth2img(engine: Any, resolver: ModelResolver, refs: dict) -> None:
    (result,) = render(engine, make(resolver, model="tiny-sd2-depth", prompt="a room",
                                     image=str(refs["gradient.png"]), strength=0.8))
    assert result.images[0].size == (64, 64)
    path = result.task.files["model"].path
    assert [k[0] for k in engine.residents[path].views] == ["StableDiffusionDepth2ImgPipeline"]
    with pytest.raises(UserError, match="depth-to-image"):
        render(engine, make(resolver, model="tiny-sd2-depth"))


# -- hooks ----------------------------------------------------------------------------------
class Recorder:
    """A plugin that records the hooks the engine calls."""

    def __init__(self) -> None:
        self.configured: list[tuple[str, int]] = []
        self.built = 0

    @hookimpl
    def pipeline_class(self, task: Task, family: str) -> str | None:
        return "StableDiffusionImg2ImgPipeline" if task.sections.get("force_i2i") else None

    @hookimpl
    def pipeline_components(self, task: Task, family: str, loader: Any) -> dict | None:
        def build() -> Any:
            self.built += 1
            return torch.nn.Linear(2, 2)

        loader.get("probe", build)
        return None

    @hookimpl
    def configure_pipeline(self, pipe: Any, batch: Batch) -> None:
        self.configured.append((type(pipe).__name__, len(batch.tasks)))

    @hookimpl
    def task_inputs(self, task: Task, pipe: Any) -> dict | None:
        return {"eta": 0.0, "seed_echo": task.seed} if task.sections.get("echo") else None


def test_hooks_drive_the_pipeline(kit: Path, refs: dict) -> None:
    from render.engine import Engine

    rec = Recorder()
    r = ModelResolver([kit], {}, kit)
    eng = Engine(new_pm(rec), device="cpu")
    tasks = [make(r, seed=s, image=str(refs["house.png"]), strength=0.5,
                  sections={"force_i2i": True}) for s in (1, 2)]
    render(eng, *tasks)
    assert rec.configured == [("StableDiffusionImg2ImgPipeline", 2)]
    assert rec.built == 1 and "probe" in eng.components
    assert eng.components.get("probe", lambda: None).weight.dtype == eng.torch_dtype

    echo = [make(r, seed=s, sections={"echo": True}) for s in (1, 2)]
    pipe = eng.pipeline_for(next(iter(eng.residents.values())), echo[0])
    merged = eng._task_inputs(echo, pipe)
    assert merged == {"eta": 0.0, "seed_echo": [1, 2]}  # shared values once, others stacked
    with pytest.raises(UserError, match="some tasks"):
        eng._task_inputs([echo[0], make(r)], pipe)


def test_default_pipeline_class() -> None:
    from render.engine import default_pipeline_class

    t = Task(job="j", index=0, prompt="p", negative="", seed=1, model="m", width=64,
             height=64, steps=2, cfg=7, sampler="Euler")
    i2i = dataclasses.replace(t, image="x.png")
    inpaint = dataclasses.replace(i2i, mask="m.png")
    assert default_pipeline_class(t, "sd1") == "StableDiffusionPipeline"
    assert default_pipeline_class(i2i, "sd2") == "StableDiffusionImg2ImgPipeline"
    assert default_pipeline_class(inpaint, "sdxl") == "StableDiffusionXLInpaintPipeline"
    assert default_pipeline_class(inpaint, "sd1", 9) == "StableDiffusionInpaintPipeline"
    assert default_pipeline_class(i2i, "sd2", 5) == "StableDiffusionDepth2ImgPipeline"
    with pytest.raises(UserError, match="inpainting model"):
        default_pipeline_class(t, "sd1", 9)


# -- memory ---------------------------------------------------------------------------------
class FlakyUNet:
    """Wraps a UNet forward: raises OOM when it sees more than ``limit`` samples, ``times``
    times in all (CFG doubles the batch: 2 images -> 4 samples). Records what each call was
    conditioned on: ``(encoder_hidden_states, SDXL's text_embeds or None)``."""

    def __init__(self, unet: Any, limit: int = sys.maxsize, times: int = 0) -> None:
        self.unet, self.limit, self.times = unet, limit, times
        self.original = unet.forward
        self.raised = 0
        self.conditioning: list[tuple[Any, Any]] = []

    def __enter__(self) -> FlakyUNet:
        def forward(sample: Any, *args: Any, **kwargs: Any) -> Any:
            if sample.shape[0] > self.limit and self.raised < self.times:
                self.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            added = kwargs.get("added_cond_kwargs") or {}
            self.conditioning.append((kwargs["encoder_hidden_states"], added.get("text_embeds")))
            return self.original(sample, *args, **kwargs)

        self.unet.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unet.forward = self.original


def test_oom_splits_the_batch(kit: Path) -> None:
    from render.engine import Engine

    r = ModelResolver([kit], {}, kit)
    eng = Engine(new_pm(), device="cpu", max_batch=8)
    tasks = [make(r, seed=s) for s in (21, 22, 23)]
    clean = render(eng, *tasks)
    base = next(iter(eng.residents.values()))
    with FlakyUNet(base.pipe.unet, limit=4, times=10) as flaky:
        split = render(eng, *tasks)
    assert flaky.raised == 1
    for a, b in zip(clean, split, strict=True):
        assert diff(a, b) <= 2
        assert "batch split 3->2 after out of memory" in b.notes
    assert eng.batch_size_for(tasks[0]) == 2  # remembered for the next batches


def test_oom_at_batch_one_turns_on_memory_savers(kit: Path) -> None:
    from render.engine import Engine

    r = ModelResolver([kit], {}, kit)
    eng = Engine(new_pm(), device="cpu")
    task = make(r, seed=31)
    clean, = render(eng, task)
    base = next(iter(eng.residents.values()))
    with FlakyUNet(base.pipe.unet, limit=0, times=2):
        saved, = render(eng, task)
    assert saved.notes == ["attention slicing", "vae slicing", "vae tiling"]
    assert diff(clean, saved) <= 2
    with FlakyUNet(base.pipe.unet, limit=0, times=99), pytest.raises(UserError, match="even"):
        render(eng, task)


def test_batch_size_for_cpu(engine: Any, resolver: ModelResolver) -> None:
    small = make(resolver)
    assert engine.batch_size_for(small) == 4
    assert engine.batch_size_for(dataclasses.replace(small, width=1024, height=1024)) == 1
    from render.engine import Engine

    capped = Engine(new_pm(), device="cpu", max_batch=2)
    assert capped.batch_size_for(small) == 2


def test_batch_size_for_cuda_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    from render.engine import Engine

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * gib, 24 * gib))
    eng = Engine(new_pm(), device="cuda", dtype="float16")
    t = Task(job="j", index=0, prompt="p", negative="", seed=1, model="m", width=512,
             height=512, steps=2, cfg=7, sampler="Euler")
    assert eng.batch_size_for(t) == 8  # ~1.3 GiB an image: capped
    model = FileRef("checkpoint", "xl", "/nonexistent", family="sdxl")
    xl = dataclasses.replace(t, width=1024, height=1024, files={"model": model})
    assert eng.batch_size_for(xl) == 3  # ~6 GiB an image


# -- small parts ----------------------------------------------------------------------------
def test_probe_v_prediction() -> None:
    from types import SimpleNamespace

    from render.engine import probe_v_prediction

    class Fake:
        config = SimpleNamespace(in_channels=4, cross_attention_dim=8)

        def __init__(self, v: bool) -> None:
            self.v = v

        def __call__(self, x: Any, t: Any, encoder_hidden_states: Any) -> Any:
            out = -0.1 * torch.ones_like(x) if self.v else x * 0.99
            return SimpleNamespace(sample=out)

    assert probe_v_prediction(Fake(True), "cpu", torch.float32) is True
    assert probe_v_prediction(Fake(False), "cpu", torch.float32) is False


class Opaque:
    """An object torch's weights-only unpickler must refuse."""


def test_pickle_state_dict_needs_permission(tmp_path: Path) -> None:
    from render.engine import load_state_dict

    path = tmp_path / "vae.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(UserError, match="allow_pickle"):
        load_state_dict(path, allow_pickle=False)
    assert load_state_dict(path, allow_pickle=True)["w"].tolist() == [1.0, 1.0]

    torch.save({"obj": Opaque()}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="weights-only"):
        load_state_dict(tmp_path / "bad.pt", allow_pickle=True)


def test_describe(engine: Any) -> None:
    info = engine.describe()
    assert info["device_type"] == "cpu" and info["dtype"] == "float32"
    assert {"torch", "diffusers", "transformers"} <= set(info["versions"])


def test_half_precision_views_keep_dtype(kit: Path, refs: dict) -> None:
    from render.engine import Engine

    r = ModelResolver([kit], {}, kit)
    eng = Engine(new_pm(), device="cpu", dtype="bf16")
    render(eng, make(r, image=str(refs["house.png"]), strength=0.5, steps=2))
    base = next(iter(eng.residents.values())).pipe
    assert base.unet.dtype == torch.bfloat16 and base.vae.dtype == torch.bfloat16


def test_import_without_torch() -> None:
    code = "import sys, render.engine; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


LONG = ", ".join(["a very detailed painting of a house"] * 12)   # 96 tokens: two chunks


@pytest.mark.parametrize(("model", "long_field"), [
    ("tiny-sd15", "prompt"), ("tiny-sd15", "negative"), ("tiny-sdxl", "prompt")])
def test_a_task_renders_the_same_whatever_its_batch_neighbours(
        engine: Any, resolver: ModelResolver, model: str, long_field: str) -> None:
    """A short prompt batched with a long one must not be padded to the long one's chunks
    (it was: 115/255 off on tiny-sd15). Equal chunk counts still share one call."""
    short = make(resolver, model=model, seed=21, prompt="a small red house")
    long = make(resolver, model=model, seed=22, **{long_field: LONG})
    broken = make(resolver, model=model, seed=23, prompt="a blue barn BREAK at night")
    short_too = make(resolver, model=model, seed=24, prompt="a green shed")
    alone, = render(engine, short)
    together = render(engine, short, long, broken, short_too)
    assert [r.task for r in together] == [short, long, broken, short_too]
    assert [r.timings["batch"] for r in together] == [2, 2, 2, 2]   # (short, short_too), ...
    assert diff(alone, together[0]) <= 1     # the CPU's batch-size float noise, at most
    assert diff(render(engine, long)[0], together[1]) <= 1


# -- prompt editing and alternation -------------------------------------------------------------
def conditioned(engine: Any, *tasks: Task) -> tuple[list[Result], list[tuple[Any, Any]]]:
    """Render ``tasks`` and record what the UNet was conditioned on, step by step."""
    unet = engine.resident(tasks[0].files["model"]).pipe.unet   # every view shares it
    with FlakyUNet(unet) as spy:
        results = render(engine, *tasks)
    return results, spy.conditioning


def rows(steps: list[tuple[Any, Any]], row: int) -> list[tuple[Any, Any]]:
    """One batch row (CFG: negatives first, then prompts) of every step's conditioning."""
    return [(h[row], None if p is None else p[row]) for h, p in steps]


def same(a: list[tuple[Any, Any]], b: list[tuple[Any, Any]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(ha, hb) and (pa is None and pb is None or torch.equal(pa, pb))
        for (ha, pa), (hb, pb) in zip(a, b, strict=True))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_prompt_editing_switches_the_conditioning_between_steps(
        engine: Any, resolver: ModelResolver, model: str) -> None:
    def run(prompt: str) -> tuple[Result, list[tuple[Any, Any]]]:
        (result,), steps = conditioned(engine, make(resolver, model=model, prompt=prompt, steps=4))
        return result, rows(steps, 1)   # the prompt's row (SDXL: its pooled embedding too)

    cat, cat_steps = run("a cat")
    dog, dog_steps = run("a dog")
    edited, steps = run("a [cat:dog:0.25]")   # A1111: steps 0 and 1 'a cat', then 'a dog'
    assert same(steps, cat_steps[:2] + dog_steps[2:])
    assert diff(edited, cat) > 0 and diff(edited, dog) > 10
    alternated, steps = run("a [cat|dog]")    # A1111's order: cat, cat, dog, cat
    assert same(steps, cat_steps[:2] + dog_steps[2:3] + cat_steps[3:])
    assert diff(alternated, cat) > 0 and diff(alternated, dog) > 10
    # a schedule that never switches is the plain prompt it reduces to, bit for bit
    assert diff(run("a [cat:dog:99]")[0], cat) == 0
    assert diff(run("a [cat:dog:0]")[0], dog) == 0
    assert diff(run("a [cat::2]")[0], run("a ")[0]) > 0


def test_a_batch_keeps_each_tasks_schedule(engine: Any, resolver: ModelResolver) -> None:
    tasks = [make(resolver, seed=41, prompt="a [cat:dog:0.25]"),
             make(resolver, seed=42, prompt="a [red|blue] house", negative="[blurry::0.5]"),
             make(resolver, seed=43, prompt="a green shed")]
    together, steps = conditioned(engine, *tasks)
    assert [r.timings["batch"] for r in together] == [3, 3, 3]   # one call, three schedules
    for k, task in enumerate(tasks):
        (alone,), alone_steps = conditioned(engine, task)
        assert diff(alone, together[k]) <= 1     # the CPU's batch-size float noise, at most
        for row in (0, 1):                       # the task's negative and prompt rows
            assert same(rows(steps, row * 3 + k), rows(alone_steps, row)), (k, row)
    _, blurry_steps = conditioned(engine, dataclasses.replace(tasks[1], negative="blurry"))
    _, empty_steps = conditioned(engine, dataclasses.replace(tasks[1], negative=""))
    # [blurry::0.5] of 3 steps: 'blurry' at steps 0 and 1, then nothing
    assert same(rows(steps, 1), rows(blurry_steps, 0)[:2] + rows(empty_steps, 0)[2:])


def test_img2img_schedules_over_the_steps_that_run(
        engine: Any, resolver: ModelResolver, refs: dict) -> None:
    from render.engine import loop_steps

    house = str(refs["house.png"])
    edited = make(resolver, prompt="a [cat:dog:0.5]", image=house, strength=0.5, steps=8)
    (result,), steps = conditioned(engine, edited)
    assert len(steps) == 4      # int(8 * 0.5) steps run
    pipe = engine.pipeline_for(engine.resident(edited.files["model"]), edited)
    assert loop_steps(pipe, edited) == 4
    (cat,), cat_steps = conditioned(engine, dataclasses.replace(edited, prompt="a cat"))
    (dog,), dog_steps = conditioned(engine, dataclasses.replace(edited, prompt="a dog"))
    # 0.5 of the 4 steps that run: 'a dog' at the last one. Counted over 8 steps, the switch
    # (after step 4) would never come.
    assert same(rows(steps, 1), rows(cat_steps, 1)[:3] + rows(dog_steps, 1)[3:])
    assert diff(result, dog) > 1
    mask = str(refs["mask.png"])
    inpaint = dataclasses.replace(edited, mask=mask, strength=0.9, steps=5)
    (_,), steps = conditioned(engine, inpaint)
    assert len(steps) == 4      # int(5 * 0.9)


@pytest.mark.parametrize(("sampler", "calls"), [("Heun", 7), ("PLMS", 5), ("DPM++ 2M", 4)])
def test_prompt_editing_counts_the_samplers_model_calls(
        engine: Any, resolver: ModelResolver, sampler: str, calls: int) -> None:
    # Heun and DPM2 call the model about twice a step, PLMS once more than the steps: the
    # schedule counts the calls, as A1111 counts its second-order samplers' calls
    (result,), steps = conditioned(engine, make(resolver, prompt="a [cat|dog]", sampler=sampler,
                                                steps=4))
    assert len(steps) == calls and result.images[0].size == (64, 64)


def test_prompt_editing_with_weights_break_and_long_prompts(
        engine: Any, resolver: ModelResolver) -> None:
    # each branch is two chunks (a BREAK; 96 tokens): padded alike, and never batched with
    # a one-chunk prompt
    edited = make(resolver, seed=51, steps=4,
                  prompt="a [(cat:1.4) BREAK on a mat:" + LONG + ":1]")
    short = make(resolver, seed=52, steps=4, prompt="a [green|red] shed")
    together, steps = conditioned(engine, edited, short)
    assert [r.timings["batch"] for r in together] == [1, 1]   # 2 chunks and 1: two calls
    assert [h.shape[1] for h, _ in steps] == [154] * 4 + [77] * 4
    (alone,), alone_steps = conditioned(engine, edited)
    assert diff(alone, together[0]) == 0
    (mat,), mat_steps = conditioned(engine, dataclasses.replace(
        edited, prompt="a (cat:1.4) BREAK on a mat"))
    (long,), long_steps = conditioned(engine, dataclasses.replace(edited, prompt="a " + LONG))
    assert same(rows(alone_steps, 1), rows(mat_steps, 1)[:2] + rows(long_steps, 1)[2:])
    assert diff(alone, mat) > 0 and diff(alone, long) > 10
