"""Model resolution, hashes and family detection (render.models): no torch needed."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from render.errors import FieldError
from render.hashing import HashCache, addnet_hash, file_sha256, lora_hash
from render.models import ModelResolver
from render.weights import (
    checkpoint_info,
    detect_family,
    prediction_hint,
    read_pickle_shapes,
    read_safetensors_header,
)


def write_st(path: Path, shapes: dict[str, list[int]], metadata: dict[str, str] | None = None,
             payload: bytes = b"") -> Path:
    """A safetensors file with the given tensor shapes (F16, zero-filled unless payload)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        size = size if not payload else 0
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.write(payload or b"\0" * offset)
    return path


UNET = "model.diffusion_model."


def sd_shapes(*, width: int = 320, context: int = 768, in_ch: int = 4, xl: bool = False,
              openclip: bool = False) -> dict[str, list[int]]:
    """The handful of keys family detection reads, with a real checkpoint's shapes."""
    shapes = {
        UNET + "input_blocks.0.0.weight": [width, in_ch, 3, 3],
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [width, context],
    }
    if xl:
        shapes["conditioner.embedders.1.model.ln_final.weight"] = [1280]
        shapes[UNET + "label_emb.0.0.weight"] = [1280, 2816]
    elif openclip:
        shapes["cond_stage_model.model.ln_final.weight"] = [1024]
    else:
        shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = [768]
    return shapes


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- layouts --------------------------------------------------------------------------------
@pytest.fixture
def a1111(tmp_path: Path) -> Path:
    root = tmp_path / "webui" / "models"
    write_st(root / "Stable-diffusion" / "realistic" / "majic_v7.safetensors", sd_shapes())
    touch(root / "Lora" / "add_detail.safetensors")
    touch(root / "VAE" / "vae-ft-mse.safetensors")
    touch(root / "ControlNet" / "control_canny.safetensors")
    touch(root / "ESRGAN" / "4x-Ultra.safetensors")
    touch(root / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    touch(root.parent / "embeddings" / "easynegative.safetensors")
    return root


@pytest.fixture
def comfy(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI" / "models"
    write_st(root / "checkpoints" / "dreamshaper.safetensors", sd_shapes())
    touch(root / "loras" / "sub" / "film_grain.safetensors")
    touch(root / "vae" / "sdxl_vae.safetensors")
    touch(root / "controlnet" / "depth.safetensors")
    touch(root / "upscale_models" / "4x_NMKD.safetensors")
    touch(root / "embeddings" / "badhands.safetensors")
    touch(root / "animatediff_models" / "mm_sd_v15_v2.safetensors")
    return root


def test_a1111_layout(a1111: Path, tmp_path: Path) -> None:
    r = ModelResolver([a1111], {}, tmp_path)
    assert r.find("checkpoint", "majic_v7").name == "majic_v7.safetensors"
    assert r.find("checkpoint", "realistic/majic_v7").name == "majic_v7.safetensors"
    assert r.find("checkpoint", "realistic\\majic_v7.safetensors").name == "majic_v7.safetensors"
    assert r.find("checkpoint", "MAJIC_V7").name == "majic_v7.safetensors"  # any case
    assert r.find("lora", "add_detail").parent.name == "Lora"
    assert r.find("vae", "vae-ft-mse").parent.name == "VAE"
    assert r.find("controlnet", "control_canny").parent.name == "ControlNet"
    assert r.find("upscaler", "4x-Ultra").parent.name == "ESRGAN"
    # A1111 keeps embeddings beside the models folder
    assert r.find("embedding", "easynegative").parent == a1111.parent / "embeddings"


def test_comfy_layout(comfy: Path, tmp_path: Path) -> None:
    r = ModelResolver([comfy], {}, tmp_path)
    assert r.find("checkpoint", "dreamshaper").parent.name == "checkpoints"
    assert r.find("lora", "film_grain").parent.name == "sub"  # recursive, like A1111
    assert r.find("vae", "sdxl_vae.safetensors").parent.name == "vae"
    assert r.find("controlnet", "depth").parent.name == "controlnet"
    assert r.find("upscaler", "4x_NMKD").parent.name == "upscale_models"
    assert r.find("embedding", "badhands").parent.name == "embeddings"
    assert r.find("motion_module", "mm_sd_v15_v2").parent.name == "animatediff_models"


def test_model_dirs_in_order_and_kinds_apart(a1111: Path, comfy: Path, tmp_path: Path) -> None:
    touch(comfy / "loras" / "add_detail.safetensors")
    assert ModelResolver([comfy, a1111], {}, tmp_path).find("lora", "add_detail").parent.name \
        == "loras"
    assert ModelResolver([a1111, comfy], {}, tmp_path).find("lora", "add_detail").parent.name \
        == "Lora"
    with pytest.raises(FieldError):  # a LoRA is not a checkpoint
        ModelResolver([a1111], {}, tmp_path).find("checkpoint", "add_detail")


def test_flat_folder_and_safetensors_preferred(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    touch(flat / "model.ckpt")
    touch(flat / "model.safetensors")
    r = ModelResolver([flat], {"m": {"source": "model.ckpt", "allow_pickle": True}}, tmp_path)
    assert r.find("checkpoint", "model").suffix == ".safetensors"
    assert r.find("checkpoint", "m").suffix == ".ckpt"


def test_diffusers_folder_is_found_but_not_entered(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "checkpoints" / "my-sd"
    touch(folder / "model_index.json", b"{}")
    touch(folder / "unet" / "diffusion_pytorch_model.safetensors")
    r = ModelResolver([tmp_path / "models"], {}, tmp_path)
    assert r.find("checkpoint", "my-sd") == folder.resolve()
    with pytest.raises(FieldError):
        r.find("checkpoint", "diffusion_pytorch_model")


def test_aliases(a1111: Path, tmp_path: Path) -> None:
    own = write_st(tmp_path / "job" / "weights" / "own.safetensors", sd_shapes())
    aliases = {
        "majic": "majic_v7",
        "mine": "weights/own.safetensors",
        "xl": {"source": "majic_v7", "vae": "vae-ft-mse"},
        "detail": {"source": "add_detail", "kind": "lora"},
    }
    r = ModelResolver([a1111], aliases, tmp_path / "job")
    assert r.find("checkpoint", "majic").name == "majic_v7.safetensors"
    assert r.find("checkpoint", "mine") == own.resolve()
    assert r.find("lora", "detail").name == "add_detail.safetensors"
    with pytest.raises(FieldError):  # kind: lora, so not a checkpoint alias
        r.find("checkpoint", "detail")
    ref = r.resolve_model("xl")
    assert ref.extra["vae"] == "vae-ft-mse"
    with pytest.raises(FieldError, match="unknown key 'sauce'"):
        ModelResolver([a1111], {"bad": {"sauce": "x"}}, tmp_path).find("checkpoint", "bad")


def test_preflight_uses_the_alias_vae(a1111: Path, tmp_path: Path) -> None:
    from render.expand import iter_tasks, load_job_file
    from render.plan import Preflight
    from render.plugins import load_plugins

    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nmodel_dirs: [{a1111}]\n"
                   "models: {xl: {source: majic_v7, vae: vae-ft-mse}}\n"
                   "jobs:\n  - {name: j, model: xl, prompt: p}\n")
    jf = load_job_file(job, load_plugins(builtins=False))
    (plan,) = jf.jobs
    (task,) = iter_tasks(plan)
    resolved = Preflight(jf).resolve(task, plan)
    assert resolved is not None
    assert resolved.files["model"].family == "sd1"
    assert Path(resolved.files["vae"].path).name == "vae-ft-mse.safetensors"


def test_not_found_lists_folders(a1111: Path, comfy: Path, tmp_path: Path) -> None:
    r = ModelResolver([a1111, comfy], {}, tmp_path)
    with pytest.raises(FieldError) as err:
        r.find("lora", "add_detale")
    message = str(err.value)
    assert "lora 'add_detale' not found" in message
    assert str(a1111 / "Lora") in message and str(comfy / "loras") in message
    assert "did you mean 'add_detail'" in message
    with pytest.raises(FieldError, match="none of them exists"):
        ModelResolver([tmp_path / "nope"], {}, tmp_path).find("vae", "x")
    with pytest.raises(FieldError, match="hold no folder named AnimateDiff or animatediff_models"):
        ModelResolver([a1111], {}, tmp_path).find("motion_module", "mm")


def test_ambiguous_name(tmp_path: Path) -> None:
    touch(tmp_path / "models" / "Lora" / "a" / "x.safetensors")
    touch(tmp_path / "models" / "Lora" / "b" / "x.safetensors")
    r = ModelResolver([tmp_path / "models"], {}, tmp_path)
    with pytest.raises(FieldError, match="ambiguous.*a/x, b/x"):
        r.find("lora", "x")
    assert r.find("lora", "b/x").parent.name == "b"


def test_pickle_refused_unless_allowed(a1111: Path, tmp_path: Path) -> None:
    touch(a1111 / "VAE" / "old-vae.pt")
    r = ModelResolver([a1111], {"v": {"source": "old-vae", "allow_pickle": True}}, tmp_path)
    with pytest.raises(FieldError) as err:
        r.find("vae", "old-vae")
    assert "pickle" in str(err.value) and "allow_pickle: true" in str(err.value)
    path = r.find("vae", "v")
    assert path.suffix == ".pt"
    assert r.file_ref("vae", "v", path).extra["allow_pickle"] is True


def test_pickle_only_diffusers_folder_refused(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "checkpoints" / "old"
    touch(folder / "model_index.json", b"{}")
    touch(folder / "unet" / "diffusion_pytorch_model.bin")
    r = ModelResolver([tmp_path / "models"], {}, tmp_path)
    with pytest.raises(FieldError, match="pickle"):
        r.find("checkpoint", "old")


def test_hub_id_only_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--model"
    snap = repo / "snapshots" / "abc123"
    touch(snap / "model_index.json", b"{}")
    touch(repo / "refs" / "main", b"abc123")
    r = ModelResolver([], {}, tmp_path)
    assert r.find("checkpoint", "org/model") == snap
    with pytest.raises(FieldError, match="huggingface-cli download org/other"):
        r.find("checkpoint", "org/other")


# -- hashes ---------------------------------------------------------------------------------
def test_file_ref_hashes_and_cache_hit(a1111: Path, tmp_path: Path) -> None:
    cache = HashCache(tmp_path / "h.sqlite")
    path = ModelResolver([a1111], {}, tmp_path).find("checkpoint", "majic_v7")
    ref = ModelResolver([a1111], {}, tmp_path, hash_cache=cache).file_ref(
        "checkpoint", "majic_v7", path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (ref.sha256, ref.short_hash, ref.family) == (want, want[:10], "sd1")
    assert cache.computed == 1
    # A new resolver (a new run): same size and mtime -> served from the cache.
    cache2 = HashCache(tmp_path / "h.sqlite")
    ModelResolver([a1111], {}, tmp_path, hash_cache=cache2).file_ref("checkpoint", "m", path)
    assert cache2.computed == 0
    # Changed mtime -> hashed again.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ModelResolver([a1111], {}, tmp_path, hash_cache=cache2).file_ref("checkpoint", "m", path)
    assert cache2.computed == 1


def test_folder_hash_covers_weights_and_configs(tmp_path: Path) -> None:
    cache = HashCache(tmp_path / "h.sqlite")
    folder = tmp_path / "sd"
    touch(folder / "model_index.json", b"{}")
    touch(folder / "unet" / "config.json", b'{"a": 1}')
    touch(folder / "unet" / "diffusion_pytorch_model.safetensors", b"w")
    touch(folder / "README.md", b"ignored")
    first = file_sha256(folder, cache)
    manifest = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {rel}\n"
        for rel, data in [("model_index.json", b"{}"), ("unet/config.json", b'{"a": 1}'),
                          ("unet/diffusion_pytorch_model.safetensors", b"w")]
    )
    assert first == hashlib.sha256(manifest.encode()).hexdigest()
    touch(folder / "README.md", b"changed")
    assert file_sha256(folder, cache) == first
    touch(folder / "unet" / "config.json", b'{"a": 2}')
    assert file_sha256(folder, cache) != first


def test_lora_hash_is_a1111s(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4
    plain = write_st(tmp_path / "a.safetensors", {"w": [512]}, {"ss_output_name": "a"}, payload)
    want = hashlib.sha256(payload).hexdigest()
    assert addnet_hash(plain) == want
    assert lora_hash(plain) == want[:12]
    # Metadata edits do not change it; an embedded sshs_model_hash wins (as in A1111).
    edited = write_st(tmp_path / "b.safetensors", {"w": [512]}, {"ss_output_name": "b"}, payload)
    assert lora_hash(edited) == want[:12]
    given = write_st(tmp_path / "c.safetensors", {"w": [512]}, {"sshs_model_hash": "ab" * 32},
                     payload)
    assert lora_hash(given) == "ab" * 6
    r = ModelResolver([tmp_path], {}, tmp_path)
    ref = r.file_ref("lora", "a", plain)
    assert ref.extra["lora_hash"] == want[:12] and ref.extra["addnet_hash"] == want


# -- families -------------------------------------------------------------------------------
def test_family_of_kit_models(kit: Path) -> None:
    ckpt = kit / "checkpoints"
    assert detect_family(ckpt / "tiny-sd15") == "sd1"
    assert detect_family(ckpt / "tiny-sd15-single.safetensors") == "sd1"
    assert detect_family(ckpt / "tiny-sdxl") == "sdxl"
    assert detect_family(ckpt / "tiny-sd2-depth") == "sd2"
    assert checkpoint_info(ckpt / "tiny-sd2-depth").in_channels == 5
    assert detect_family(kit / "loras" / "tiny-lora-xl.safetensors", "lora") == "sdxl"
    assert detect_family(kit / "embeddings" / "tiny-emb-xl.safetensors", "embedding") == "sdxl"
    assert detect_family(kit / "controlnet" / "tiny-controlnet-sdxl", "controlnet") == "sdxl"


@pytest.mark.parametrize(("shapes", "family", "in_ch"), [
    (sd_shapes(), "sd1", 4),
    (sd_shapes(in_ch=9), "sd1", 9),
    (sd_shapes(context=1024, openclip=True), "sd2", 4),
    (sd_shapes(context=1024, openclip=True, in_ch=5), "sd2", 5),
    (sd_shapes(context=2048, xl=True), "sdxl", 4),
    (sd_shapes(width=32, context=32), "sd1", 4),
])
def test_family_of_single_files(tmp_path: Path, shapes: dict, family: str, in_ch: int) -> None:
    info = checkpoint_info(write_st(tmp_path / "m.safetensors", shapes))
    assert (info.family, info.in_channels) == (family, in_ch)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FieldError, match="not a Stable Diffusion checkpoint"):
        checkpoint_info(write_st(tmp_path / "lora.safetensors", {"lora_unet_x.alpha": []}))
    with pytest.raises(FieldError, match="not a safetensors file"):
        read_safetensors_header(touch(tmp_path / "junk.safetensors", b"\xff" * 16))


def test_pickle_shapes_read_without_running_code(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {UNET + "input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)},
                "global_step": 3}, path)
    assert read_pickle_shapes(path) == {UNET + "input_blocks.0.0.weight": (8, 9, 3, 3)}
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.zeros(2, 3)}, legacy, _use_new_zipfile_serialization=False)
    assert read_pickle_shapes(legacy) == {"w": (2, 3)}

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(FieldError):
        read_pickle_shapes(evil)
    assert not marker.exists()


# -- single-file configs --------------------------------------------------------------------
def test_single_file_config_choice(kit: Path, tmp_path: Path) -> None:
    ckpt = kit / "checkpoints"
    r = ModelResolver([kit], {"single": {"source": "tiny-sd15-single", "config": "tiny-sd15"}},
                      tmp_path)
    assert r.resolve_model("single").extra["config"] == str((ckpt / "tiny-sd15").resolve())
    with pytest.raises(FieldError, match="matches no shipped config"):
        r.resolve_model("tiny-sd15-single")
    folder = r.resolve_model("tiny-sd15")
    assert folder.extra["format"] == "diffusers" and folder.extra["config"] is None

    models = tmp_path / "models" / "Stable-diffusion"
    for name, shapes in [("v15", sd_shapes()), ("xl", sd_shapes(context=2048, xl=True)),
                         ("v21", sd_shapes(context=1024, openclip=True)),
                         ("v21v", sd_shapes(context=1024, openclip=True))]:
        write_st(models / f"{name}.safetensors", shapes)
    (models / "v21v.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    r = ModelResolver([tmp_path / "models"], {}, tmp_path)
    shipped = {n: r.resolve_model(n).extra["shipped_config"] for n in ("v15", "xl", "v21", "v21v")}
    assert shipped == {"v15": "sd15", "xl": "sdxl", "v21": "sd2-base", "v21v": "sd2"}
    assert r.resolve_model("v21").extra["prediction"] is None  # unknown: the engine probes
    assert r.resolve_model("v21v").extra["prediction"] == "v"
    # A diffusers folder beside the file with the same stem is its config.
    beside = models / "v15"
    touch(beside / "model_index.json", b"{}")
    ref = r.resolve_model("v15.safetensors")
    assert ref.extra["config"] == str(beside) and ref.extra["shipped_config"] is None


def test_prediction_hint(tmp_path: Path) -> None:
    meta = write_st(tmp_path / "a.safetensors", sd_shapes(),
                    {"modelspec.prediction_type": "v"})
    assert prediction_hint(meta) == "v"
    plain = write_st(tmp_path / "b.safetensors", sd_shapes())
    assert prediction_hint(plain) is None
    (tmp_path / "b.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert prediction_hint(plain) == "epsilon"


def test_shipped_configs_are_complete(tmp_path: Path) -> None:
    from render.configs import NAMES, shipped_config_dir

    for name in NAMES:
        folder = shipped_config_dir(name, tmp_path)
        index = json.loads((folder / "model_index.json").read_text())
        for component, value in index.items():
            if not isinstance(value, list) or value[0] is None:
                continue
            files = {p.name for p in (folder / component).iterdir()}
            assert files & {"config.json", "scheduler_config.json", "tokenizer_config.json"}
            if component.startswith("tokenizer"):
                assert {"vocab.json", "merges.txt"} <= files
    assert shipped_config_dir("sd15", tmp_path) == shipped_config_dir("sd15", tmp_path)


def test_no_torch_import() -> None:
    code = (
        "import sys, pathlib; import render.models as m, render.configs;"
        "m.ModelResolver([pathlib.Path('.')], {}, pathlib.Path('.')).search_dirs('lora');"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
