"""The tiny model kit: reproducible bytes, real formats, and effects a test can see.

Each LoRA, embedding and ControlNet is checked through the real diffusers pipeline: if one
stopped changing pixels, every plugin test built on it would pass without testing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from render import testing as tk

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a house"
VISIBLE = 5.0  # mean absolute difference in 0..255 units that counts as a visible change


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models(kit: Path) -> Path:
    """The session's kit (built once by the shared ``kit`` fixture in conftest.py)."""
    return kit


@pytest.fixture(scope="session")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tk.write_reference_images(tmp_path_factory.mktemp("refs"))


@pytest.fixture(scope="session")
def sd15_base(models: Path):
    return tk.tiny_render(tk.tiny_pipeline(models, "tiny-sd15"), PROMPT, seed=1)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# ------------------------------------------------------------------------- package and build


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, render.testing as t; t.kit_paths('x'); t.default_root();"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env(), timeout=60)


def test_layout_is_comfyui_models_folder(models: Path) -> None:
    for name, path in tk.kit_paths(models).items():
        assert path.exists(), name
    for name in tk.PIPELINES:
        if name != "tiny-sd15-single":
            index = json.loads((models / tk.PATHS[name] / "model_index.json").read_text())
            assert index["_class_name"] == tk.PIPELINES[name]
    sd15 = json.loads((models / "checkpoints/tiny-sd15/model_index.json").read_text())
    assert sd15["safety_checker"] == [None, None]
    assert sd15["requires_safety_checker"] is False
    for sub in ("tokenizer", "tokenizer_2"):
        folder = models / "checkpoints/tiny-sdxl" / sub
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def test_second_build_is_skipped(models: Path) -> None:
    marker = models / ".tiny-kit.json"
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert tk.build_models(models) == tk.kit_paths(models)
    assert tk.ensure_models(models) == models
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before


def test_concurrent_builds_give_identical_bytes(models: Path, tmp_path: Path) -> None:
    """Two processes (different hash seeds) race to build one folder: one builds, the other
    waits, and every byte equals the session's build from a third process."""
    target = tmp_path / "models"
    code = (
        "import sys, time, torch; torch.set_num_threads(1);"
        "from render.testing import ensure_models;"
        "t = time.perf_counter(); ensure_models(sys.argv[1]);"
        "print(round(time.perf_counter() - t, 2))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target)],
            env=_subprocess_env(PYTHONHASHSEED=str(seed)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    print("build seconds (builder, waiter):", [out.strip() for out, _ in outs])
    ours, theirs = _digests(models), _digests(target)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []
    assert not [p for p in target.iterdir() if p.name.startswith(".tiny-kit-build-")]


def test_build_time_in_process(tmp_path: Path) -> None:
    """The whole kit in well under 20 s on one thread (diffusers import excluded)."""
    import diffusers  # noqa: F401  (imported once per process: not the kit's cost)

    start = time.perf_counter()
    tk.build_models(tmp_path, force=True)
    seconds = time.perf_counter() - start
    print(f"kit build: {seconds:.1f} s")
    assert seconds < 60  # generous: the CPU is shared; the target is < 20 s


# --------------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_equal_stable_diffusions(models: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(models / "checkpoints/tiny-sd15/tokenizer"))
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.pad_token_id == 49407
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    tok2 = CLIPTokenizer.from_pretrained(str(models / "checkpoints/tiny-sdxl/tokenizer_2"))
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0


def test_tokenizer_matches_open_clip_on_odd_text(models: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    text = "Hello WORLD!! (masterpiece:1.2), <lora:x:0.5> émoji 🙂 日本 don't 3.14"
    tok = CLIPTokenizer.from_pretrained(str(models / "checkpoints/tiny-sd15/tokenizer"))
    assert tok(text).input_ids[1:-1] == SimpleTokenizer().encode(text)


# ------------------------------------------------------------------------------- single file


def test_single_file_uses_ldm_names(models: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(models / tk.PATHS["tiny-sd15-single"]), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()[2:] == [
            1,
            1,
        ]
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(k.startswith(prefixes) for k in keys)
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in keys, key


def test_single_file_equals_folder(models: Path) -> None:
    import torch

    folder = tk.tiny_pipeline(models, "tiny-sd15")
    single = tk.tiny_pipeline(models, "tiny-sd15-single")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert dict(single.scheduler.config) == dict(folder.scheduler.config)
    assert tk.pixel_diff(tk.tiny_render(folder, PROMPT), tk.tiny_render(single, PROMPT)) == 0


# -------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name", ["tiny-lora-a", "tiny-lora-b"])
def test_kohya_lora_format(models: Path, name: str) -> None:
    from safetensors import safe_open

    with safe_open(str(models / tk.PATHS[name]), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
        alpha = fh.get_tensor(next(k for k in sorted(keys) if k.endswith(".alpha")))
    assert meta["ss_base_model_version"] == "sd_v1"
    assert int(meta["ss_network_dim"]) > 0 and float(meta["ss_network_alpha"]) > 0
    assert float(alpha) == float(meta["ss_network_alpha"])
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for key in (q, te):
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= keys


@pytest.mark.parametrize("name", ["tiny-lora-a", "tiny-lora-b", "tiny-lora-peft"])
def test_sd15_lora_loads_and_changes_pixels(models: Path, sd15_base, name: str) -> None:
    pipe = tk.tiny_pipeline(models, "tiny-sd15")
    pipe.load_lora_weights(str(models / tk.PATHS[name]), adapter_name="x")
    adapters = pipe.get_list_adapters()
    assert adapters.get("unet") == ["x"] and adapters.get("text_encoder") == ["x"]
    pipe.set_adapters(["x"], [1.0])
    assert tk.pixel_diff(sd15_base, tk.tiny_render(pipe, PROMPT, seed=1)) > VISIBLE
    pipe.set_adapters(["x"], [0.0])
    assert tk.pixel_diff(sd15_base, tk.tiny_render(pipe, PROMPT, seed=1)) == 0


def test_two_kohya_loras_stack(models: Path, sd15_base) -> None:
    pipe = tk.tiny_pipeline(models, "tiny-sd15")
    pipe.load_lora_weights(str(models / tk.PATHS["tiny-lora-a"]), adapter_name="a")
    pipe.load_lora_weights(str(models / tk.PATHS["tiny-lora-b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    only_a = tk.tiny_render(pipe, PROMPT, seed=1)
    pipe.set_adapters(["a", "b"], [1.0, 1.0])
    both = tk.tiny_render(pipe, PROMPT, seed=1)
    assert tk.pixel_diff(only_a, both) > VISIBLE
    assert tk.pixel_diff(sd15_base, both) > VISIBLE


def test_peft_lora_format(models: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(models / tk.PATHS["tiny-lora-peft"]), framework="pt") as fh:
        keys = set(fh.keys())
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {f"{unet}.lora_A.weight", f"{unet}.lora_B.weight"} <= keys
    assert any(k.startswith("text_encoder.") and k.endswith("lora_A.weight") for k in keys)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)


def test_sdxl_renders_and_lora_changes_pixels(models: Path) -> None:
    from safetensors import safe_open

    pipe = tk.tiny_pipeline(models, "tiny-sdxl")
    assert pipe.vae_scale_factor == 8
    start = time.perf_counter()
    base = tk.tiny_render(pipe, PROMPT, seed=1)
    assert time.perf_counter() - start < 5
    assert base.shape == (64, 64, 3) and base.std() > 10
    path = models / tk.PATHS["tiny-lora-xl"]
    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    for prefix in ("lora_unet_input_blocks_", "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    pipe.load_lora_weights(str(path), adapter_name="xl")
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert tk.pixel_diff(base, tk.tiny_render(pipe, PROMPT, seed=1)) > VISIBLE


# -------------------------------------------------------------------------------- embeddings


def test_sd15_embedding_changes_pixels(models: Path) -> None:
    from safetensors.torch import load_file

    path = models / tk.PATHS["tiny-emb"]
    assert {k: tuple(v.shape) for k, v in load_file(str(path)).items()} == {"emb_params": (2, 32)}
    prompt = "a photo of tiny-emb house"
    plain = tk.tiny_render(tk.tiny_pipeline(models, "tiny-sd15"), prompt, seed=1)
    pipe = tk.tiny_pipeline(models, "tiny-sd15")
    pipe.load_textual_inversion(str(path), token="tiny-emb")
    assert tk.pixel_diff(plain, tk.tiny_render(pipe, prompt, seed=1)) > VISIBLE


def test_sdxl_embedding_changes_pixels(models: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(models / tk.PATHS["tiny-emb-xl"]))
    pipe = tk.tiny_pipeline(models, "tiny-sdxl")
    assert state["clip_l"].shape[1] == pipe.text_encoder.config.hidden_size
    assert state["clip_g"].shape[1] == pipe.text_encoder_2.config.hidden_size
    prompt = "a photo of tiny-emb-xl house"
    plain = tk.tiny_render(pipe, prompt, seed=1)
    for key, encoder, tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(
            state[key], token="tiny-emb-xl", text_encoder=encoder, tokenizer=tokenizer
        )
    assert tk.pixel_diff(plain, tk.tiny_render(pipe, prompt, seed=1)) > VISIBLE


# -------------------------------------------------------------------------------- ControlNet


def test_sd15_controlnet_changes_pixels(models: Path, refs, sd15_base) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    net = ControlNetModel.from_pretrained(
        str(models / tk.PATHS["tiny-controlnet-sd15"]), local_files_only=True
    )
    pipe = StableDiffusionControlNetPipeline.from_pipe(
        tk.tiny_pipeline(models, "tiny-sd15"), controlnet=net
    )
    house = Image.open(refs["house.png"]).convert("RGB")
    checker = Image.open(refs["checker.png"]).convert("RGB")
    with_house = tk.tiny_render(pipe, PROMPT, seed=1, image=house)
    assert tk.pixel_diff(sd15_base, with_house) > VISIBLE
    # the control image itself matters, not only the ControlNet's presence
    assert tk.pixel_diff(with_house, tk.tiny_render(pipe, PROMPT, seed=1, image=checker)) > VISIBLE
    off = tk.tiny_render(pipe, PROMPT, seed=1, image=house, controlnet_conditioning_scale=0.0)
    assert tk.pixel_diff(sd15_base, off) == 0


def test_sdxl_controlnet_changes_pixels(models: Path, refs) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    base_pipe = tk.tiny_pipeline(models, "tiny-sdxl")
    base = tk.tiny_render(base_pipe, PROMPT, seed=1)
    net = ControlNetModel.from_pretrained(
        str(models / tk.PATHS["tiny-controlnet-sdxl"]), local_files_only=True
    )
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(base_pipe, controlnet=net)
    house = Image.open(refs["house.png"]).convert("RGB")
    assert tk.pixel_diff(base, tk.tiny_render(pipe, PROMPT, seed=1, image=house)) > VISIBLE


# ------------------------------------------------------------------------------------- depth


def test_depth2img_renders_offline(models: Path, refs) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionDepth2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
        str(models / tk.PATHS["tiny-sd2-depth"]), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 5
    assert pipe.scheduler.config.prediction_type == "epsilon"
    house = Image.open(refs["house.png"]).convert("RGB")
    checker = Image.open(refs["checker.png"]).convert("RGB")
    image = tk.tiny_render(pipe, PROMPT, seed=1, image=house, strength=0.8)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 10
    other = tk.tiny_render(pipe, PROMPT, seed=1, image=checker, strength=0.8)
    assert tk.pixel_diff(image, other) > VISIBLE
    ramp = np.asarray(Image.open(refs["gradient.png"]).convert("L"), dtype=np.float32) / 255
    given = tk.tiny_render(
        pipe, PROMPT, seed=1, image=house, strength=0.8, depth_map=torch.from_numpy(ramp)[None]
    )
    assert np.isfinite(given).all() and tk.pixel_diff(image, given) > 1


# ------------------------------------------------------------------------ reference images


def test_reference_images_are_deterministic(tmp_path: Path) -> None:
    from PIL import Image

    a = tk.write_reference_images(tmp_path / "a")
    b = tk.write_reference_images(tmp_path / "b")
    assert sorted(a) == sorted(tk.REFERENCE_IMAGES)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
        with Image.open(a[name]) as img:
            assert img.size == (64, 64)
            assert img.mode == ("L" if name == "mask.png" else "RGB")
            assert len(set(img.getdata())) > 1


# ---------------------------------------------------------------------------------------- CLI


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "render.testing", "--help"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=60,
        check=True,
    )
    assert "models" in out.stdout and "images" in out.stdout


def test_cli_models_prints_one_line_per_entry(models: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "render.testing", "models", str(models)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [*tk.PATHS, *tk.REFERENCE_IMAGES]
    assert all(Path(line.split("\t")[1]).exists() for line in lines)


def _failing_build(tmp: Path) -> None:
    """Stands in for a library that breaks mid-build (as transformers 5.24 did with peft)."""
    (tmp / "checkpoints").mkdir(parents=True)
    (tmp / "checkpoints" / "half.safetensors").write_bytes(b"\0" * 10)
    raise ValueError("The version of PEFT you are using is not compatible\nsecond line")


def test_a_failed_build_says_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from render.testing import __main__ as cli
    from render.testing import kit

    monkeypatch.setattr(kit, "build_into", _failing_build)
    target = tmp_path / "demo-models"
    assert cli.main(["models", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: building the tiny model kit in {target} failed: ValueError: "
                   "The version of PEFT you are using is not compatible"]
    assert not target.exists()


def test_a_failed_build_in_an_existing_folder_keeps_its_files_and_adds_no_entry(
        tmp_path, monkeypatch, capsys):
    from render.testing import __main__ as cli
    from render.testing import kit

    monkeypatch.setattr(kit, "build_into", _failing_build)
    target = tmp_path / "models"
    (target / "mine").mkdir(parents=True)
    (target / "mine" / "notes.txt").write_text("keep me")
    assert cli.main(["models", str(target)]) == 1
    left = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    assert left == [".tiny-kit.lock", "mine", "mine/notes.txt"]
    assert not tk._is_complete(target)
