"""Upscaler and face-restorer files (plugins/upscale/spandrel_models.py) on the tiny kit:
spandrel detects the kit's files, preflight refuses what is no image model (naming the file),
a pickle that would run code is refused and never runs, CodeFormer without
spandrel-extra-arches says what to install, and both folder layouts are searched."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from render.builtin_plugins.upscale import spandrel_models as sm

from render import testing as tk
from render.api import FieldError, FileRef
from render.models import ModelResolver

REPO = Path(__file__).resolve().parents[2]
KINDS = {sm.UPSCALER.name: sm.UPSCALER, sm.FACE_RESTORER.name: sm.FACE_RESTORER}


pytestmark = pytest.mark.usefixtures("one_thread")


def renderer():
    import torch

    from render.engine import Renderer

    return Renderer("cpu", torch.float32)


def kit_file(kit: Path, name: str) -> Path:
    return kit / tk.PATHS[name]


def ref_of(path: Path, kind: str = "upscaler") -> FileRef:
    return FileRef(kind, path.stem, str(path), sha256=f"test:{path}")


# -- the kit's files ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "purpose", "arch", "scale"), [
    ("tiny-esrgan-x4", "upscaler", "ESRGAN", 4),
    ("tiny-compact-x2", "upscaler", "Compact", 2),
    ("tiny-restoreformer", "face", "RestoreFormer", 1),
])
def test_kit_files_are_detected_with_and_without_torch(kit, name, purpose, arch, scale):
    path = kit_file(kit, name)
    assert sm.inspect(path, purpose=purpose, deep=False).arch == arch   # from tensor names
    found = sm.inspect(path, purpose=purpose, deep=True)                # spandrel
    assert (found.arch, found.scale) == (arch, scale)
    descriptor = sm.load(ref_of(path), renderer(), purpose=purpose)
    assert sm.native_scale(descriptor) == scale
    assert not descriptor.model.training


def test_the_kit_esrgan_is_real_esrgans_layout(kit):
    """``{"params_ema": {conv_first, body.N.rdbK.convJ, conv_up1, ...}}`` like the official
    RealESRGAN_x4plus.pth, which render.api.tensor_shapes alone reads as empty."""
    import torch

    from render.api import tensor_shapes

    path = kit_file(kit, "tiny-esrgan-x4")
    state = torch.load(str(path), weights_only=True)
    assert list(state) == ["params_ema"]
    assert {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight",
            "conv_up1.weight", "conv_up2.weight", "conv_hr.weight",
            "conv_last.weight"} <= set(state["params_ema"])
    assert tensor_shapes(path) == {}
    assert sm.read_shapes(path)["conv_first.weight"] == (16, 3, 3, 3)


def test_preflight_without_torch_stays_torch_free(kit):
    code = ("import sys; from pathlib import Path;"
            "from render.builtin_plugins.upscale import spandrel_models as sm;"
            f"sm.check_file(Path({str(kit_file(kit, 'tiny-esrgan-x4'))!r}), purpose='upscaler',"
            " deep=False);"
            f"sm.check_file(Path({str(kit_file(kit, 'tiny-restoreformer'))!r}), purpose='face',"
            " deep=False);"
            "assert 'torch' not in sys.modules and 'spandrel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_the_render_stage_reuses_what_preflight_loaded(kit, tmp_path):
    path = tmp_path / "x4.pth"
    shutil.copy(kit_file(kit, "tiny-esrgan-x4"), path)
    sm.check_file(path, purpose="upscaler", deep=True)
    kept = sm._LOADED[sm._version(path)]
    descriptor = sm.load(ref_of(path), renderer(), purpose="upscaler")
    assert descriptor is kept                                  # not read from disk again
    assert sm._version(path) not in sm._LOADED                 # handed over, not kept twice


def test_old_layout_esrgan_is_detected_and_computes_the_same(kit, tmp_path):
    """The old ESRGAN-repo keys (model.0.weight, model.1.sub.0.RDB1.conv1.0.weight ...) of the
    kit's very weights: detected with and without torch, and the same pixels."""
    import torch

    from render.testing.upscalers import esrgan_state

    old = tmp_path / "old-x4.pth"
    torch.save(esrgan_state(401), str(old))
    assert "model.1.sub.0.RDB1.conv1.0.weight" in sm.read_shapes(old)
    assert sm.inspect(old, purpose="upscaler", deep=False).arch == "ESRGAN"
    assert sm.inspect(old, purpose="upscaler", deep=True).scale == 4
    r = renderer()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = sm.load(ref_of(old), r, purpose="upscaler")(x)
    b = sm.load(ref_of(kit_file(kit, "tiny-esrgan-x4")), r, purpose="upscaler")(x)
    assert torch.equal(a, b)


# -- preflight refusals ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "words"), [
    ("tiny-lora-a", "a LoRA"),
    ("tiny-emb", "embedding"),
    ("tiny-sd15-single", "Stable Diffusion checkpoint"),
])
@pytest.mark.parametrize("deep", [False, True])
def test_a_file_that_is_no_image_model_is_refused_naming_it(kit, tmp_path, name, words, deep):
    path = tmp_path / "ESRGAN" / "upscaler.safetensors"
    path.parent.mkdir()
    shutil.copy(kit_file(kit, name), path)
    with pytest.raises(FieldError) as caught:
        sm.check_file(path, purpose="upscaler", deep=deep)
    assert str(path) in caught.value.message
    assert "is not an upscaler" in caught.value.message and words in caught.value.message


def test_a_face_model_is_no_upscaler_and_the_reverse(kit):
    for deep in (False, True):
        with pytest.raises(FieldError, match="is a face restorer .RestoreFormer., not an "):
            sm.check_file(kit_file(kit, "tiny-restoreformer"), purpose="upscaler", deep=deep)
        with pytest.raises(FieldError, match="is an upscaler .ESRGAN., not a face restorer"):
            sm.check_file(kit_file(kit, "tiny-esrgan-x4"), purpose="face", deep=deep)


def test_an_unknown_architecture_lists_what_spandrel_supports(tmp_path):
    import torch

    from render.testing.stfile import save_safetensors

    path = tmp_path / "odd.safetensors"
    save_safetensors({"stem.conv.weight": torch.zeros(8, 3, 3, 3),
                      "head.weight": torch.zeros(3, 8, 1, 1)}, path)
    sm.check_file(path, purpose="upscaler", deep=False)   # only spandrel can tell
    with pytest.raises(FieldError) as caught:
        sm.check_file(path, purpose="upscaler", deep=True)
    message = caught.value.message
    assert str(path) in message and "does not know this model's architecture" in message
    assert "ESRGAN" in message and "SwinIR" in message and "GFPGAN" in message


def test_an_unreadable_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a pickle at all")
    for deep in (False, True):
        with pytest.raises(FieldError) as caught:
            sm.check_file(path, purpose="upscaler", deep=deep)
        assert str(path) in caught.value.message


class _Payload:
    """Pickles as ``os.system("touch <marker>")``: loading it with plain pickle runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    import torch

    marker = tmp_path / "payload-ran"
    path = tmp_path / "ESRGAN" / "evil.pth"
    path.parent.mkdir()
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(4, 3, 3, 3),
                               "body.0.weight": _Payload(marker)}}, str(path))
    for deep in (False, True):
        with pytest.raises(FieldError) as caught:
            sm.check_file(path, purpose="upscaler", deep=deep)
        assert str(path) in caught.value.message
        assert not marker.exists()
        assert "refused, and nothing in it was run" in caught.value.message
        assert "posix.system" in caught.value.message
    # past the torch-free check, torch's weights-only unpickler refuses it as well
    with pytest.raises(FieldError) as caught:
        sm.load_descriptor(path)
    assert "refused, and nothing in it was run" in caught.value.message
    assert "posix.system" in caught.value.message and not marker.exists()
    # the payload is live: a plain (unsafe) load does run it
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert marker.exists()


def _codeformer_like(path: Path) -> Path:
    """A file with the tensor names spandrel-extra-arches detects CodeFormer by."""
    import torch

    from render.testing.stfile import save_safetensors

    names = sm.FACE_SIGNATURES["CodeFormer"]
    save_safetensors({n: torch.zeros(4, 3, 3, 3) for n in names}, path)
    return path


@pytest.mark.skipif(importlib.util.find_spec("spandrel_extra_arches") is not None,
                    reason="spandrel-extra-arches is installed")
@pytest.mark.parametrize("deep", [False, True])
def test_codeformer_without_extra_arches_says_what_to_install(tmp_path, deep):
    path = _codeformer_like(tmp_path / "codeformer-v0.1.0.safetensors")
    with pytest.raises(FieldError) as caught:
        sm.check_file(path, purpose="face", deep=deep)
    assert str(path) in caught.value.message
    assert ("CodeFormer needs spandrel-extra-arches (pip install spandrel-extra-arches; its "
            "licence is non-commercial)") in caught.value.message


def test_codeformer_with_extra_arches_is_in_the_registry():
    pytest.importorskip("spandrel_extra_arches")
    from spandrel import MAIN_REGISTRY

    assert "CodeFormer" in sm.registry()
    assert "CodeFormer" not in MAIN_REGISTRY     # a private copy: spandrel's own is untouched


# -- finding files: A1111 and ComfyUI layouts --------------------------------------------------

def test_a1111_and_comfyui_layouts_are_both_searched(kit, tmp_path):
    a1111 = tmp_path / "webui" / "models"
    (a1111 / "ESRGAN").mkdir(parents=True)
    (a1111 / "GFPGAN").mkdir()
    shutil.copy(kit_file(kit, "tiny-compact-x2"), a1111 / "ESRGAN" / "4x-Compact.safetensors")
    shutil.copy(kit_file(kit, "tiny-restoreformer"), a1111 / "GFPGAN" / "RF.safetensors")
    models = ModelResolver([a1111, kit], kinds=KINDS)
    assert models.find("upscaler", "4x-Compact") == a1111 / "ESRGAN" / "4x-Compact.safetensors"
    assert models.find("face_restorer", "RF.safetensors") == a1111 / "GFPGAN" / "RF.safetensors"
    assert models.find("upscaler", "tiny-compact-x2") == kit_file(kit, "tiny-compact-x2")
    assert models.find("face_restorer", "tiny-restoreformer") == kit_file(
        kit, "tiny-restoreformer")


def test_a_pth_upscaler_needs_no_alias_but_a_pth_checkpoint_still_does(kit, tmp_path):
    """Upscaler .pth files are pickles by convention and this plugin reads them weights-only
    (``weights_only_pickles``); every other kind keeps the allow_pickle rule."""
    plain = ModelResolver([kit], kinds=KINDS)
    assert plain.find("upscaler", "tiny-esrgan-x4") == kit_file(kit, "tiny-esrgan-x4")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "old.pth").write_bytes(kit_file(kit, "tiny-esrgan-x4")
                                                       .read_bytes())
    from render.kinds import core_kinds

    kinds = {}
    core_kinds.register_model_kinds(lambda k: kinds.setdefault(k.name, k))
    with pytest.raises(FieldError, match="allow_pickle"):
        ModelResolver([tmp_path], kinds=kinds).find("checkpoint", "old")
