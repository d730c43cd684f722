"""The A1111 infotext (exact format, round trip) and metadata embedded in png/webp/jpg."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import piexif
import piexif.helper
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from render import metadata
from render.metadata import infotext, parse_infotext, provenance, read_metadata, save_image
from render.tasks import FileRef, Task

VERSION = "render 0.1.0"


def make_task(**kw: object) -> Task:
    base: dict[str, object] = dict(
        job="demo", index=0, prompt="a cabin", negative="lowres", seed=1, model="sd15",
        width=512, height=512, steps=25, cfg=7.0, sampler="DPM++ 2M", schedule="Karras",
    )
    base.update(kw)
    task = Task(**base)  # type: ignore[arg-type]
    return dataclasses.replace(task, id=task.compute_id())


def text_of(task: Task, **kw: object) -> str:
    args: dict[str, object] = dict(model_name="name", model_hash="0123456789", version=VERSION)
    args.update(kw)
    return infotext(task, **args)  # type: ignore[arg-type]


# -- the exact format --------------------------------------------------------------------------
def test_basic_infotext_is_a1111_byte_for_byte() -> None:
    assert text_of(make_task()) == (
        "a cabin\n"
        "Negative prompt: lowres\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        "Size: 512x512, Model hash: 0123456789, Model: name, Version: render 0.1.0"
    )


def test_no_negative_line_when_empty_and_automatic_schedule_is_written() -> None:
    text = text_of(make_task(negative="", schedule="Automatic", sampler="Euler a", cfg=7.5))
    assert text == (
        "a cabin\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, "
        "Size: 512x512, Model hash: 0123456789, Model: name, Version: render 0.1.0"
    )


def test_field_order_of_img2img_with_vae_clip_skip_and_plugin_fields() -> None:
    task = make_task(image="/refs/x.png", strength=0.6, clip_skip=2, width=768, height=512)
    text = text_of(task, vae_name="vae-ft-mse", vae_hash="735e4c3a44",
                   extra={"Lora hashes": "add_detail: 7c6b2a1f3e9d", "Hires steps": "10"})
    assert text.splitlines()[-1] == (
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        "Size: 768x512, Model hash: 0123456789, Model: name, VAE hash: 735e4c3a44, "
        "VAE: vae-ft-mse, Denoising strength: 0.6, Clip skip: 2, "
        'Lora hashes: "add_detail: 7c6b2a1f3e9d", Hires steps: 10, Version: render 0.1.0'
    )


def test_strength_only_for_img2img_and_inpaint() -> None:
    assert "Denoising strength" not in text_of(make_task(strength=0.6))
    inpaint = make_task(image="/x.png", mask="/m.png", strength=1.0)
    assert "Denoising strength: 1," in text_of(inpaint)
    assert "Clip skip" not in text_of(make_task(clip_skip=1))


def test_a_plugin_denoising_strength_takes_a1111s_fixed_place() -> None:
    # A hires pass reports its strength; A1111 puts it before Clip skip, not with the extras.
    text = text_of(make_task(clip_skip=2), extra={"Hires upscale": "2",
                                                  "Denoising strength": "0.4"})
    assert "Model: name, Denoising strength: 0.4, Clip skip: 2, Hires upscale: 2, Version" in text


def test_quoting_follows_a1111() -> None:
    text = text_of(make_task(), model_name='my, "odd": model',
                   extra={"Pre quoted": '"a: 1, b: 2"', "Plain": "x y", "Multi": "a\nb"})
    last = text.splitlines()[-1]
    assert 'Model: "my, \\"odd\\": model"' in last
    assert 'Pre quoted: "a: 1, b: 2"' in last           # a plugin's quoted value is kept
    assert "Plain: x y," in last
    assert 'Multi: "a\\nb"' in last
    assert len(text.splitlines()) == 3                    # values never add lines


def test_bare_key_when_value_equals_key_and_none_drops_a_field() -> None:
    text = text_of(make_task(), extra={"NGMS": "NGMS", "Gone": None})  # type: ignore[dict-item]
    assert ", NGMS, Version" in text and "Gone" not in text


def test_bad_field_names_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be read back"):
        text_of(make_task(), extra={"a:b": "1"})


# -- parsing ----------------------------------------------------------------------------------
def test_parse_real_a1111_infotext() -> None:
    text = (
        "masterpiece, (cabin:1.2), <lora:add_detail:0.6>\nsecond line\n"
        "Negative prompt: lowres, bad hands\nmore negative\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3001968073, "
        "Size: 512x768, Model hash: b513c6287d, Model: realism_engine, Denoising strength: 0.7, "
        'Lora hashes: "add_detail: 7c6b2a1f3e9d, film: 0123", Hires upscale: 2, '
        'Wildcard prompt: "a \\"quoted\\" __season__, cabin", Version: v1.10.1'
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt == "masterpiece, (cabin:1.2), <lora:add_detail:0.6>\nsecond line"
    assert negative == "lowres, bad hands\nmore negative"
    assert params["Lora hashes"] == "add_detail: 7c6b2a1f3e9d, film: 0123"
    assert params["Wildcard prompt"] == 'a "quoted" __season__, cabin'
    assert params["Size"] == "512x768" and params["Version"] == "v1.10.1"
    assert list(params)[:3] == ["Steps", "Sampler", "Schedule type"]


def test_parse_without_params_line_is_all_prompt() -> None:
    assert parse_infotext("just a prompt\nNegative prompt: neg") == ("just a prompt", "neg", {})


prompt_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=80,
)
value_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompt_text, negative=prompt_text, extra=st.dictionaries(
    st.sampled_from(["Lora hashes", "TI hashes", "Hires upscaler", "ControlNet 0", "Note"]),
    value_text, max_size=4))
def test_round_trip_any_prompt(prompt: str, negative: str, extra: dict[str, str]) -> None:
    # What the format cannot carry (A1111's writer strips the text; a prompt line starting
    # with "Negative prompt:" reads as the negative), as for every A1111 reader.
    if prompt != prompt.lstrip() or any(
        line.startswith("Negative prompt:") for line in prompt.split("\n")
    ):
        return
    extra = {k: v for k, v in extra.items() if v != k and not metadata._is_json_string(v)}
    task = make_task(prompt=prompt, negative=negative)
    text = text_of(task, extra=extra, model_name="m, x: \"y\"")
    got_prompt, got_negative, params = parse_infotext(text)
    assert (got_prompt, got_negative) == (prompt, negative)
    for key, value in extra.items():
        assert params[key] == value
    assert params["Model"] == 'm, x: "y"'
    assert params["CFG scale"] == "7" and params["Seed"] == "1"


@pytest.mark.parametrize("prompt", [
    "a cabin", "", "multi\nline\n\nprompt", 'quotes "inside", and: colons',
    "unicode: 雪の小屋 ✓ émoji 🏔️", "trailing spaces ,  ", "(cozy:1.2), [a|b], {x|y}",
    "Steps: 3, Sampler: x, Seed: 4", "tab\tseparated", "line with \\ backslash",
])
def test_round_trip_examples(prompt: str) -> None:
    task = make_task(prompt=prompt, negative=prompt[::-1])
    assert parse_infotext(text_of(task))[:2] == (prompt, prompt[::-1])


# -- files ------------------------------------------------------------------------------------
def full_task(prompt: str, negative: str) -> Task:
    ref = FileRef(kind="checkpoint", name="sd15", path="/models/sd15.safetensors",
                  sha256="ab" * 32, short_hash="ababababab", family="sd1")
    return make_task(prompt=prompt, negative=negative, template="a __season__ cabin",
                     picks=("winter",), axes={"cfg": 7.0, "lora.add_detail": 0.5},
                     sections={"lora": {"add_detail": 0.5}}, files={"model": ref})


def prov_of(task: Task, text: str) -> dict:
    return provenance(task, versions={"render": "0.1.0", "torch": "2.15"},
                      device="cpu", timings={"render": 1.25}, infotext=text)


PROMPTS = [
    ("a cabin", "lowres"),
    ('"quoted", with: colons\nand a second line', "neg \"q\"\nline 2"),
    ("雪の小屋, ✓ Ünïcödé 🏔️", "ぼやけた"),
]


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
@pytest.mark.parametrize(("prompt", "negative"), PROMPTS)
def test_metadata_round_trip_through_files(tmp_path: Path, fmt: str, prompt: str,
                                           negative: str) -> None:
    task = full_task(prompt, negative)
    text = text_of(task)
    prov = prov_of(task, text)
    path = tmp_path / f"x.{fmt}"
    save_image(Image.new("RGBA", (32, 24), (200, 10, 10, 255)), path, fmt, prov)
    got_text, got_prov = read_metadata(path)
    assert got_text == text
    assert got_prov == json.loads(json.dumps(prov))
    assert parse_infotext(got_text)[:2] == (prompt, negative)
    # everything needed to re-render is there
    t = got_prov["task"]
    assert t["id"] == task.id and t["template"] == "a __season__ cabin"
    assert t["picks"] == ["winter"] and t["lora"] == {"add_detail": 0.5}
    assert t["files"]["model"]["sha256"] == "ab" * 32
    assert got_prov["sections"] == ["lora"] and got_prov["kind"] == "txt2img"


def _png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()[8:]
    chunks = []
    while data:
        length, kind = struct.unpack(">I4s", data[:8])
        chunks.append((kind, data[8:8 + length]))
        data = data[12 + length:]
    return chunks


def test_png_chunk_types_as_a1111(tmp_path: Path) -> None:
    latin = tmp_path / "latin.png"
    text = text_of(make_task(prompt="café"))
    save_image(Image.new("RGB", (8, 8)), latin, "png", prov_of(make_task(), text))
    kinds = {body.split(b"\0", 1)[0]: kind for kind, body in _png_chunks(latin)
             if kind in (b"tEXt", b"iTXt", b"zTXt")}
    assert kinds == {b"parameters": b"tEXt", b"render": b"iTXt"}

    wide = tmp_path / "wide.png"
    text = text_of(make_task(prompt="雪"))
    save_image(Image.new("RGB", (8, 8)), wide, "png", prov_of(make_task(), text))
    kinds = {body.split(b"\0", 1)[0]: kind for kind, body in _png_chunks(wide)
             if kind in (b"tEXt", b"iTXt", b"zTXt")}
    assert kinds == {b"parameters": b"iTXt", b"render": b"iTXt"}


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_exif_user_comment_is_unicode_prefixed_as_a1111_reads_it(tmp_path: Path,
                                                                 fmt: str) -> None:
    text = text_of(make_task(prompt="雪の小屋, \"q\""))
    path = tmp_path / f"x.{fmt}"
    save_image(Image.new("RGB", (8, 8)), path, fmt, prov_of(make_task(), text))
    with Image.open(path) as im:
        exif = piexif.load(im.info["exif"])
    raw = exif["Exif"][piexif.ExifIFD.UserComment]
    assert raw.startswith(b"UNICODE\0")
    assert piexif.helper.UserComment.load(raw) == text


def test_large_provenance_in_jpeg_is_compressed(tmp_path: Path) -> None:
    task = make_task(sections={"notes": {"text": "x" * 90_000}})
    text = text_of(task)
    path = tmp_path / "big.jpg"
    save_image(Image.new("RGB", (8, 8)), path, "jpg", prov_of(task, text))
    got_text, got_prov = read_metadata(path)
    assert got_text == text and got_prov is not None
    assert got_prov["task"]["notes"]["text"] == "x" * 90_000


def test_too_long_infotext_for_jpeg_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use png or webp"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.jpg", "jpg", {"infotext": "x" * 40000})


def test_xml_special_characters_in_provenance(tmp_path: Path) -> None:
    task = make_task(prompt="<b>&amp; </render:provenance> 'x'")
    text = text_of(task)
    path = tmp_path / "x.webp"
    save_image(Image.new("RGB", (8, 8)), path, "webp", prov_of(task, text))
    assert read_metadata(path)[1]["task"]["prompt"] == task.prompt  # type: ignore[index]


def test_read_metadata_of_a_plain_image(tmp_path: Path) -> None:
    for fmt in ("png", "jpeg", "webp"):
        path = tmp_path / f"plain.{fmt}"
        Image.new("RGB", (8, 8)).save(path)
        assert read_metadata(path) == (None, None)


def test_save_image_needs_the_infotext(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="infotext"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png", "png", {"task": {}})
