"""AnimateDiff (plugins/animatediff) end to end on the tiny kit: real AnimateDiff pipelines over
the resident tiny SD1.5/SDXL, the kit's random-weight motion modules and motion LoRA.

What a user notices: the frames move and differ by seed, the single file renders as the folder
does, a motion LoRA changes the motion (weight 0 is none), long animations render through
FreeNoise windows, prompt travel changes the later frames, every animation format holds the
frames at the right rate with metadata that --show and --replay read, mistakes are one
located line before anything renders, and a killed run resumes with nothing lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from render.builtin_plugins.animatediff import schema

from render import metadata
from render.api import FieldContext, FieldError
from render.cli import main
from render.ledger import Ledger
from render.tasks import Batch
from render.testing.checks import done_count, one_located_error

REPO = Path(__file__).resolve().parents[2]
CTX = FieldContext(base_dir=Path("."), file="job.yaml")
MM = "{motion_module: tiny-motion-sd15, frames: 6"

pytestmark = pytest.mark.usefixtures("one_thread")


def tasks_of(path: Path, plugins: Any) -> list[Any]:
    from render.run import load_all, resolve_tasks, selected_plans

    return resolve_tasks(selected_plans(load_all([str(path)], plugins), []), plugins)


def frames(engine: Any, *tasks: Any) -> list[np.ndarray]:
    """Render ``tasks`` as one batch; each task's frames as one (F, H, W, 3) int array."""
    results = engine.render(Batch(("t",), tuple(tasks)))
    return [np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in r.images])
            for r in results]


def by_job(tasks: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for task in tasks:
        out.setdefault(task.job, []).append(task)
    return out


# -- the section ------------------------------------------------------------------------------

def test_section_defaults_and_forms() -> None:
    section = schema.validate_section("mm_sd_v15_v2", CTX)
    assert section == {"motion_module": "mm_sd_v15_v2", **schema.DEFAULTS}
    assert section["frames"] == 16 and section["fps"] == 8.0 and section["loop"] is True
    full = schema.validate_section({"motion_module": "m", "context": 16,
                                    "prompt_travel": {"8": "b", 0: "a"},
                                    "motion_lora": "zoom"}, CTX)
    assert full["context"] == {"length": 16, "stride": 4}
    assert list(full["prompt_travel"].items()) == [(0, "a"), (8, "b")]
    assert full["motion_lora"] == {"zoom": 1.0}


@pytest.mark.parametrize("value, subkey, words", [
    ({"frames": 16}, "motion_module", "missing"),
    ({"motion_module": "m", "frame": 16}, "frame", "unknown key"),
    ({"motion_module": "m", "frames": 0}, "frames", ""),
    ({"motion_module": "m", "context": {"length": 8, "stride": 9}}, "context.stride",
     "more than the window"),
    ({"motion_module": "m", "prompt_travel": {4: "x"}}, "prompt_travel", "frame 0"),
    ({"motion_module": "m", "prompt_travel": {"soon": "x"}}, "prompt_travel.soon", "frame"),
    ({"motion_module": "m", "motion_lora": {"zoom": "lots"}}, "motion_lora.zoom", ""),
])
def test_section_mistakes_name_the_subkey(value: Any, subkey: str, words: str) -> None:
    with pytest.raises(FieldError) as err:
        schema.validate_section(value, CTX)
    assert err.value.subkey == subkey and words in err.value.message


def test_prompt_travel_lines_as_sd_webui_animatediff_writes_them() -> None:
    prompt = "masterpiece, a girl\n0: closed eyes\n8: open eyes\nsmile"
    section = schema.validate_section("m", CTX)
    assert schema.keyframes(section, prompt) == {0: "masterpiece, a girl, closed eyes, smile",
                                                 8: "masterpiece, a girl, open eyes, smile"}
    assert schema.keyframes(section, "a house at dusk") is None


# -- rendering --------------------------------------------------------------------------------

def test_frames_move_seeds_differ_and_a_batch_changes_nothing(kit, plugins, engine, job):
    path = job(f"  - name: a\n    seeds: [1, 2]\n    animatediff: {MM}}}\n")
    one, two = tasks_of(path, plugins)
    batched = frames(engine, one, two)
    assert batched[0].shape == (6, 64, 64, 3)
    moving = [np.abs(batched[0][i + 1] - batched[0][i]).mean() for i in range(5)]
    assert min(moving) > 0.5, moving                          # every frame differs from the last
    assert np.abs(batched[0] - batched[1]).mean() > 5        # another seed, another animation
    (alone,) = frames(engine, one)
    assert np.abs(alone - batched[0]).max() <= 1               # same task, same pixels


def test_the_view_shares_the_base_unet_and_the_adapter_loads_once(kit, plugins, engine, job):
    path = job(f"  - name: a\n    animatediff: {MM}}}\n"
               f"  - name: b\n    prompt: a tree\n    animatediff: {MM}}}\n")
    a, b = tasks_of(path, plugins)
    builds = engine.components.builds
    frames(engine, a)
    frames(engine, b)
    assert engine.components.builds - builds <= 1             # the MotionAdapter, once
    res = engine.residents[a.files["model"].path]
    pipe = engine.pipeline_for(res, a)
    base = {id(p) for p in res.pipe.unet.parameters()}
    adapter = {id(p) for p in pipe.motion_adapter.parameters()}
    ours = {id(p) for p in pipe.unet.parameters()}
    assert base <= ours and ours <= base | adapter             # nothing copied, nothing new
    assert pipe.unet.down_blocks[0].resnets[0] is res.pipe.unet.down_blocks[0].resnets[0]


def test_the_single_file_renders_as_the_folder(kit, plugins, engine, job):
    folder = kit / "animatediff_models" / "tiny-motion-sd15"
    path = job(f"  - name: file\n    animatediff: {MM}}}\n"
               f"  - name: folder\n    animatediff: {{motion_module: {folder}, frames: 6}}\n")
    single, whole = tasks_of(path, plugins)
    assert single.files["animatediff:motion_module"].path.endswith(".safetensors")
    assert Path(whole.files["animatediff:motion_module"].path).is_dir()
    (a,), (b,) = frames(engine, single), frames(engine, whole)
    assert np.abs(a - b).max() <= 1


def test_a_non_standard_single_file_takes_config_from_its_alias(kit, plugins, engine,
                                                                tmp_path, write_job, capsys):
    import shutil

    models = tmp_path / "models" / "animatediff_models"
    models.mkdir(parents=True)
    shutil.copy(kit / "animatediff_models" / "tiny-motion-sd15.safetensors",
                models / "mm.safetensors")
    config = kit / "animatediff_models" / "tiny-motion-sd15"
    head = (f"version: 1\nmodel_dirs: [{tmp_path / 'models'}, {kit}]\n"
            "output: {dir: out}\ndefaults: {model: tiny-sd15, size: 64x64, steps: 3, "
            "sampler: Euler, seed: 1, prompt: a house}\n")
    entry = "jobs:\n  - name: a\n    animatediff: {motion_module: mm, frames: 6}\n"
    bare = write_job(head + entry, name="bare.yaml")
    assert main([str(bare), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "jobs[0].animatediff.motion_module" in err and "matches no shipped config" in err
    aliased = write_job(head + f"models: {{mm: {{source: mm.safetensors, config: {config}}}}}\n"
                        + entry, name="aliased.yaml")
    (task,) = tasks_of(aliased, plugins)
    path = write_job(head + f"jobs:\n  - name: b\n    animatediff: {{motion_module: {config},"
                     " frames: 6, decode_chunk_size: 2}\n"
                     f"  - name: c\n    animatediff: {{motion_module: {config}, frames: 6, "
                     "free_init: 2}\n", name="folder.yaml")
    folder, free_init = tasks_of(path, plugins)
    (a,), (b,), (c,) = frames(engine, task), frames(engine, folder), frames(engine, free_init)
    assert np.abs(a - b).max() <= 1        # same weights and config; the decode chunking too
    assert np.abs(c - b).mean() > 1        # FreeInit re-noises and renders again


def test_a_motion_lora_changes_the_motion_and_weight_0_is_none(kit, plugins, engine, job):
    path = job(f"  - name: none\n    animatediff: {MM}}}\n"
               f"  - name: zero\n    animatediff: {MM}, motion_lora: {{tiny-motion-lora: 0}}}}\n"
               f"  - name: full\n    animatediff: {MM}, motion_lora: {{tiny-motion-lora: 1.0}}}}\n"
               f"  - name: image-lora\n    lora: {{tiny-lora-a: 1.0}}\n"
               f"    animatediff: {MM}, motion_lora: {{tiny-motion-lora: 1.0}}}}\n")
    tasks = by_job(tasks_of(path, plugins))
    (full,) = frames(engine, *tasks["full"])
    (none,) = frames(engine, *tasks["none"])
    (zero,) = frames(engine, *tasks["zero"])
    (both,) = frames(engine, *tasks["image-lora"])
    assert np.abs(none - zero).max() <= 1
    assert np.abs(full - none).mean() > 1
    assert np.abs(both - full).mean() > 1                    # the image LoRA acts as well
    (again,) = frames(engine, *tasks["full"])                 # and leaves nothing behind
    assert np.abs(again - full).max() <= 1
    (plain,) = frames(engine, *tasks["none"])
    assert np.abs(plain - none).max() <= 1


def test_an_embedding_acts_in_an_animation(kit, plugins, engine, job):
    path = job(f"  - name: plain\n    animatediff: {MM}}}\n"
               f"  - name: emb\n    prompt: a tiny-emb house\n    animatediff: {MM}}}\n"
               f"  - name: word\n    prompt: a tiny house\n    animatediff: {MM}}}\n")
    tasks = by_job(tasks_of(path, plugins))
    assert "embedding:tiny-emb" in tasks["emb"][0].files
    (emb,) = frames(engine, *tasks["emb"])
    (word,) = frames(engine, *tasks["word"])
    assert np.abs(emb - word).mean() > 1          # the embedding's vectors, not its name


def test_out_of_memory_splits_the_batch_then_turns_on_the_savers(kit, plugins, job):
    """The engine's OOM fallbacks apply to animations: a CPU allocation failure in the motion
    UNet splits the batch, then turns on attention slicing; the frames come out the same."""
    import torch

    from render.engine import Engine

    path = job(f"  - name: a\n    seeds: [1, 2]\n    animatediff: {MM}}}\n")
    tasks = tasks_of(path, plugins)
    eng = Engine(plugins.pm, device="cpu", dtype="float32")
    try:
        clean = frames(eng, *tasks)
        res = eng.residents[tasks[0].files["model"].path]
        unet = eng.pipeline_for(res, tasks[0]).unet
        raised: list[int] = []
        original = unet.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if len(raised) < 2:
                raised.append(1)
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                   "allocate 1073741824 bytes. Error code 12")
            return original(*args, **kwargs)

        unet.forward = forward
        try:
            results = eng.render(Batch(("t",), tuple(tasks)))
        finally:
            del unet.forward
        notes = {n for r in results for n in r.notes}
        assert len(raised) == 2 and "attention slicing" in notes
        assert any(n.startswith("batch split 2->1") for n in notes), notes
        for result, before in zip(results, clean, strict=True):
            after = np.stack([np.asarray(im, dtype=np.int16) for im in result.images])
            assert np.abs(after - before).max() <= 2
    finally:
        eng.close()
        torch.set_num_threads(1)


def test_long_animations_render_through_context_windows_split_or_not(kit, plugins, engine, job):
    ctx = "motion_module: tiny-motion-sd15, frames: 40, context: {length: 8, stride: 4}"
    path = job(f"  - name: split\n    animatediff: {{{ctx}}}\n"
               f"  - name: whole\n    animatediff: {{{ctx}, split: false}}\n")
    split, whole = tasks_of(path, plugins)
    (a,), (b,) = frames(engine, split), frames(engine, whole)
    assert a.shape[0] == 40
    assert np.abs(a - b).max() <= 1                          # the split only saves memory
    assert min(np.abs(a[i + 1] - a[i]).mean() for i in range(39)) > 0.2


def test_prompt_travel_changes_the_later_frames(kit, plugins, engine, job):
    travel = '{0: "a house", 5: "a red car at night"}'
    path = job(f"  - name: plain\n    animatediff: {MM}}}\n"
               f"  - name: mapping\n    animatediff: {MM}, prompt_travel: {travel}}}\n"
               "  - name: lines\n    prompt: \"a\\n0: house\\n5: red car at night\"\n"
               f"    animatediff: {MM}}}\n"
               "  - name: lines-same\n"
               "    prompt: \"0: a house\\n5: a red car at night\"\n"
               f"    animatediff: {MM}}}\n")
    tasks = by_job(tasks_of(path, plugins))
    (plain,) = frames(engine, *tasks["plain"])
    (mapping,) = frames(engine, *tasks["mapping"])
    (same,) = frames(engine, *tasks["lines-same"])
    (lines,) = frames(engine, *tasks["lines"])
    late = np.abs(mapping[5] - plain[5]).mean()
    assert late > 2 and late > 1.5 * np.abs(mapping[0] - plain[0]).mean()
    assert np.abs(same - mapping).max() <= 1                  # the two forms are one travel
    assert np.abs(lines - mapping).mean() > 1                 # head text joins each keyframe


def test_controlnet_steers_every_frame(kit, plugins, engine, job, tmp_path):
    from render.testing import write_reference_images

    refs = write_reference_images(tmp_path / "refs")
    unit = f"{{model: tiny-controlnet-sd15, image: {refs['house.png']}"
    path = job(f"  - name: none\n    animatediff: {MM}}}\n"
               f"  - name: full\n    controlnet: {unit}, scale: 2.0}}\n    animatediff: {MM}}}\n"
               f"  - name: zero\n    controlnet: {unit}, scale: 0}}\n    animatediff: {MM}}}\n")
    tasks = by_job(tasks_of(path, plugins))
    (off,) = frames(engine, *tasks["none"])
    (on,) = frames(engine, *tasks["full"])
    (zero,) = frames(engine, *tasks["zero"])
    assert on.shape == off.shape
    assert min(np.abs(on[i] - off[i]).mean() for i in range(6)) > 1
    assert np.abs(zero - off).max() <= 1


def moving_square(folder: Path, count: int = 6, size: int = 64) -> list[Path]:
    """``count`` black-and-white frames of a bar moving right (two colours: a GIF of them
    is lossless), as PNG files ``0000.png`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        im = Image.new("RGB", (size, size), "black")
        im.paste((255, 255, 255), (6 * i, 0, 24 + 6 * i, size))
        files.append(folder / f"{i:04}.png")
        im.save(files[-1])
    return files


def as_gif(files: list[Path], path: Path) -> Path:
    frames = [Image.open(f).convert("RGB") for f in files]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    return path


def test_controlnet_over_the_frames_of_a_gif_a_video_or_a_folder(kit, plugins, engine, job,
                                                                 tmp_path):
    from render.builtin_plugins.controlnet import inputs

    files = moving_square(tmp_path / "square")
    gif = as_gif(files, tmp_path / "square.gif")
    unit = "{model: tiny-controlnet-sd15, scale: 2.0, preprocessor: invert, image: "
    path = job(f"  - name: still\n    controlnet: {unit}{files[0]}}}\n"
               f"    animatediff: {MM}}}\n"
               f"  - name: gif\n    controlnet: {unit}{gif}}}\n    animatediff: {MM}}}\n"
               f"  - name: folder\n    controlnet: {unit}{tmp_path / 'square'}}}\n"
               f"    animatediff: {MM}}}\n"
               f"  - name: short\n    controlnet: {unit}{gif}}}\n"
               f"    animatediff: {{motion_module: tiny-motion-sd15, frames: 8}}\n")
    tasks = by_job(tasks_of(path, plugins))
    assert tasks["folder"][0].files["controlnet:0:image"].extra["frames"] == 6
    inputs.clear_caches()
    (still,) = frames(engine, *tasks["still"])
    (moving,) = frames(engine, *tasks["gif"])
    # the bar moves away from the still source's: the frames drift apart as it does
    drift = [np.abs(moving[i] - still[i]).mean() for i in range(6)]
    assert drift[5] > 1 and drift[5] > 2 * drift[0], drift
    runs = inputs.STATS["runs"]
    assert runs == 1 + 6                                      # once per frame
    (folder,) = frames(engine, *tasks["folder"])
    assert np.abs(folder - moving).max() <= 1                 # the same frames, as files
    frames(engine, *tasks["gif"])
    assert inputs.STATS["runs"] == runs + 6                   # the folder's own; gif cached
    with pytest.raises(Exception, match="6 frames, fewer than the animation's 8"):
        frames(engine, *tasks["short"])


def test_video_to_video_follows_its_source(kit, plugins, engine, job, tmp_path):
    files = moving_square(tmp_path / "square")
    gif = as_gif(files, tmp_path / "square.gif")
    back = as_gif(files[::-1], tmp_path / "back.gif")   # the bar moving left
    path = job(f"  - name: moving\n    image: {gif}\n    strength: 0.5\n"
               f"    animatediff: {MM}}}\n"
               f"  - name: back\n    image: {back}\n    strength: 0.5\n"
               f"    animatediff: {MM}}}\n"
               f"  - name: strong\n    image: {gif}\n    strength: 0.9\n"
               f"    animatediff: {MM}}}\n")
    tasks = by_job(tasks_of(path, plugins))
    (moving,) = frames(engine, *tasks["moving"])
    (left,) = frames(engine, *tasks["back"])
    (strong,) = frames(engine, *tasks["strong"])
    assert moving.shape == (6, 64, 64, 3)
    source = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
                       for f in files])
    # each output follows its own source's motion: frame 0 and frame 5 are each nearer the
    # source frame they were rendered from than the other video's output is
    for i, j in ((0, 5), (5, 0)):
        assert np.abs(moving[i] - source[i]).mean() < np.abs(left[i] - source[i]).mean()
        assert np.abs(left[i] - source[j]).mean() < np.abs(moving[i] - source[j]).mean()
    assert np.abs(strong - moving).mean() > 1
    # the same frames as an MP4 (H.264: lossy) render nearly the same animation
    import av

    mp4 = tmp_path / "square.mp4"
    with av.open(str(mp4), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for f in files:
            frame = av.VideoFrame.from_image(Image.open(f).convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path = job(f"  - name: mp4\n    image: {mp4}\n    strength: 0.5\n"
               f"    animatediff: {MM}}}\n")
    (task,) = tasks_of(path, plugins)
    (video,) = frames(engine, task)
    assert video.shape == moving.shape and np.abs(video - moving).mean() < 10


def test_sdxl_motion_module_on_sdxl(kit, plugins, engine, job):
    path = job("  - name: xl\n    model: tiny-sdxl\n"
               "    animatediff: {motion_module: tiny-motion-sdxl, frames: 4}\n")
    (task,) = tasks_of(path, plugins)
    (video,) = frames(engine, task)
    assert video.shape == (4, 64, 64, 3)
    assert np.abs(video[3] - video[0]).mean() > 0.5


# -- outputs ----------------------------------------------------------------------------------

def test_every_format_holds_the_frames_at_their_rate_with_metadata(tmp_path, job):
    path = job(
        f"  - name: gif\n    animatediff: {MM}, fps: 4}}\n    output: {{format: gif}}\n"
        f"  - name: once\n    animatediff: {MM}, fps: 4, loop: false}}\n"
        "    output: {format: gif}\n"
        f"  - name: webp\n    animatediff: {MM}, fps: 12}}\n    output: {{format: webp}}\n"
        f"  - name: mp4\n    animatediff: {MM}, fps: 12}}\n    output: {{format: mp4}}\n"
        f"  - name: frames\n    animatediff: {MM}}}\n    output: {{format: png-frames}}\n"
        f"  - name: travel\n    animatediff: {MM}, prompt_travel: {{0: a barn, 4: a silo}}}}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    (gif,) = (out / "gif").glob("*.gif")
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.info["loop"] == 0
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert sum(durations) == 1500                             # 6 frames at 4 fps
    (once,) = (out / "once").glob("*.gif")
    with Image.open(once) as im:
        assert "loop" not in im.info                          # no NETSCAPE block: plays once
    (webp,) = (out / "webp").glob("*.webp")
    with Image.open(webp) as im:
        assert im.n_frames == 6 and im.info.get("loop", 0) == 0
    (mp4,) = (out / "mp4").glob("*.mp4")
    import av

    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 12
        assert sum(1 for _ in container.decode(stream)) == 6
    stills = sorted((out / "frames").glob("*.png"))
    assert len(stills) == 6 and stills[0].stem.endswith("-0000")
    for file in (gif, webp, mp4, stills[0]):
        text, prov = metadata.read_metadata(file)
        fields = metadata.parse_infotext(text)[2]
        assert fields["AnimateDiff"].startswith("enable: True, model: tiny-motion-sd15")
        assert "video_length: 6" in fields["AnimateDiff"]
        assert prov["task"]["animatediff"]["frames"] == 6
    (travel,) = (out / "travel").glob("*.gif")   # no output.format: an animation is a GIF
    text, _ = metadata.read_metadata(travel)
    assert metadata.parse_infotext(text)[0] == "0: a barn\n4: a silo"   # as A1111 pastes it


def test_replay_of_an_animation_reproduces_every_frame(tmp_path, job, capsys):
    path = job(f"  - name: a\n    animatediff: {MM}}}\n    output: {{format: png-frames}}\n"
               f"  - name: g\n    animatediff: {MM}}}\n    output: {{format: gif}}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    first = sorted((tmp_path / "out" / "a").glob("*-0000.png"))[0]
    replay = tmp_path / "replay"
    assert main(["--replay", str(first), "--out", str(replay), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "6 frames" in said and "beyond" not in said
    assert len(list(replay.glob("*-replay-*.png"))) == 6
    (gif,) = (tmp_path / "out" / "g").glob("*.gif")
    assert main(["--replay", str(gif), "--out", str(replay), "--device", "cpu"]) == 0
    (copy,) = replay.glob("*.gif")
    with Image.open(copy) as im:
        assert im.n_frames == 6
    assert metadata.read_metadata(copy)[0] == metadata.read_metadata(gif)[0]


# -- mistakes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, key, words", [
    ("animatediff: {motion_module: no-such-module}", "animatediff.motion_module",
     "no-such-module"),
    ("animatediff: {motion_module: tiny-motion-sdxl}", "animatediff.motion_module",
     "SDXL-beta"),
    ("animatediff: {motion_module: tiny-motion-sd15, frames: 40}", "animatediff.frames",
     "context"),
    ("animatediff: {motion_module: tiny-motion-sd15, frames: 8, prompt_travel: {0: a, 9: b}}",
     "animatediff.prompt_travel", "past the last frame"),
    ("animatediff: {motion_module: tiny-motion-sd15, motion_lora: {tiny-lora-a: 1}}",
     "animatediff.motion_lora.tiny-lora-a", "not found"),
    ("{prompt: '[a house:a tree:0.5]', animatediff: tiny-motion-sd15}", "prompt",
     "prompt_travel"),
    ("{model: tiny-sdxl, animatediff: {motion_module: tiny-motion-sdxl, context: 8}}",
     "animatediff.context", "SD1.5"),
    ("{image: refs/house.png, animatediff: tiny-motion-sd15}", "image", "a still image"),
    ("{output: {format: png}, animatediff: tiny-motion-sd15}", "animatediff",
     "output.format png holds one image"),
    ("{image: refs/house.png, mask: refs/mask.png, animatediff: tiny-motion-sd15}", "mask",
     "no inpainting"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_mistakes_are_one_located_line_before_rendering(tmp_path, job, capsys, entry, key,
                                                       words, dry):
    from render.testing import write_reference_images

    write_reference_images(tmp_path / "refs")
    body = f"  - name: a\n    {entry}\n" if not entry.startswith("{") else \
        f"  - {{name: a, {entry[1:]}\n"
    path = job(body)
    args = [str(path), "-q", "--device", "cpu", *(["--dry-run"] if dry else [])]
    one_located_error(args, path, key, words, capsys)


def test_dry_run_of_an_animation_imports_no_torch(tmp_path, job):
    path = job(f"  - name: a\n    animatediff: {MM}, motion_lora: {{tiny-motion-lora: 0.5}}}}\n")
    code = (f"import sys, runpy; sys.argv = ['render.py', {str(path)!r}, '--dry-run', '--json'];\n"
            "try:\n    runpy.run_path('render.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert line["animatediff"]["frames"] == 6


# -- kill -9 ----------------------------------------------------------------------------------

def test_kill_9_during_an_animation_then_resume(tmp_path, kit):
    from render.testing.processes import render_process, wait_for

    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nmodel_dirs: [{kit}]\n"
                   "output: {dir: out, format: gif, grid: false}\n"
                   "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}\n"
                   "jobs:\n  - name: k\n    prompt: a barn\n    seeds: 4\n"
                   "    animatediff: {motion_module: tiny-motion-sd15, frames: 8}\n")
    out = tmp_path / "out"
    slow = REPO / "tests" / "fixtures" / "slow_writer"
    args = (str(job), "--batch-size", "1", "--plugins-dir", str(slow), "-q")

    proc = render_process(*args)          # killed while a GIF's temp file is half written
    wait_for(lambda: any(".tmp-" in p.name for p in out.rglob(".*")) if out.exists()
             else False, proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_count(out) < 4
    assert not [p for p in out.rglob("*.gif") if not p.name.startswith(".")
                and Image.open(p).n_frames != 8]
    proc = render_process(*args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    gifs = sorted(out.rglob("*.gif"))
    assert len(gifs) == 4 and not [p for p in out.rglob("*") if ".tmp-" in p.name]
    with Ledger(out) as ledger:
        rows = {row.id: row for row in ledger.rows(job="k")}
    assert len(rows) == 4 and all(row.status == "done" for row in rows.values())
    for gif in gifs:
        with Image.open(gif) as im:
            assert im.n_frames == 8
        assert metadata.read_metadata(gif)[1]["task"]["id"] in rows
