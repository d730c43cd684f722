"""The hypernetwork plugin (plugins/hypernetwork.py), through the real code paths on the kit.

Job files go through ``render.expand`` (validation, grid axes, ``expand_task``) and
``render.run.resolve_tasks`` (preflight with the real ``ModelResolver``); renders go through
``render.engine`` (which strips ``<hypernet:...>`` tags and calls ``configure_pipeline`` and
``task_inputs``); one test runs the CLI and reads the infotext back from the PNGs. The
hypernetwork files are written by ``render.testing.write_hypernetwork`` (A1111's layout).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from render import expand
from render import testing as tk
from render.errors import FieldError, JobErrors
from render.plan import make_batches
from render.run import resolve_tasks
from render.tasks import Batch, Result, Task

HEAD = """\
version: 1
model_dirs: [{dirs}]
models:
  tiny-hn: {{source: tiny-hn.pt, allow_pickle: true}}
  evil: {{source: evil.pt, allow_pickle: true}}
output: {{dir: "out/{{job}}"}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 3, cfg: 5, sampler: Euler, seed: 1,
           prompt: "a house"}}
jobs:
"""


@pytest.fixture(scope="module")
def hn(plugins: Any) -> Any:
    """The plugin module as loaded (by file path, like a user's plugin)."""
    return plugins.pm.get_plugin("hypernetwork")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, kit: Path) -> Path:
    """A models folder (A1111/ComfyUI ``hypernetworks/``) with the test's files."""
    import torch

    root = tmp_path_factory.mktemp("hn") / "models"
    folder = root / "hypernetworks"
    tk.write_hypernetwork(folder / "tiny-hn.pt")                       # A1111's pickle
    tk.write_hypernetwork(folder / "tiny-hn-st.safetensors")           # the same, flattened
    tk.write_hypernetwork(folder / "tiny-hn-b.safetensors", seed=1, activation_func="relu",
                          layer_norm=True, layer_structure=(1, 1.5, 1))
    tk.write_hypernetwork(folder / "tiny-hn-xl.safetensors", widths=(80,))
    (folder / "not-a-hn.safetensors").write_bytes(
        (kit / "loras" / "tiny-lora-a.safetensors").read_bytes())

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - what pickle calls
            return (os.system, (f"echo pwned > {root / 'pwned'}",))

    torch.save({32: ({}, {}), "name": Evil()}, folder / "evil.pt")
    return root


@pytest.fixture
def job(write_job: Any, models: Path, kit: Path) -> Any:
    def make(entries: str) -> Path:
        return write_job(HEAD.format(dirs=f"{models}, {kit}") + entries)

    return make


def resolve(path: Path, plugins: Any) -> list[Task]:
    """Load, expand (plugins included) and preflight a job file, as ``render`` does."""
    return resolve_tasks(expand.load_job_file(path, plugins).jobs, plugins)


def by_job(tasks: list[Task]) -> dict[str, Task]:
    return {t.job: t for t in tasks}


def errors(path: Path, plugins: Any) -> list[str]:
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    return str(info.value).splitlines()


# -- the section and the inline tags ------------------------------------------------------------

def test_section_forms(hn: Any) -> None:
    assert hn.validate_section(None) == ()
    assert hn.validate_section("anime") == (("anime", 1.0),)
    assert hn.validate_section({"z": 1, "a": -0.5}) == (("a", -0.5), ("z", 1.0))  # by name
    assert hn.validate_section([{"z": 1}, "a"]) == (("z", 1.0), ("a", 1.0))     # as written


@pytest.mark.parametrize(("value", "message", "subkey"), [
    (3, "expected a mapping of hypernetwork name -> strength, e.g. {anime_style: 0.7}, or a "
     "list of them in the order they apply, got 3", ""),
    ([{"a": 1, "b": 1}], "expected a hypernetwork name or {name: strength}, got a mapping", "0"),
    ([{"a": 1}, {"a": 2}], "hypernetwork 'a' is named twice", "1.a"),
    ({"a": "strong"}, "expected a hypernetwork strength, got 'strong'", "a"),
    ({"a:b": 1}, "a hypernetwork name cannot contain :: 'a:b'", "a:b"),
    ({"a_v1": {"5": 1}}, "expected a strength, got a mapping (a hypernetwork name containing "
     "'.' cannot be a dotted grid axis: vary the whole 'hypernetwork' section instead)", "a_v1"),
])
def test_section_errors_name_the_subkey(hn: Any, value: Any, message: str, subkey: str) -> None:
    with pytest.raises(FieldError) as info:
        hn.validate_section(value)
    assert (info.value.message, info.value.subkey) == (message, subkey)


@pytest.mark.parametrize(("body", "expected"), [
    ("x", ("x", 1.0)), ("x:0.7", ("x", 0.7)), (" my style : -1 ", ("my style", -1.0))])
def test_parse_tag(hn: Any, body: str, expected: tuple[str, float]) -> None:
    assert hn.parse_tag(body) == expected


@pytest.mark.parametrize(("body", "reason"), [
    ("", "the tag has no hypernetwork name"), ("x:strong", "'strong' is not a strength"),
    ("x:1:2", "expected <hypernet:name> or <hypernet:name:strength>")])
def test_parse_tag_errors(hn: Any, body: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        hn.parse_tag(body)
    assert str(info.value) == reason


def test_tags_merge_into_the_section_in_application_order(job: Any, plugins: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: section
            hypernetwork: {tiny-hn: 0.7}
          - name: inline
            prompt: "a house <hypernet:tiny-hn:0.7>"
          - name: both
            prompt: "a house <hypernet:tiny-hn-b:0.2> <HYPERNET:tiny-hn:0.5>"
            hypernetwork: [{tiny-hn-st: 1}, {tiny-hn: 0.3}]
          - name: default
            prompt: "<hypernet:tiny-hn> a house"
    """), plugins))
    assert tasks["inline"].sections["hypernetwork"] == tasks["section"].sections["hypernetwork"]
    # the tags first, in prompt order, their strength winning; then the section's others
    assert tasks["both"].sections["hypernetwork"] == (
        ("tiny-hn-b", 0.2), ("tiny-hn", 0.5), ("tiny-hn-st", 1.0))
    assert tasks["default"].sections["hypernetwork"] == (("tiny-hn", 1.0),)
    assert tasks["inline"].prompt == "a house <hypernet:tiny-hn:0.7>"   # kept as written
    axis = resolve(job("""\
          - name: axis
            prompt: "a house <hypernet:tiny-hn:0.8>"
            grid: {hypernetwork.tiny-hn: [0, 1]}
    """), plugins)
    assert [t.sections["hypernetwork"] for t in axis] == [(("tiny-hn", 0.0),), (("tiny-hn", 1.0),)]


def test_group_key_is_the_ordered_active_stack(job: Any, plugins: Any, hn: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: none
          - name: zero
            hypernetwork: {tiny-hn: 0}
          - name: ab
            hypernetwork: {tiny-hn-b: 0.5, tiny-hn: 1}
          - name: ab_tagged
            prompt: "a house <hypernet:tiny-hn:1><hypernet:tiny-hn-b:0.5>"
          - name: ba
            hypernetwork: [{tiny-hn-b: 0.5}, tiny-hn]
    """), plugins))
    assert hn.group_key(tasks["none"]) is None
    assert hn.group_key(tasks["zero"]) is None          # strength 0 is not applied at all
    assert hn.group_key(tasks["ab"]) == hn.group_key(tasks["ab_tagged"])
    assert hn.group_key(tasks["ab"]) != hn.group_key(tasks["ba"])   # order matters
    assert tasks["ab"].id != tasks["ba"].id
    batches = make_batches(list(tasks.values()), plugins.pm.hook, 0)
    assert sorted(len(b.tasks) for b in batches) == [1, 2, 2]


# -- preflight ------------------------------------------------------------------------------------

def test_missing_name_and_bad_tags_are_located_errors(job: Any, plugins: Any) -> None:
    path = job("""\
          - name: missing
            hypernetwork: {tiny-hm: 1}
          - name: badtag
            prompt: "a house <hypernet:tiny-hn:strong>"
          - name: twice
            prompt: "a house <hypernet:tiny-hn:1> <hypernet:tiny-hn:0.5>"
    """)
    lines = errors(path, plugins)
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:11:37: jobs[0].hypernetwork.tiny-hm: hypernetwork "
                               "'tiny-hm' not found")
    assert "hypernetworks" in lines[0] and "did you mean 'tiny-hn'" in lines[0]
    assert lines[1].startswith(f"{path}:13:21: ")
    assert lines[1].endswith("jobs[1].prompt: prompt: bad tag '<hypernet:tiny-hn:strong>': "
                             "'strong' is not a strength")
    assert lines[2].endswith("hypernetwork 'tiny-hn' is tagged twice (A1111 would apply it "
                             "twice); tag it once")


def test_a_pickle_needs_allow_pickle_on_its_alias(job: Any, plugins: Any) -> None:
    (line,) = errors(job("""\
          - name: unaliased
            hypernetwork: {tiny-hn.pt: 1}
    """), plugins)
    assert "jobs[0].hypernetwork.tiny-hn.pt: hypernetwork 'tiny-hn.pt'" in line
    assert "is a pickle (.pt)" in line and "allow_pickle: true" in line


def test_a_pickle_that_would_run_code_is_refused_unrun(job: Any, plugins: Any,
                                                       models: Path) -> None:
    (line,) = errors(job("""\
          - name: evil
            hypernetwork: {evil: 1}
    """), plugins)
    assert "jobs[0].hypernetwork.evil: hypernetwork 'evil' (evil.pt): " in line
    system = f"{os.system.__module__}.system"            # posix.system
    assert f"torch's weights-only unpickler refused it (Trying to load unsupported GLOBAL " \
           f"{system} whose module" in line and "): loading it would run code" in line
    assert not (models / "pwned").exists()        # and it never ran


def test_other_bases_and_other_files_are_refused(job: Any, plugins: Any) -> None:
    lines = errors(job("""\
          - name: sd1_on_xl
            model: tiny-sdxl
            prompt: "a house <hypernet:tiny-hn:1>"
          - name: xl_on_sd1
            hypernetwork: {tiny-hn-xl: 1}
          - name: lora
            hypernetwork: {not-a-hn: 1}
    """), plugins)
    assert lines[0].endswith(                             # the tag is what named it
        "jobs[0].prompt: hypernetwork 'tiny-hn' (tiny-hn.pt) has modules for "
        "32-wide contexts, but model 'tiny-sdxl' (SDXL) cross-attends to 80-wide text: it is "
        "made for another base model")
    assert lines[1].endswith(
        "hypernetwork 'tiny-hn-xl' (tiny-hn-xl.safetensors) has modules for 80-wide contexts, "
        "but model 'tiny-sd15' (SD 1.x) cross-attends to 32-wide text: it is made for another "
        "base model")
    assert "hypernetwork 'not-a-hn' (not-a-hn.safetensors): it is not a hypernetwork (a " \
           "tensor 'lora_te_" in lines[2]


def shapes(*layers: tuple[int, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    out = {}
    for index, shape in layers:
        out[f"linear.{index}.weight"] = shape
        out[f"linear.{index}.bias"] = shape[:1]
    return out


def test_structure_from_shapes_and_metadata(hn: Any) -> None:
    a1111 = shapes((0, (16, 8)), (2, (16,)), (3, (8, 16)), (4, (8,)))   # relu at 1
    info = hn.hypernet_info({8: (a1111, a1111)}, {
        "layer_structure": [1, 2, 1], "activation_func": "swish", "is_layer_norm": True})
    assert [(layer.kind, layer.index) for layer in info.layers[8]] == [
        ("linear", 0), ("norm", 2), ("linear", 3), ("norm", 4)]
    assert (info.activation, info.activate_output) == ("Hardswish", True)   # A1111's reading
    nai = {"linear1.weight": (16, 8), "linear1.bias": (16,), "linear2.weight": (8, 16),
           "linear2.bias": (8,)}                                    # the oldest names
    assert [layer.index for layer in hn.hypernet_info({8: (nai, nai)}, {}).layers[8]] == [0, 1]

    def problem(modules: dict[int, Any], metadata: dict[str, Any]) -> str:
        with pytest.raises(FieldError) as info:
            hn.hypernet_info(modules, metadata)
        return info.value.message

    plain = shapes((0, (16, 8)), (1, (8, 16)))
    assert problem({8: (plain, plain)}, {"layer_structure": [1, 3, 1]}) == (
        "its layer_structure [1, 3, 1] does not match its 8-wide layers (8 -> 16 -> 8)")
    assert problem({8: (plain, plain)}, {"is_layer_norm": True}) == (
        "its metadata says is_layer_norm=True, but its 8-wide modules have no layer norms")
    assert problem({8: (plain, plain)}, {"activation_func": "prelu"}).startswith(
        "its activation function 'prelu' is not one A1111 has that render supports")
    assert problem({8: (plain, shapes((0, (8, 8))))}, {}) == (
        "its 8-wide modules for keys and values differ in shape")
    assert problem({8: (shapes((0, (16, 8))), shapes((0, (16, 8))))}, {}).endswith(
        "ends with 16 features; a hypernetwork module gives back its input's 8")
    assert problem({}, {"step": 3}) == (
        "it is not a hypernetwork (no modules keyed by context width; keys: step)")


def test_modules_compute_a1111s_forward(hn: Any, models: Path) -> None:
    """The built module, against the file's tensors applied by hand in A1111's order."""
    import torch
    import torch.nn.functional as F

    from render.api import FileRef, load_state_dict

    path = models / "hypernetworks" / "tiny-hn-b.safetensors"
    ref = FileRef("hypernetwork", "b", str(path), sha256="b" * 64)
    k_module, v_module = hn.built_modules(ref, torch.device("cpu"), torch.float32)[32]
    state = load_state_dict(path, allow_pickle=False)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    for part, module in ((0, k_module), (1, v_module)):
        w = {k.split(".", 2)[2]: t for k, t in state.items() if k.startswith(f"32.{part}.")}
        h = F.relu(F.linear(x, w["linear.0.weight"], w["linear.0.bias"]))      # Linear, act
        h = F.layer_norm(h, (48,), w["linear.2.weight"], w["linear.2.bias"])   # then norm
        h = F.linear(h, w["linear.3.weight"], w["linear.3.bias"])              # last Linear
        h = F.layer_norm(h, (32,), w["linear.4.weight"], w["linear.4.bias"])   # no act
        assert torch.allclose(module(x), h, atol=1e-6)
    assert not torch.allclose(k_module(x), v_module(x))


def test_keys_and_values_read_their_own_transformed_context(
        hn: Any, plugins: Any, job: Any, kit: Path) -> None:
    """One cross-attention layer, against attention computed by hand from the formula."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    (task,) = resolve(job("- {name: one, hypernetwork: {tiny-hn-b: 0.6}}\n"), plugins)
    pipe = tk.tiny_pipeline(kit, "tiny-sd15")
    plugins.pm.hook.configure_pipeline(pipe=pipe, batch=Batch((), (task,)))
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hk, hv = hn.built_modules(task.files["hypernetwork:tiny-hn-b"], pipe.unet.device,
                              pipe.unet.dtype)[32]
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 16, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=text)

        def heads(t: Any) -> Any:
            return t.view(1, -1, attn.heads, 32 // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(x))
        k = heads(attn.to_k(text + hk(text) * 0.6))
        v = heads(attn.to_v(text + hv(text) * 0.6))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, 32)
        want = attn.to_out[0](out)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, attn.processor.hypernetwork_wrapped(attn, x, text))


# -- rendering ------------------------------------------------------------------------------------

def render_one(engine: Any, task: Task) -> np.ndarray:
    """One task in its own call, in the order the test says."""
    (result,) = engine.render(Batch(("test",), (task,)))
    return np.asarray(result.images[0], dtype=np.int16)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_strengths_stacks_and_restoring_through_the_engine(
        job: Any, plugins: Any, engine: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: base
          - name: zero
            hypernetwork: {tiny-hn: 0}
          - name: half
            hypernetwork: {tiny-hn: 0.5}
          - name: full
            hypernetwork: {tiny-hn: 1}
          - name: section
            hypernetwork: {tiny-hn: 0.7}
          - name: inline
            prompt: "a house <hypernet:tiny-hn:0.7>"
          - name: safetensors
            hypernetwork: {tiny-hn-st: 1}
          - name: ab
            hypernetwork: {tiny-hn: 1, tiny-hn-b: 1}
          - name: ba
            hypernetwork: [tiny-hn-b, tiny-hn]
    """), plugins))
    order = ["base", "full", "zero", "half", "section", "inline", "base", "safetensors", "ab",
             "ba", "full"]
    px: dict[str, list[np.ndarray]] = {}
    for name in order:
        px.setdefault(name, []).append(render_one(engine, tasks[name]))
    base, full = px["base"][0], px["full"][0]

    assert np.array_equal(px["zero"][0], base)            # strength 0: the model's pixels
    assert np.array_equal(px["base"][1], base)            # originals restored after a stack
    assert np.array_equal(px["full"][1], full)            # and the stack back on
    assert diff(full, base) > 5 and diff(px["half"][0], base) > 5
    assert diff(px["half"][0], full) > 2                  # the strength matters
    assert np.array_equal(px["inline"][0], px["section"][0])   # a tag is a section entry
    assert np.array_equal(px["safetensors"][0], full)     # both formats, same tensors
    assert diff(px["ab"][0], full) > 2 and diff(px["ab"][0], px["ba"][0]) > 1   # order counts
    # a batch of two tasks with one stack: one call, the same images as alone
    both = engine.render(Batch(("test",), (tasks["section"], tasks["inline"])))
    for result in both:
        image = np.asarray(result.images[0], dtype=np.int16)
        assert np.abs(image - px["section"][0]).max() <= 1


def test_strength_zero_is_bit_exact_and_slicing_cannot_drop_the_stack(
        job: Any, plugins: Any, kit: Path) -> None:
    """Float output of the pipeline itself; then the engine's out-of-memory fallback
    (attention slicing replaces every processor) between configure and the call."""
    import torch

    torch.set_num_threads(1)
    tasks = by_job(resolve(job("""\
          - name: base
          - name: zero
            hypernetwork: {tiny-hn: 0, tiny-hn-b: 0}
          - name: full
            hypernetwork: {tiny-hn: 1}
    """), plugins))
    pipe = tk.tiny_pipeline(kit, "tiny-sd15")
    originals = dict(pipe.unet.attn_processors)
    hook = plugins.pm.hook

    def run(name: str) -> np.ndarray:
        hook.configure_pipeline(pipe=pipe, batch=Batch((), (tasks[name],)))
        hook.task_inputs(task=tasks[name], pipe=pipe)
        return tk.tiny_render(pipe, "a house", seed=1, steps=3)

    base = run("base")
    full = run("full")
    assert tk.pixel_diff(full, base) > 5
    assert np.array_equal(run("zero"), base)
    assert all(p is originals[n] for n, p in pipe.unet.attn_processors.items())
    hook.configure_pipeline(pipe=pipe, batch=Batch((), (tasks["full"],)))
    pipe.enable_attention_slicing()                       # what the engine does on OOM
    assert not wrapped(pipe)
    assert hook.task_inputs(task=tasks["full"], pipe=pipe) == []   # no inputs, but ...
    assert wrapped(pipe)                                  # ... the stack is on again
    sliced = tk.tiny_render(pipe, "a house", seed=1, steps=3)
    assert np.abs(sliced - full).max() < 0.5              # (sliced attention: float noise)
    assert np.abs(run("base") - base).max() < 0.5 and not wrapped(pipe)


def wrapped(pipe: Any) -> bool:
    """Whether any attention layer of the UNet has the hypernetwork processor."""
    return any(hasattr(p, "hypernetwork_wrapped") for p in pipe.unet.attn_processors.values())


# -- infotext -------------------------------------------------------------------------------------

def legacy_hash(path: Path) -> str:
    """Old A1111's model hash, computed here independently."""
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def test_infotext_fields(job: Any, plugins: Any, hn: Any, models: Path) -> None:
    tasks = by_job(resolve(job("""\
          - name: section
            hypernetwork: {tiny-hn: 0.7}
          - name: tagged
            prompt: "a house <hypernet:tiny-hn:0.7>"
          - name: mixed
            prompt: "a house <hypernet:tiny-hn:0.7>"
            hypernetwork: {tiny-hn-b: 0, tiny-hn-st: 1}
          - name: plain
    """), plugins))
    pt_hash = legacy_hash(models / "hypernetworks" / "tiny-hn.pt")
    assert hn.result_metadata(task=tasks["section"], result=Result(tasks["section"], [])) == {
        "Hypernet": "tiny-hn", "Hypernet hash": pt_hash, "Hypernet strength": "0.7"}
    # the prompt's tag says it already: A1111 appends a tag for Hypernet: when pasting
    assert hn.result_metadata(task=tasks["tagged"], result=None) is None
    st = tasks["mixed"].files["hypernetwork:tiny-hn-st"]
    assert hn.result_metadata(task=tasks["mixed"], result=None) == {
        "Hypernet": "tiny-hn-st", "Hypernet hash": st.extra["a1111_hash"],
        "Hypernet strength": "1"}
    assert hn.result_metadata(task=tasks["plain"], result=None) is None
    ref = tasks["section"].files["hypernetwork:tiny-hn"]
    full = hashlib.sha256((models / "hypernetworks" / "tiny-hn.pt").read_bytes()).hexdigest()
    assert (ref.sha256, ref.kind, ref.extra["widths"]) == (full, "hypernetwork", [32])


def test_cli_writes_the_infotext(job: Any, tmp_path: Path, models: Path) -> None:
    from PIL import Image

    from render.cli import main

    path = job("""\
          - name: e2e
            hypernetwork: {tiny-hn: 0.7}
    """)
    assert main([str(path), "--quiet", "--device", "cpu"]) == 0
    (png,) = (tmp_path / "out" / "e2e").glob("*.png")
    text = Image.open(png).info["parameters"]
    assert text.startswith("a house\n")
    pt_hash = legacy_hash(models / "hypernetworks" / "tiny-hn.pt")
    assert f"Hypernet: tiny-hn, Hypernet hash: {pt_hash}, Hypernet strength: 0.7" in text


def test_a_pasted_infotext_rebuilds_the_stack_in_order(job: Any, plugins: Any, hn: Any) -> None:
    """Untagged entries but the last become tags in the infotext prompt; the last is the
    Hypernet fields, which A1111 appends as a tag on paste: the order comes back as rendered."""
    tasks = by_job(resolve(job("""\
          - name: stack
            prompt: "a house <hypernet:tiny-hn-b:0.2>"
            hypernetwork: [{tiny-hn-st: 1}, {tiny-hn: 0.3}]
    """), plugins))
    task = tasks["stack"]
    prompt = hn.infotext_prompt(task=task, prompt=task.prompt)
    assert prompt == "a house <hypernet:tiny-hn-b:0.2> <hypernet:tiny-hn-st:1>"
    fields = hn.result_metadata(task=task, result=None)
    pasted = f"{prompt} <hypernet:{fields['Hypernet']}:{fields['Hypernet strength']}>"
    order = [(m.group(2).split(":")[0], float(m.group(2).split(":")[1]))
             for m in re.finditer(r"<(\w+):([^>]+)>", pasted)]
    assert order == [(e.name, e.strength) for e in hn.active_stack(task)]
