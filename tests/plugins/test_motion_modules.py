"""AnimateDiff motion modules and motion LoRAs (plugins/animatediff/motion.py) on the tiny kit:
versions detected from tensors as diffusers does (and without torch), the shipped configs fit
the real layouts, the original single file loads bit-identical to the folder, an AnimateDiff
pipeline over the tiny base animates, motion LoRAs change frames (weight 0 = none), and
preflight refuses the wrong family or a file that is no motion module, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from render.builtin_plugins.animatediff import motion as mm

from render import testing as tk
from render.api import FieldError, FileRef
from render.models import ModelResolver

REPO = Path(__file__).resolve().parents[2]
DIFFUSERS_TYPES = {"v1": "animatediff_v1", "v2": "animatediff_v2", "v3": "animatediff_v3",
                   "sdxl": "animatediff_sdxl_beta"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paths(kit: Path) -> dict[str, Path]:
    return tk.kit_paths(kit)


# -- detection ------------------------------------------------------------------------------

def test_kit_versions(paths: dict[str, Path]) -> None:
    assert mm.detect_version(paths["tiny-motion-sd15"]) == "v2"
    assert mm.detect_version(paths["tiny-motion-sd15-single"]) == "v2"
    assert mm.detect_version(paths["tiny-motion-sdxl"]) == "sdxl"
    assert [mm.family_of(v) for v in mm.VERSIONS] == ["sd1", "sd1", "sd1", "sdxl"]


def _full_size(version: str) -> tuple[dict[str, object], dict[str, object]]:
    """A full-size module of ``version`` as meta tensors: diffusers' names, original names."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import MotionAdapter

    from render.testing.motion import to_original_motion_module

    config = json.loads((mm.config_dir(version) / "config.json").read_text())
    with init_empty_weights(include_buffers=True):
        adapter = MotionAdapter.from_config(config)
    state = to_original_motion_module(adapter.state_dict())
    assert all(t.device == torch.device("meta") for t in state.values())
    return adapter.state_dict(), state


@pytest.mark.parametrize("version", mm.VERSIONS)
def test_full_size_layouts_agree_with_diffusers(version: str) -> None:
    """A full-size module built from each shipped config, in the original names: we detect
    the version diffusers' own single-file code infers, and the config fits the shapes."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    diffusers_names, state = _full_size(version)
    assert infer_diffusers_model_type(state) == DIFFUSERS_TYPES[version]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert mm.version_from_shapes(shapes) == version
    config = json.loads((mm.config_dir(version) / "config.json").read_text())
    assert mm.layout_from_shapes(shapes) == mm.layout_from_config(config)
    # diffusers' names (a MotionAdapter saved as one file) read the same
    assert mm.version_from_shapes({k: tuple(v.shape) for k, v in diffusers_names.items()}
                                  ) == version


def test_synthetic_key_sets() -> None:
    """Hand-written key sets: v1 has 24-frame tables, v2 a mid block, v3 neither, SDXL three
    levels; a module without position tables is an unknown layout."""
    def module(levels: int, seq: int, mid: bool) -> dict[str, tuple[int, ...]]:
        widths = [320, 640, 1280, 1280][:levels]
        out: dict[str, tuple[int, ...]] = {}
        blocks = [(f"down_blocks.{i}", w, 2) for i, w in enumerate(widths)]
        blocks += [(f"up_blocks.{i}", w, 3) for i, w in enumerate(reversed(widths))]
        blocks += [("mid_block", widths[-1], 1)] if mid else []
        for blk, w, n in blocks:
            for j in range(n):
                tt = f"{blk}.motion_modules.{j}.temporal_transformer"
                out[f"{tt}.norm.weight"] = (w,)
                out[f"{tt}.proj_in.weight"] = (w, w)
                for a in (0, 1):
                    ab = f"{tt}.transformer_blocks.0.attention_blocks.{a}"
                    out[f"{ab}.pos_encoder.pe"] = (1, seq, w)
                    out[f"{ab}.to_q.weight"] = (w, w)
        return out

    assert mm.version_from_shapes(module(4, 24, False)) == "v1"
    assert mm.version_from_shapes(module(4, 32, True)) == "v2"
    assert mm.version_from_shapes(module(4, 32, False)) == "v3"
    assert mm.version_from_shapes(module(3, 32, False)) == "sdxl"
    no_tables = {k: v for k, v in module(4, 32, False).items() if "pos_encoder" not in k}
    with pytest.raises(FieldError, match="unknown layout"):
        mm.version_from_shapes(no_tables, where="hotshot.safetensors")


def test_detection_needs_no_torch(paths: dict[str, Path]) -> None:
    files = [str(paths[n]) for n in ("tiny-motion-sd15", "tiny-motion-sd15-single",
                                     "tiny-motion-sdxl", "tiny-lora-a", "tiny-motion-lora")]
    code = (
        "import sys\n"
        "from render.builtin_plugins.animatediff import motion as mm\n"
        "from render.api import FieldError\n"
        f"files = {files!r}\n"
        "print([mm.detect_version(f) for f in files[:3]])\n"
        "mm.check_motion_lora(files[4])\n"
        "try:\n    mm.check_module(files[3], family='sd1')\nexcept FieldError as e:\n"
        "    print('refused')\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['v2', 'v2', 'sdxl']", "refused"]


# -- preflight ------------------------------------------------------------------------------

def test_family_mismatch_names_the_file(paths: dict[str, Path]) -> None:
    assert mm.check_module(paths["tiny-motion-sd15"], family="sd1", deep=True) == "v2"
    assert mm.check_module(paths["tiny-motion-sdxl"], family="sdxl") == "sdxl"
    with pytest.raises(FieldError) as err:
        mm.check_module(paths["tiny-motion-sdxl"], family="sd1")
    assert str(paths["tiny-motion-sdxl"]) in err.value.message
    assert "SDXL-beta motion module" in err.value.message and "SD 1.x" in err.value.message
    with pytest.raises(FieldError, match="SD 2.x") as err:
        mm.check_module(paths["tiny-motion-sd15-single"], family="sd2")
    assert str(paths["tiny-motion-sd15-single"]) in err.value.message


@pytest.mark.parametrize(("entry", "what"), [
    ("tiny-lora-a", "a LoRA"), ("tiny-lora-peft", "a LoRA"),
    ("tiny-motion-lora", "a motion LoRA"), ("tiny-sd15-single", "a Stable Diffusion checkpoint"),
    ("tiny-sd15", "pipeline folder"), ("tiny-controlnet-sd15", "ControlNetModel folder"),
    ("tiny-emb", "an embedding"),
])
def test_not_a_motion_module(paths: dict[str, Path], entry: str, what: str) -> None:
    with pytest.raises(FieldError) as err:
        mm.check_module(paths[entry], family="sd1")
    assert str(paths[entry]) in err.value.message and what in err.value.message


def test_not_a_motion_lora(paths: dict[str, Path]) -> None:
    mm.check_motion_lora(paths["tiny-motion-lora"])
    for entry, what in (("tiny-motion-sd15-single", "a motion module"),
                        ("tiny-lora-a", "a LoRA")):
        with pytest.raises(FieldError) as err:
            mm.motion_lora_state(paths[entry])
        assert str(paths[entry]) in err.value.message and what in err.value.message


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    import torch

    bad = tmp_path / "mm_evil.ckpt"
    torch.save({"down_blocks.0.motion_modules.0.x": Evil()}, bad)
    for check in (lambda: mm.check_module(bad, family="sd1", deep=True),
                  lambda: mm.build_motion_adapter(bad)):
        with pytest.raises(FieldError) as err:
            check()
        assert str(bad) in err.value.message and "posix.system" in err.value.message
    assert not marker.exists()


def test_found_where_the_tools_keep_them(tmp_path: Path, paths: dict[str, Path]) -> None:
    """ComfyUI-AnimateDiff-Evolved's models/ and sd-webui-animatediff's model/ folders (next
    to models/), and a .ckpt without an allow_pickle alias (read weights-only)."""
    import torch

    kinds = {"checkpoint": mm.ModelKind("checkpoint", ("Stable-diffusion", "checkpoints")),
             "motion_module": mm.MOTION_MODULE, "motion_lora": mm.MOTION_LORA}
    comfy = tmp_path / "ComfyUI"
    evolved = comfy / "custom_nodes/ComfyUI-AnimateDiff-Evolved"
    (comfy / "models/checkpoints").mkdir(parents=True)
    (evolved / "models").mkdir(parents=True)
    (evolved / "motion_lora").mkdir()
    shutil.copy(paths["tiny-motion-sd15-single"], evolved / "models/mm-evolved.safetensors")
    shutil.copy(paths["tiny-motion-lora"], evolved / "motion_lora/zoom.safetensors")
    webui = tmp_path / "webui"
    ext = webui / "extensions/sd-webui-animatediff/model"
    (webui / "models/Stable-diffusion").mkdir(parents=True)
    (webui / "models/Lora").mkdir(parents=True)
    ext.mkdir(parents=True)
    from safetensors.torch import load_file

    torch.save(load_file(str(paths["tiny-motion-sd15-single"])), ext / "mm_tiny_v2.ckpt")
    shutil.copy(paths["tiny-motion-lora"], webui / "models/Lora/pan.safetensors")
    r = ModelResolver([comfy / "models", webui / "models"], {}, tmp_path, kinds=kinds)
    assert r.find("motion_module", "mm-evolved").parent == evolved / "models"
    found = r.find("motion_module", "mm_tiny_v2")
    assert found == ext / "mm_tiny_v2.ckpt"
    assert r.find("motion_lora", "zoom").parent == evolved / "motion_lora"
    assert r.find("motion_lora", "pan").parent.name == "Lora"
    assert mm.check_module(found, family="sd1", deep=True) == "v2"


# -- loading --------------------------------------------------------------------------------

def _states_equal(a: object, b: object) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_loads_bit_identical(paths: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from render.engine import ComponentCache

    folder = mm.build_motion_adapter(paths["tiny-motion-sd15"])
    single = mm.build_motion_adapter(paths["tiny-motion-sd15-single"])  # beside config
    assert _states_equal(folder, single)
    # alone (no folder beside it): too narrow for the shipped v2 config; an alias config: works
    alone = tmp_path / "mm.safetensors"
    shutil.copy(paths["tiny-motion-sd15-single"], alone)
    with pytest.raises(FieldError, match="config:") as err:
        mm.build_motion_adapter(alone)
    assert str(alone) in err.value.message
    assert _states_equal(folder, mm.build_motion_adapter(alone, paths["tiny-motion-sd15"]))
    # a pickle, through the weights-only unpickler
    from safetensors.torch import load_file

    ckpt = tmp_path / "mm.ckpt"
    torch.save({"state_dict": load_file(str(alone))}, ckpt)
    assert _states_equal(folder, mm.build_motion_adapter(ckpt, paths["tiny-motion-sd15"]))
    # once per process through the engine's component cache
    cache = ComponentCache("cpu", torch.float32)
    ref = FileRef("motion_module", "m", str(paths["tiny-motion-sd15"]), "abc")
    first = mm.load_motion_adapter(ref, cache)
    assert mm.load_motion_adapter(ref, cache) is first and cache.builds == 1


@pytest.fixture(scope="module")
def animate(kit: Path, paths: dict[str, Path]):  # noqa: ANN201
    import torch
    from diffusers import AnimateDiffPipeline

    torch.set_num_threads(1)
    base = tk.tiny_pipeline(kit, "tiny-sd15")

    def pipeline(adapter: object) -> object:
        pipe = AnimateDiffPipeline.from_pipe(base, motion_adapter=adapter)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def render(pipe: object, seed: int = 1) -> np.ndarray:
        frames = pipe("a house", num_frames=8, height=64, width=64, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(seed), output_type="np").frames
        return np.asarray(frames[0], dtype=np.float64) * 255

    return pipeline, render


def test_animation_frames_differ(animate, paths: dict[str, Path]) -> None:  # noqa: ANN001
    import torch

    pipeline, render = animate
    adapter = mm.build_motion_adapter(paths["tiny-motion-sd15"])
    frames = render(pipeline(adapter))
    assert frames.shape == (8, 64, 64, 3)
    assert min(tk.pixel_diff(frames[0], f) for f in frames[1:]) > 5
    # the module itself acts: the same with zeroed proj_out (an identity module) differs
    identity = mm.build_motion_adapter(paths["tiny-motion-sd15"])
    with torch.no_grad():
        for name, param in identity.named_parameters():
            if ".proj_out." in name:
                param.zero_()
    assert tk.pixel_diff(frames, render(pipeline(identity))) > 5
    # and the single file animates the same as the folder
    single = mm.build_motion_adapter(paths["tiny-motion-sd15-single"])
    assert np.array_equal(frames, render(pipeline(single)))


def test_motion_lora(animate, paths: dict[str, Path], tmp_path: Path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    pipeline, render = animate
    pipe = pipeline(mm.build_motion_adapter(paths["tiny-motion-sd15"]))
    plain = render(pipe)
    lora = paths["tiny-motion-lora"]
    assert mm.apply_motion_loras(pipe, {"zoom": (lora, 1.0)})
    full = render(pipe)
    assert tk.pixel_diff(plain, full) > 5
    mm.apply_motion_loras(pipe, {"zoom": (lora, 0.5)})
    half = render(pipe)
    assert 0 < tk.pixel_diff(plain, half) < tk.pixel_diff(plain, full)
    assert mm.apply_motion_loras(pipe, {"zoom": (lora, 0)}) == []
    assert np.array_equal(render(pipe), plain)
    mm.apply_motion_loras(pipe, {})
    assert np.array_equal(render(pipe), plain)
    # back on: the adapter stays loaded, the same pixels as the first time
    mm.apply_motion_loras(pipe, {"zoom": (lora, 1.0)})
    assert np.array_equal(render(pipe), full)
    # every key of the original file lands on a motion attention layer
    state = mm.motion_lora_state(lora)
    assert len(state) == len(load_file(str(lora)))
    # diffusers' layout (what scripts/convert_animatediff_motion_lora_to_diffusers.py writes:
    # "unet." + the module's diffusers names, old processor LoRA names) reads the same
    original = load_file(str(lora))
    renames = ((".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
               (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
               (".temporal_transformer", ""))
    converted = {}
    for key, value in original.items():
        for old, new in renames:
            key = key.replace(old, new)
        converted[f"unet.{key}"] = value
    folder = tmp_path / "animatediff-motion-lora-zoom-in"
    folder.mkdir()
    save_file(converted, str(folder / "diffusion_pytorch_model.safetensors"))
    again = mm.motion_lora_state(folder)
    assert again.keys() == state.keys()
    assert all(np.array_equal(again[k].numpy(), state[k].numpy()) for k in state)


def test_image_lora_keeps_working_beside_a_motion_lora(animate, paths: dict[str, Path]
                                                       ) -> None:  # noqa: ANN001
    """An image LoRA set by the LoRA plugin (set_adapters on every layer) stays active when a
    motion LoRA loads after it, and the two stack."""
    pipeline, render = animate
    pipe = pipeline(mm.build_motion_adapter(paths["tiny-motion-sd15"]))
    image = paths["tiny-lora-a"]
    pipe.load_lora_weights(str(image.parent), weight_name=image.name, adapter_name="a")
    pipe.set_adapters(["a"], [1.0])
    image_only = render(pipe)
    mm.apply_motion_loras(pipe, {"zoom": (paths["tiny-motion-lora"], 1.0)})
    both = render(pipe)
    assert tk.pixel_diff(both, image_only) > 5
    pipe.set_adapters(["a"], [1.0])  # the next batch: the LoRA plugin first, then motion
    mm.apply_motion_loras(pipe, {"zoom": (paths["tiny-motion-lora"], 1.0)})
    assert np.array_equal(render(pipe), both)
    mm.apply_motion_loras(pipe, {})
    assert np.array_equal(render(pipe), image_only)
