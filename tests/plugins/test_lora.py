"""The LoRA plugin (plugins/lora.py), through the real code paths on the tiny model kit.

Job files go through ``render.expand`` (validation, grid axes, ``expand_task``) and
``render.plan.Preflight`` (the real ``ModelResolver``); renders go through ``render.engine``
(the engine strips ``<lora:...>`` tags, calls ``configure_pipeline`` and encodes prompts);
one test runs the CLI end to end and reads the infotext back from the PNG.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from render import expand
from render.errors import FieldError, JobErrors
from render.plan import make_batches
from render.run import resolve_tasks
from render.tasks import Batch, Result, Task


@pytest.fixture(scope="module")
def lora(plugins: Any) -> Any:
    """The plugin module as loaded (by file path, like a user's plugin)."""
    return plugins.pm.get_plugin("lora")


def resolve(path: Path, plugins: Any) -> list[Task]:
    """Load, expand (plugins included) and preflight a job file, as ``render`` does."""
    return resolve_tasks(expand.load_job_file(path, plugins).jobs, plugins)


def by_job(tasks: list[Task]) -> dict[str, Task]:
    return {t.job: t for t in tasks}


def fake_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                     metadata: dict[str, str] | None = None) -> Path:
    """A header-only safetensors file: enough for everything that reads headers."""
    header: dict[str, Any] = {
        name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 0]}
        for name, shape in shapes.items()
    }
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash, computed here independently: sha256 of the bytes after the header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


# -- the section and the inline tags ------------------------------------------------------------

def test_section_forms_normalise_to_te_and_unet_floats(lora: Any) -> None:
    assert lora.validate_section(None) == {}
    assert lora.validate_section({"b": 1, "a": {"te": 0.5, "unet": 1}}) == {
        "a": {"te": 0.5, "unet": 1.0}, "b": {"te": 1.0, "unet": 1.0}}
    assert list(lora.validate_section({"z": 1, "a": 1})) == ["a", "z"]
    assert lora.validate_section({"neg": -1.5}) == {"neg": {"te": -1.5, "unet": -1.5}}


@pytest.mark.parametrize(("value", "message", "subkey"), [
    (["a"], "expected a mapping of LoRA name -> weight, e.g. {add_detail: 0.6}, got a list", ""),
    ({"a": "strong"}, "expected a LoRA weight (or {te: w, unet: w}) in [-20.0, 20.0], got"
     " 'strong'", "a"),
    ({"a": True}, "expected a LoRA weight (or {te: w, unet: w}) in [-20.0, 20.0], got True",
     "a"),
    ({"a": {"te": 1}}, "expected both te and unet weights, unet is missing", "a"),
    ({"a": {"te": 1, "clip": 1}}, "expected {te: weight, unet: weight}, got the key 'clip'",
     "a"),
    ({"a_v1": {"5": 1}}, "expected {te: weight, unet: weight}, got the key '5' (a LoRA name "
     "containing '.' cannot be a dotted grid axis: vary the whole 'lora' section instead)",
     "a_v1"),
    ({"a:b": 1}, "a LoRA name cannot contain :: 'a:b'", "a:b"),
])
def test_section_errors(lora: Any, value: Any, message: str, subkey: str) -> None:
    with pytest.raises(FieldError) as info:
        lora.validate_section(value)
    assert (info.value.message, info.value.subkey) == (message, subkey)


@pytest.mark.parametrize(("body", "expected"), [
    ("x", ("x", 1.0, 1.0)),
    ("x:0.6", ("x", 0.6, 0.6)),
    ("x:0.6:1", ("x", 0.6, 1.0)),
    (" my lora : 0.5 ", ("my lora", 0.5, 0.5)),
    ("x:te=0.2", ("x", 0.2, 0.2)),
    ("x:0.8:unet=0.3", ("x", 0.8, 0.3)),
    ("x:unet=0.3", ("x", 1.0, 0.3)),
])
def test_parse_tag_follows_a1111(lora: Any, body: str, expected: tuple[str, float, float]) -> None:
    name, weights = lora.parse_tag(body)
    assert (name, weights["te"], weights["unet"]) == expected


@pytest.mark.parametrize(("body", "reason"), [
    ("", "the tag has no LoRA name"),
    ("x:strong", "'strong' is not a weight"),
    ("x:1:1:8", "a DyLoRA dimension ('dyn', the third number) is not supported"),
    ("x:clip=1", "unknown part 'clip'= (expected te= or unet=)"),
])
def test_parse_tag_errors(lora: Any, body: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        lora.parse_tag(body)


def test_inline_tags_merge_into_the_section(job: Any, plugins: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: inline
            prompt: "a house <lora:tiny-lora-a:0.8> <lyco:tiny-lora-b:0.2:0.9>"
          - name: both
            prompt: "a house <lora:tiny-lora-a:0.8>"
            lora: {tiny-lora-a: 0.3, tiny-lora-b: 1}
          - name: twice
            prompt: "<lora:tiny-lora-a:0.1> a house <lora:tiny-lora-a>"
    """), plugins))
    assert tasks["inline"].sections["lora"] == {
        "tiny-lora-a": {"te": 0.8, "unet": 0.8}, "tiny-lora-b": {"te": 0.2, "unet": 0.9}}
    # the prompt is the more specific place: its weight wins over the section's
    assert tasks["both"].sections["lora"]["tiny-lora-a"] == {"te": 0.8, "unet": 0.8}
    assert tasks["both"].sections["lora"]["tiny-lora-b"] == {"te": 1.0, "unet": 1.0}
    assert tasks["twice"].sections["lora"] == {"tiny-lora-a": {"te": 1.0, "unet": 1.0}}
    # ... but an axis always wins, so a grid over an inline LoRA's weight works
    axis = [t for t in resolve(job("""\
          - name: axis
            prompt: "a house <lora:tiny-lora-a:0.8>"
            grid: {lora.tiny-lora-a: [0, 1]}
    """), plugins)]
    assert [t.sections["lora"]["tiny-lora-a"]["unet"] for t in axis] == [0.0, 1.0]
    # the prompt keeps its tags (the infotext shows it as written)
    assert tasks["inline"].prompt == "a house <lora:tiny-lora-a:0.8> <lyco:tiny-lora-b:0.2:0.9>"


def test_a_tag_inside_a_prompt_edit_applies_to_the_whole_render(job: Any, plugins: Any) -> None:
    from render.prompts import prompt_schedule, strip_extra_networks

    (task,) = resolve(job("""\
          - name: edit
            prompt: "a [house <lora:tiny-lora-a:0.8>:barn:0.5]"
    """), plugins)
    # as in A1111, extra networks are taken out of the whole prompt before it is scheduled
    assert task.sections["lora"] == {"tiny-lora-a": {"te": 0.8, "unet": 0.8}}
    assert prompt_schedule(strip_extra_networks(task.prompt), 4) == [(2, "a house "),
                                                                     (4, "a barn")]


def test_grid_axis_over_a_weight_yields_distinct_tasks(job: Any, plugins: Any, lora: Any) -> None:
    tasks = resolve(job("""\
          - name: weights
            lora: {tiny-lora-a: 1, tiny-lora-b: {te: 1, unet: 1}}
            grid:
              lora.tiny-lora-a: [0, 0.5, 1]
              lora.tiny-lora-b.unet: [0, 1]
    """), plugins)
    assert len(tasks) == 6
    cells = [(t.sections["lora"]["tiny-lora-a"]["te"], t.sections["lora"]["tiny-lora-b"]["unet"])
             for t in tasks]
    assert cells == [(0.0, 0.0), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0), (1.0, 0.0), (1.0, 1.0)]
    assert all(t.sections["lora"]["tiny-lora-b"]["te"] == 1.0 for t in tasks)
    assert len({t.id for t in tasks}) == 6
    assert len({lora.group_key(t) for t in tasks}) == 6
    assert all(t.axes for t in tasks)


def test_group_key_is_the_active_stack(job: Any, plugins: Any, lora: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: none
          - name: zero
            lora: {tiny-lora-a: 0}
          - name: ab
            lora: {tiny-lora-a: 1, tiny-lora-b: 0.5}
          - name: ba
            prompt: "a house <lora:tiny-lora-b:0.5>"
            lora: {tiny-lora-a: 1}
    """), plugins))
    assert lora.group_key(tasks["none"]) is None
    assert lora.group_key(tasks["zero"]) is None  # weight 0 is not activated: same pixels
    assert lora.group_key(tasks["ab"]) == lora.group_key(tasks["ba"])
    batches = make_batches(list(tasks.values()), plugins.pm.hook, 0)
    assert sorted(len(b.tasks) for b in batches) == [2, 2]


# -- preflight: files, formats, base compatibility ----------------------------------------------

def test_sdxl_lora_on_sd15_is_refused_before_rendering(job: Any, plugins: Any) -> None:
    path = job("""\
          - name: wrong
            lora: {tiny-lora-xl: 1}
    """)
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    assert str(info.value) == (
        f"{path}:8:34: jobs[0].lora.tiny-lora-xl: LoRA 'tiny-lora-xl' "
        "(tiny-lora-xl.safetensors) is for SDXL (it has layers for a second text encoder), "
        "but model 'tiny-sd15' is SD 1.x")


def test_sd15_lora_on_sdxl_is_refused(job: Any, plugins: Any) -> None:
    path = job("""\
          - name: wrong
            model: tiny-sdxl
            prompt: "a house <lora:tiny-lora-a:1>"
    """)
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    assert str(info.value).endswith(
        "LoRA 'tiny-lora-a' (tiny-lora-a.safetensors) is for SD 1.x (its metadata says "
        "ss_base_model_version=sd_v1), but model 'tiny-sdxl' is SDXL")


@pytest.mark.parametrize(("key", "kind"), [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LyCORIS LoHa"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "LyCORIS LoKr"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.on_input", "LyCORIS (IA)^3"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "kohya DoRA"),
])
def test_lycoris_files_are_refused_with_their_type(
    job: Any, plugins: Any, tmp_path: Path, key: str, kind: str
) -> None:
    fake = fake_safetensors(tmp_path / "extra" / "loras" / "fancy.safetensors",
                            {key: (4, 4), key.rsplit(".", 1)[0] + ".alpha": ()})
    path = job("""\
          - name: lyco
            lora: {fancy: 1}
    """, dirs=(tmp_path / "extra",))
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    assert str(info.value) == (
        f"{path}:8:27: jobs[0].lora.fancy: LoRA 'fancy': {fake} is a {kind} network "
        f"(tensors like {key!r}), which diffusers cannot load; only LoRA/LoCon files "
        "(lora_down/lora_up, or peft lora_A/lora_B) are supported")


def test_missing_bad_tag_and_same_file_twice(job: Any, plugins: Any) -> None:
    path = job("""\
          - name: missing
            lora: {tiny-lora-z: 1}
          - name: badtag
            prompt: "a house <lora:tiny-lora-a:strong>"
          - name: twice
            prompt: "a house <lora:tiny-lora-a.safetensors>"
            lora: {tiny-lora-a: 1}
    """)
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:8:33: jobs[0].lora.tiny-lora-z: lora 'tiny-lora-z' "
                               "not found")
    assert "did you mean" in lines[0]
    assert lines[1].endswith(
        "prompt: bad tag '<lora:tiny-lora-a:strong>': 'strong' is not a weight")
    assert lines[2].endswith(
        "LoRA 'tiny-lora-a.safetensors' and 'tiny-lora-a' are the same file "
        "(tiny-lora-a.safetensors)")


def test_kit_loras_are_placed_by_structure_and_metadata(kit: Path, lora: Any) -> None:
    loras = kit / "loras"
    a = lora.inspect_lora(loras / "tiny-lora-a.safetensors")
    assert (a.format, a.families, a.unsupported) == ("kohya", frozenset({"sd1"}), None)
    peft = lora.inspect_lora(loras / "tiny-lora-peft.safetensors")
    assert (peft.format, peft.families) == ("peft", frozenset({"sd1", "sd2"}))
    assert "full resolution" in peft.reason
    xl = lora.inspect_lora(loras / "tiny-lora-xl.safetensors")
    assert (xl.format, xl.families) == ("kohya", frozenset({"sdxl"}))


CROSS = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
PEFT_CROSS = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"


@pytest.mark.parametrize(("shapes", "metadata", "families", "reason"), [
    ({CROSS: (8, 768)}, {}, {"sd1"}, "its cross-attention reads 768-wide text"),
    ({CROSS: (8, 1024)}, {"ss_base_model_version": "sd_v1"}, {"sd2"},
     "its cross-attention reads 1024-wide text"),
    ({PEFT_CROSS: (8, 2048)}, {}, {"sdxl"}, "its cross-attention reads 2048-wide text"),
    ({CROSS.replace("blocks_0_attn2", "blocks_3_attn2"): (8, 32)}, {}, {"sdxl"},
     "its UNet has multi-layer transformer blocks"),
    ({"lora_te1_x.lora_down.weight": (8, 768)}, {"ss_base_model_version": "sdxl_base_v1-0"},
     {"sdxl"}, "its metadata says ss_base_model_version=sdxl_base_v1-0"),
    ({TE: (8, 32)}, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, {"sd2"},
     "its metadata says modelspec.architecture=stable-diffusion-v2-768-v/lora"),
    ({TE: (8, 32)}, {"ss_v2": "True"}, {"sd2"}, "its metadata says ss_v2=True"),
    ({TE: (8, 1024)}, {}, {"sd2"}, "its text-encoder layers are 1024 wide"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (8, 3072)},
     {"ss_base_model_version": "flux1"}, {"flux1"},
     "its metadata says ss_base_model_version=flux1"),
    ({TE: (8, 32)}, {}, None, ""),
])
def test_family_rules(lora: Any, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                      families: set[str] | None, reason: str) -> None:
    found, why = lora.lora_family(shapes, metadata)
    assert (set(found) if found else None, why) == (families, reason)


# -- infotext ------------------------------------------------------------------------------------

def test_lora_hashes_in_a1111_format(job: Any, plugins: Any, lora: Any, kit: Path) -> None:
    (task,) = resolve(job("""\
          - name: hashes
            prompt: "a house <lora:tiny-lora-b:0.5>"
            lora: {tiny-lora-a: 0}
    """), plugins)
    a = addnet_hash(kit / "loras" / "tiny-lora-a.safetensors")
    b = addnet_hash(kit / "loras" / "tiny-lora-b.safetensors")
    fields = lora.result_metadata(task=task, result=Result(task, []))
    assert fields == {"Lora hashes": f'"tiny-lora-a: {a}, tiny-lora-b: {b}"'}
    full = hashlib.sha256((kit / "loras" / "tiny-lora-a.safetensors").read_bytes()).hexdigest()
    assert task.files["lora:tiny-lora-a"].sha256 == full  # provenance: the full sha256
    assert lora.result_metadata(task=resolve(job("- name: plain\n"), plugins)[0],
                                result=None) is None


# -- rendering -----------------------------------------------------------------------------------

def render_one(engine: Any, task: Task) -> np.ndarray:
    """One task in its own call, in the order the test says (the state between calls is
    what configure_pipeline must get right)."""
    (result,) = engine.render(Batch(("test",), (task,)))
    return np.asarray(result.images[0], dtype=np.int16)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_stacks_through_the_engine(job: Any, plugins: Any, engine: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: base
          - name: zero
            lora: {tiny-lora-a: 0}
          - name: half
            lora: {tiny-lora-a: 0.5}
          - name: full
            lora: {tiny-lora-a: 1}
          - name: inline
            prompt: "a house <lora:tiny-lora-a:1>"
          - name: ab
            lora: {tiny-lora-a: 1, tiny-lora-b: 0.7}
          - name: ba
            prompt: "a house <lora:tiny-lora-b:0.7><lora:tiny-lora-a>"
          - name: peft
            lora: {tiny-lora-peft: 1}
          - name: unet_only
            lora: {tiny-lora-b: {te: 0, unet: 1}}
          - name: te_only
            lora: {tiny-lora-b: {te: 1, unet: 0}}
    """), plugins))
    order = ["base", "full", "zero", "half", "inline", "ab", "ba", "peft", "unet_only",
             "te_only"]
    px = {name: render_one(engine, tasks[name]) for name in order}
    px["base again"] = render_one(engine, tasks["base"])
    px["full again"] = render_one(engine, tasks["full"])

    assert np.array_equal(px["zero"], px["base"])          # weight 0 renders like no LoRA
    assert np.array_equal(px["base again"], px["base"])    # adapters off: the base model
    assert np.array_equal(px["full again"], px["full"])    # and back on
    assert diff(px["full"], px["base"]) > 5                # kohya changes pixels
    assert diff(px["half"], px["full"]) > 2                # and its weight matters
    assert diff(px["half"], px["base"]) > 2
    assert np.array_equal(px["inline"], px["full"])        # a tag is the section's entry
    assert np.abs(px["ab"] - px["ba"]).max() <= 1          # stack order does not matter
    assert diff(px["ab"], px["full"]) > 2
    assert diff(px["peft"], px["base"]) > 5                # diffusers/peft format too
    assert diff(px["unet_only"], px["te_only"]) > 2        # the two A1111 weights are apart
    assert diff(px["unet_only"], px["base"]) > 2 and diff(px["te_only"], px["base"]) > 2

    model = tasks["base"].files["model"]
    assert engine.loads[model.path] == 1                   # no stack switch reloaded it
    pipe = engine.pipeline_for(engine.resident(model), tasks["base"])
    adapters = pipe.get_list_adapters()["unet"]
    wanted = {"lora_" + tasks[n].files[f"lora:{lora_}"].sha256[:16]
              for n, lora_ in [("full", "tiny-lora-a"), ("ab", "tiny-lora-b"),
                               ("peft", "tiny-lora-peft")]}
    assert sorted(adapters) == sorted(wanted)              # each file loaded once


def test_weight_zero_is_bit_exact_in_float(
    job: Any, plugins: Any, lora: Any, kit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the engine's 8-bit images: the pipeline's float output is identical."""
    import torch

    from render import testing as tk

    torch.set_num_threads(1)
    tasks = by_job(resolve(job("""\
          - name: base
          - name: zero
            lora: {tiny-lora-a: 0, tiny-lora-b: {te: 0, unet: 0}}
          - name: lit
            lora: {tiny-lora-a: 1}
          - name: other
            lora: {tiny-lora-b: 1}
    """), plugins))
    pipe = tk.tiny_pipeline(kit, "tiny-sd15")

    def run(name: str) -> np.ndarray:
        plugins.pm.hook.configure_pipeline(pipe=pipe, batch=Batch((), (tasks[name],)))
        return tk.tiny_render(pipe, "a house", seed=1, steps=3)

    base = run("base")
    lit = run("lit")
    assert not np.array_equal(lit, base)
    assert np.array_equal(run("zero"), base)
    assert np.array_equal(run("base"), base)
    assert np.array_equal(run("lit"), lit)
    # beyond the resident limit the least recently used adapter is unloaded, and comes back
    monkeypatch.setattr(lora, "MAX_RESIDENT_ADAPTERS", 1)
    other = run("other")
    b = "lora_" + tasks["other"].files["lora:tiny-lora-b"].sha256[:16]
    assert pipe.get_list_adapters() == {"unet": [b], "text_encoder": [b]}
    assert np.array_equal(run("lit"), lit)
    assert np.array_equal(run("base"), base)
    assert not np.array_equal(other, lit)


def test_sdxl_kohya_lora(job: Any, plugins: Any, engine: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: xl
            model: tiny-sdxl
          - name: xl_lora
            model: tiny-sdxl
            lora: {tiny-lora-xl: 1}
    """), plugins))
    base = render_one(engine, tasks["xl"])
    with_lora = render_one(engine, tasks["xl_lora"])
    assert diff(with_lora, base) > 5
    assert np.array_equal(render_one(engine, tasks["xl"]), base)


def test_cli_end_to_end_writes_lora_hashes(job: Any, kit: Path, tmp_path: Path) -> None:
    from PIL import Image

    from render.cli import main

    path = job("""\
          - name: e2e
            prompt: "a house <lora:tiny-lora-b:0.5>"
            lora: {tiny-lora-a: 0.8}
    """)
    assert main([str(path), "--quiet", "--device", "cpu"]) == 0
    (png,) = (tmp_path / "out" / "e2e").glob("*.png")
    text = Image.open(png).info["parameters"]
    a = addnet_hash(kit / "loras" / "tiny-lora-a.safetensors")
    b = addnet_hash(kit / "loras" / "tiny-lora-b.safetensors")
    # the section's LoRA is tagged too (issue 11): A1111 rebuilds the stack from the prompt
    assert text.startswith("a house <lora:tiny-lora-b:0.5> <lora:tiny-lora-a:0.8>\n")
    assert f'Lora hashes: "tiny-lora-a: {a}, tiny-lora-b: {b}"' in text


#: A1111's own rule for extra networks in a prompt (modules/extra_networks.py: re_extra_net).
A1111_EXTRA_NET = r"<(\w+):([^>]+)>"


def a1111_stack(prompt: str) -> dict[str, tuple[float, float]]:
    """The LoRA stack A1111 rebuilds from a pasted prompt: te weight, unet weight (default
    te); the last tag of a name wins."""
    import re

    stack = {}
    for kind, body in re.findall(A1111_EXTRA_NET, prompt):
        if kind in ("lora", "lyco"):
            name, *numbers = body.split(":")
            te = float(numbers[0]) if numbers else 1.0
            stack[name] = (te, float(numbers[1]) if len(numbers) > 1 else te)
    return stack


def test_the_infotext_prompt_carries_every_lora_as_a1111_rebuilds_it(job: Any, tmp_path: Path,
                                                                        one_thread: None) -> None:
    """Read back by an independent reader (sd-parsers), then A1111's parsing rule: the stack
    equals what rendered, whether a section, a grid axis or an inline tag set it."""
    from sd_parsers import ParserManager

    from render import metadata
    from render.cli import main

    path = job("""\
          - name: section
            lora: {tiny-lora-a: 0.7, tiny-lora-b: {te: 0.5, unet: 1}}
          - name: axis
            prompt: "a house <lora:tiny-lora-a:0.2>"
            grid: {lora.tiny-lora-a: [0, 0.9]}
          - name: tagged
            prompt: "a house, <lora:tiny-lora-b:0.4>"
    """)
    assert main([str(path), "-q"]) == 0
    reader = ParserManager()
    seen = {}
    for image in sorted((path.parent / "out").glob("*/*.png")):   # not grids/ sheets
        _, prov = metadata.read_metadata(image)
        task = prov["task"]
        read = reader.parse(image)
        prompt = read.full_prompt
        stack = a1111_stack(prompt)
        want = {name: (w["te"], w["unet"]) for name, w in task["lora"].items()}
        assert stack == want, (image, prompt)
        seen[(task["job"], task["index"])] = prompt
    assert seen[("section", 0)] == ("a house <lora:tiny-lora-a:0.7> <lora:tiny-lora-b:0.5:1>")
    assert seen[("axis", 0)] == "a house <lora:tiny-lora-a:0>"     # the axis won: written so
    assert seen[("axis", 1)] == "a house <lora:tiny-lora-a:0.9>"
    assert seen[("tagged", 0)] == "a house, <lora:tiny-lora-b:0.4>"  # as written, untouched
