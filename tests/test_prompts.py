"""A1111 prompt syntax: the pure parser, chunking, and encoding on tiny real pipelines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from render.prompts import (
    BREAK,
    chunk_tokens,
    has_prompt_editing,
    parse_attention,
    prompt_schedule,
)

# --------------------------------------------------------------------------------------------
# tiny pipelines (local until render.testing lands; random weights, real code paths)
# --------------------------------------------------------------------------------------------


def write_clip_tokenizer(folder: Path) -> Path:
    """Write SD's CLIP BPE vocab/merges (offline, from the table open_clip ships)."""
    from render.clip_vocab import write_vocab_files

    write_vocab_files(folder)
    return folder


def _text_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        **extra,
    )


def _realistic_final_norm(text_encoder: Any) -> None:
    """Give the final LayerNorm a non-zero bias as trained CLIP has: with bias 0 the chunk
    mean that A1111's weighting restores is ~0 and the rescale would be meaningless."""
    import torch

    inner = getattr(text_encoder, "text_model", text_encoder)
    with torch.no_grad():
        inner.final_layer_norm.bias.normal_(0.2, 0.1)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4,
        sample_size=64,
    )


def tiny_sd15(tokenizer_dir: Path) -> Any:
    """SD1.5-shaped StableDiffusionPipeline with random weights (VAE factor 8, 77 tokens)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    text_encoder = CLIPTextModel(_text_config(pad_token_id=49407))
    _realistic_final_norm(text_encoder)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tokenizer_dir: Path) -> Any:
    """SDXL-shaped pipeline: two text encoders (pooled from the second), text_time embeds."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=(2, 4), norm_num_groups=32, sample_size=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(pad_token_id=49407, projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(pad_token_id=0, projection_dim=32)),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(
            tokenizer_dir, model_max_length=77, pad_token="!"
        ),
        scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def sd15(tokenizer_dir: Path) -> Any:
    import torch

    torch.set_num_threads(1)
    return tiny_sd15(tokenizer_dir)


@pytest.fixture(scope="module")
def sdxl(tokenizer_dir: Path) -> Any:
    import torch

    torch.set_num_threads(1)
    return tiny_sdxl(tokenizer_dir)


def render(pipe: Any, seed: int = 1, **kwargs: Any) -> Any:
    import torch

    return pipe(
        num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images


# --------------------------------------------------------------------------------------------
# parser (pure Python)
# --------------------------------------------------------------------------------------------

R = 1.1
S = 1 / 1.1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("", [("", 1.0)]),
        ("(cat)", [("cat", R)]),
        ("[cat]", [("cat", S)]),
        ("((cat))", [("cat", R * R)]),
        ("[[cat]]", [("cat", S * S)]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("(cat: 1.3 )", [("cat", 1.3)]),
        ("(cat:.5)", [("cat", 0.5)]),
        ("(cat:-1)", [("cat", -1.0)]),
        ("(cat:+2)", [("cat", 2.0)]),
        ("(cat:0)", [("cat", 0.0)]),
        ("a (b) c", [("a ", 1.0), ("b", R), (" c", 1.0)]),
        ("a (b:1.5) (c:1.5)", [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1.5)]),
        ("(a (b) c:2)", [("a ", 2.0), ("b", R * 2), (" c", 2.0)]),
        ("((a:1.5))", [("a", 1.5 * R)]),
        ("[(a:2)]", [("a", 2 * S)]),
        ("(a [b] c:1.5) d", [("a ", 1.5), ("b", S * 1.5), (" c", 1.5), (" d", 1.0)]),
        # merging equal-weight neighbours
        ("(a)(b)", [("ab", R)]),
        ("a (b:1.0) c", [("a b c", 1.0)]),
        ("(x:1.0)", [("x", 1.0)]),
        ("a [] () b", [("a   b", 1.0)]),
        # escapes
        (r"\(cat\)", [("(cat)", 1.0)]),
        (r"\[cat\]", [("[cat]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"(\(cat\):1.2)", [("(cat)", 1.2)]),
        (r"\(cat:1.2\)", [("(cat:1.2)", 1.0)]),
        (r"a \n b", [("a n b", 1.0)]),  # a lone backslash is dropped, as in A1111
        # unbalanced brackets, as A1111
        ("(cat", [("cat", R)]),
        ("a (b (c", [("a ", 1.0), ("b ", R), ("c", R * R)]),
        ("[cat", [("cat", S)]),
        ("a (b [c", [("a ", 1.0), ("b ", R), ("c", R * S)]),
        ("cat)", [("cat)", 1.0)]),
        ("cat]", [("cat]", 1.0)]),
        ("a ) b ] c", [("a ) b ] c", 1.0)]),
        ("cat:1.2)", [("cat:1.2)", 1.0)]),
        ("(a [b) c]", [("a ", R), ("b", R * S), (" c", S)]),
        # colons that are not weights stay literal text
        ("time: 5pm", [("time: 5pm", 1.0)]),
        ("(a:b)", [("a:b", R)]),
        ("(a:1e-3)", [("a:1e-3", R)]),
        ("(a:1.2 b)", [("a:1.2 b", R)]),
        # BREAK
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a BREAK b BREAK c", [("a", 1.0), BREAK, ("b", 1.0), BREAK, ("c", 1.0)]),
        ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
        ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        ("BREAK a", [BREAK, ("a", 1.0)]),
        ("a BREAK", [("a", 1.0), BREAK]),
        ("a break b", [("a break b", 1.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        ("a_BREAK", [("a_BREAK", 1.0)]),
        ("fish and chips", [("fish and chips", 1.0)]),
    ],
)
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weights_multiply_in_a1111_order() -> None:
    # bit-exact floats, so a weight is the same number A1111 computes
    assert parse_attention("((a))") == [("a", 1.1 * 1.1)]
    assert parse_attention("[[a]]") == [("a", (1 / 1.1) * (1 / 1.1))]
    assert parse_attention("((a):1.5)") == [("a", 1.1 * 1.5)]


@pytest.mark.parametrize("text", ["cats AND dogs", "(x AND y)", "a AND"])
def test_unsupported_a1111_syntax_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="does not support"):
        parse_attention(text)


@pytest.mark.parametrize(
    "text", ["[cat:dog:0.5]", "[cat:0.5]", "[cat::0.5]", "[cat|dog]", "a [b|c|d] e", "([a:b:3])"]
)
def test_prompt_editing_is_resolved_before_attention(text: str) -> None:
    # once refused here; now scheduled first (tests/test_prompt_editing.py), and
    # parse_attention only ever sees one step's text, free of edits
    assert has_prompt_editing(text)
    for _, step_text in prompt_schedule(text, 10):
        assert not has_prompt_editing(step_text)
        parse_attention(step_text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\[cat:dog:0.5\]", [("[cat:dog:0.5]", 1.0)]),
        ("[a (b:1.2)]", [("a ", S), ("b", 1.2 * S)]),
        ("[a, (b:c)]", [("a, ", S), ("b:c", R * S)]),
        ("[a: unclosed", [("a: unclosed", S)]),
        ("a | b", [("a | b", 1.0)]),
    ],
)
def test_brackets_that_are_not_prompt_editing(text: str, expected: list[Any]) -> None:
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_bad_weight_number() -> None:
    with pytest.raises(ValueError, match="not a number"):
        parse_attention("(cat:1.2.3)")
    with pytest.raises(ValueError, match="not a number"):
        parse_attention("(cat:.)")


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "\\()[]" else c for c in text)


@given(st.text(alphabet="ab ,:|()[]\\.1", max_size=30))
def test_escaped_text_is_literal(text: str) -> None:
    assert parse_attention(_escape(text)) == [(text, 1.0)]


@given(st.text(alphabet="ab ,:()[]\\.12BREAK", max_size=40))
def test_parser_never_crashes(text: str) -> None:
    try:
        parts = parse_attention(text)
    except ValueError:
        return
    assert parts
    for (a, wa), (b, wb) in zip(parts, parts[1:], strict=False):
        assert (a, wa) == BREAK or (b, wb) == BREAK or wa != wb  # neighbours merged
    for fragment, weight in parts:
        assert (fragment, weight) == BREAK or fragment or parts == [("", 1.0)]
        assert weight > 0 or (fragment, weight) == BREAK


def test_module_imports_without_torch() -> None:
    code = (
        "import sys, render.prompts, render.samplers; "
        "assert not {'torch', 'diffusers', 'compel', 'transformers'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# chunking (pure Python)
# --------------------------------------------------------------------------------------------

COMMA = 9


def test_chunks_short_prompt_is_one_chunk() -> None:
    assert chunk_tokens([([1, 2, 3], 1.0)]) == [([1, 2, 3], [1.0] * 3)]
    assert chunk_tokens([]) == [([], [])]


def test_chunks_split_at_75_without_comma() -> None:
    chunks = chunk_tokens([(list(range(100, 180)), 1.5)], comma_id=COMMA)
    assert [len(c[0]) for c in chunks] == [75, 5]
    assert chunks[0][0] == list(range(100, 175))
    assert chunks[1][1] == [1.5] * 5


def test_chunks_move_words_after_a_late_comma() -> None:
    tokens = [1] * 60 + [COMMA] + [2] * 20  # comma at index 60: 15 tokens from the end
    chunks = chunk_tokens([(tokens, 1.0)], comma_id=COMMA)
    assert chunks[0][0] == [1] * 60 + [COMMA]
    assert chunks[1][0] == [2] * 20


def test_chunks_keep_an_early_comma() -> None:
    tokens = [1] * 50 + [COMMA] + [2] * 30  # comma 25 tokens from the end: beyond 20
    chunks = chunk_tokens([(tokens, 1.0)], comma_id=COMMA)
    assert [len(c[0]) for c in chunks] == [75, 6]


def test_chunks_break() -> None:
    assert chunk_tokens([([1], 1.0), None, ([2], 2.0)]) == [([1], [1.0]), ([2], [2.0])]
    assert chunk_tokens([([1], 1.0), None]) == [([1], [1.0])]
    assert chunk_tokens([None, ([1], 1.0)]) == [([], []), ([1], [1.0])]
    assert chunk_tokens([([1], 1.0), None, None, ([2], 1.0)]) == [
        ([1], [1.0]), ([], []), ([2], [1.0])
    ]


def test_chunks_keep_weights_with_their_tokens() -> None:
    chunks = chunk_tokens([([1] * 70, 1.0), ([COMMA], 1.0), ([2] * 10, 1.3)], comma_id=COMMA)
    assert chunks[0] == ([1] * 70 + [COMMA], [1.0] * 71)
    assert chunks[1] == ([2] * 10, [1.3] * 10)


# --------------------------------------------------------------------------------------------
# encoding on a tiny SD1.5 pipeline
# --------------------------------------------------------------------------------------------


def _reference(pipe: Any, prompt: str, negative: str, **kwargs: Any) -> tuple[Any, Any]:
    return pipe.encode_prompt(prompt, "cpu", 1, True, negative, **kwargs)


def test_plain_prompt_equals_pipeline_encoding(sd15: Any) -> None:
    import torch

    from render.prompts import encode_prompts

    prompt, negative = "a photo of a cat, highly detailed", "lowres, blurry"
    ref, neg_ref = _reference(sd15, prompt, negative)
    for written in (prompt, "a photo of a (cat:1.0), highly detailed",
                    "a photo of a [(cat)], highly detailed"):
        got = encode_prompts(sd15, [written], [negative])
        assert set(got) == {"prompt_embeds", "negative_prompt_embeds"}
        assert torch.equal(got["prompt_embeds"], ref)
        assert torch.equal(got["negative_prompt_embeds"], neg_ref)


def test_weight_one_gives_the_pipelines_image(sd15: Any) -> None:
    import numpy as np

    from render.prompts import encode_prompts

    plain = render(sd15, prompt="a cat on a mat", negative_prompt="ugly")
    ours = render(sd15, **encode_prompts(sd15, ["a (cat:1.0) on a mat"], ["(ugly:1.0)"]))
    np.testing.assert_array_equal(plain, ours)


def test_weighted_prompt_differs(sd15: Any) -> None:
    import numpy as np
    import torch

    from render.prompts import encode_prompts

    plain = encode_prompts(sd15, ["a cat on a mat"], [""])
    for written in ("a (cat:1.4) on a mat", "a (cat) on a mat", "a [cat] on a mat"):
        weighted = encode_prompts(sd15, [written], [""])
        assert not torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"]), written
        assert torch.equal(weighted["negative_prompt_embeds"], plain["negative_prompt_embeds"])
    image_plain = render(sd15, **plain)
    image_weighted = render(sd15, **encode_prompts(sd15, ["a (cat:1.6) on a mat"], [""]))
    assert not np.array_equal(image_plain, image_weighted)


def test_weighting_keeps_the_chunk_mean(sd15: Any) -> None:
    from render.prompts import encode_prompts

    plain = encode_prompts(sd15, ["a cat on a mat"], [""])["prompt_embeds"]
    weighted = encode_prompts(sd15, ["a (cat:1.5) on a (mat:0.5)"], [""])["prompt_embeds"]
    assert float(weighted.mean()) == pytest.approx(float(plain.mean()), rel=1e-4)


def test_emphasis_restores_the_mean_unless_it_is_zero() -> None:
    import torch

    from render.prompts import _emphasis

    weights = [1.0, 1.5, 0.5, 1.0]
    scale = torch.tensor(weights).reshape(1, -1, 1)
    z = torch.randn(1, 4, 8) + 0.3
    out = _emphasis(z, weights)
    assert float(out.mean()) == pytest.approx(float(z.mean()), rel=1e-5)
    assert torch.allclose(out, z * scale * (z.mean() / (z * scale).mean()))
    centred = z - z.mean(dim=-1, keepdim=True)  # LayerNorm without bias: mean ~0
    assert torch.equal(_emphasis(centred, weights), centred * scale)


def test_long_prompt_is_chunked_not_truncated(sd15: Any) -> None:
    import numpy as np

    from render.prompts import encode_prompts

    head = " ".join(["cat"] * 78)
    a, b = head + " dog", head + " fox"  # differ only past token 75
    ea = encode_prompts(sd15, [a], ["ugly"])
    eb = encode_prompts(sd15, [b], ["ugly"])
    assert ea["prompt_embeds"].shape == (1, 154, 32)
    assert ea["negative_prompt_embeds"].shape == (1, 154, 32)  # padded to the same length
    assert not np.array_equal(render(sd15, **ea), render(sd15, **eb))
    # diffusers itself truncates: the same two prompts give one image
    np.testing.assert_array_equal(render(sd15, prompt=a), render(sd15, prompt=b))


def test_chunks_are_encoded_separately(sd15: Any) -> None:
    import torch

    from render.prompts import encode_prompts

    both = encode_prompts(sd15, ["a cat BREAK a dog"], [""])
    cat = encode_prompts(sd15, ["a cat"], [""])
    dog = encode_prompts(sd15, ["a dog"], [""])
    assert both["prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(both["prompt_embeds"][:, :77], cat["prompt_embeds"])
    assert torch.equal(both["prompt_embeds"][:, 77:], dog["prompt_embeds"])
    # the negative is padded with an empty-prompt chunk
    empty = cat["negative_prompt_embeds"]
    assert torch.equal(both["negative_prompt_embeds"][:, :77], empty)
    assert torch.equal(both["negative_prompt_embeds"][:, 77:], empty)


def test_break_changes_the_image(sd15: Any) -> None:
    import numpy as np

    from render.prompts import encode_prompts

    one = render(sd15, **encode_prompts(sd15, ["a cat, a dog"], [""]))
    two = render(sd15, **encode_prompts(sd15, ["a cat, BREAK a dog"], [""]))
    assert not np.array_equal(one, two)


def test_batch_rows_do_not_depend_on_neighbours(sd15: Any) -> None:
    import torch

    from render.prompts import encode_prompts

    alone = encode_prompts(sd15, ["a (cat:1.3)"], ["(ugly:1.2)"])
    batch = encode_prompts(sd15, ["a (cat:1.3)", "a [dog] (on grass:1.5)"], ["(ugly:1.2)", ""])
    assert batch["prompt_embeds"].shape == (2, 77, 32)
    assert torch.equal(batch["prompt_embeds"][:1], alone["prompt_embeds"])
    assert torch.equal(batch["negative_prompt_embeds"][:1], alone["negative_prompt_embeds"])


def test_clip_skip(sd15: Any) -> None:
    import torch

    from render.prompts import encode_prompts

    prompt = "a photo of a cat"
    default = encode_prompts(sd15, [prompt], [""])["prompt_embeds"]
    assert torch.equal(encode_prompts(sd15, [prompt], [""], clip_skip=1)["prompt_embeds"], default)
    skip2 = encode_prompts(sd15, [prompt], [""], clip_skip=2)["prompt_embeds"]
    # A1111's clip skip 2: penultimate layer through the final LayerNorm (diffusers' clip_skip=1,
    # which diffusers 0.42 cannot run on transformers 5: it reaches for text_encoder.text_model)
    ids = sd15.tokenizer(
        prompt, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = sd15.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd15.text_encoder.final_layer_norm(hidden)
    assert torch.equal(skip2, expected)
    assert not torch.equal(skip2, default)
    with pytest.raises(ValueError, match="exceeds"):
        encode_prompts(sd15, [prompt], [""], clip_skip=3)  # the tiny encoder has 2 layers
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="clip_skip"):
            encode_prompts(sd15, [prompt], [""], clip_skip=bad)  # type: ignore[arg-type]


def test_textual_inversion_tokens_survive(tokenizer_dir: Path) -> None:
    import torch

    from render.prompts import encode_prompts

    pipe = tiny_sd15(tokenizer_dir)  # its own copy: loading an embedding changes the tokenizer
    torch.manual_seed(3)
    pipe.load_textual_inversion({"<tiny-emb>": torch.randn(2, 32)}, token="<tiny-emb>")
    assert "<tiny-emb>_1" in pipe.tokenizer.added_tokens_encoder  # a two-vector embedding
    prompt = "a <tiny-emb> cat"
    ref, _ = _reference(pipe, prompt, "")
    got = encode_prompts(pipe, [prompt], [""])["prompt_embeds"]
    assert torch.equal(got, ref)
    without = encode_prompts(pipe, ["a cat"], [""])["prompt_embeds"]
    assert not torch.equal(got, without)
    weighted = encode_prompts(pipe, ["a (<tiny-emb>:1.3) cat"], [""])["prompt_embeds"]
    assert not torch.equal(weighted, got)


def test_encode_errors(sd15: Any) -> None:
    from render.prompts import encode_prompts

    with pytest.raises(ValueError, match="negative"):
        encode_prompts(sd15, ["a", "b"], [""])
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts(sd15, [], [])
    with pytest.raises(ValueError, match="lora"):
        encode_prompts(sd15, ["a cat <lora:add_detail:0.6>"], [""])
    with pytest.raises(ValueError, match="not supported"):
        encode_prompts(sd15, ["[cat:dog:0.5]"], [""])


def test_other_text_encoders_are_refused(sd15: Any) -> None:
    from types import SimpleNamespace

    from render.prompts import encode_prompts

    # Flux/SD3-like: a second encoder that is not SDXL's projecting CLIP
    odd = SimpleNamespace(tokenizer=sd15.tokenizer, text_encoder=sd15.text_encoder,
                          tokenizer_2=sd15.tokenizer, text_encoder_2=sd15.text_encoder)
    with pytest.raises(ValueError, match="SD1.x, SD2.x and SDXL"):
        encode_prompts(odd, ["a cat"], [""])


# --------------------------------------------------------------------------------------------
# encoding on a tiny SDXL pipeline
# --------------------------------------------------------------------------------------------

SDXL_KEYS = {
    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
}


def _same(got: dict[str, Any], ref: tuple[Any, ...]) -> bool:
    import torch

    order = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds"]
    return all(torch.equal(got[k], r) for k, r in zip(order, ref, strict=True))


def test_sdxl_plain_prompt_equals_pipeline(sdxl: Any) -> None:
    from render.prompts import encode_prompts

    got = encode_prompts(sdxl, ["a photo of a (cat:1.0)"], ["lowres"])
    assert set(got) == SDXL_KEYS
    assert got["prompt_embeds"].shape == (1, 77, 64)  # 32 + 32 from the two encoders
    assert got["pooled_prompt_embeds"].shape == (1, 32)
    ref = sdxl.encode_prompt("a photo of a cat", device="cpu", negative_prompt="lowres")
    assert _same(got, ref)


def test_sdxl_empty_negative_is_zeros(sdxl: Any) -> None:
    import torch

    from render.prompts import encode_prompts

    got = encode_prompts(sdxl, ["a cat BREAK a dog"], [""])
    assert got["negative_prompt_embeds"].shape == (1, 154, 64)
    assert not got["negative_prompt_embeds"].any()
    assert not got["negative_pooled_prompt_embeds"].any()
    ref = sdxl.encode_prompt("a cat", device="cpu", negative_prompt=None)  # diffusers: zeros
    assert _same(encode_prompts(sdxl, ["a cat"], [""]), ref)
    assert torch.equal(got["pooled_prompt_embeds"], ref[2])  # pooled from the first chunk


def test_sdxl_weights_long_prompts_and_render(sdxl: Any) -> None:
    import numpy as np
    import torch

    from render.prompts import encode_prompts

    plain = encode_prompts(sdxl, ["a cat on a mat"], ["ugly"])
    weighted = encode_prompts(sdxl, ["a (cat:1.5) on a mat"], ["ugly"])
    assert not torch.equal(plain["prompt_embeds"], weighted["prompt_embeds"])
    # A1111 leaves the pooled embedding unweighted
    assert torch.equal(plain["pooled_prompt_embeds"], weighted["pooled_prompt_embeds"])
    head = " ".join(["cat"] * 78)
    long_a = encode_prompts(sdxl, [head + " dog"], ["ugly"])
    long_b = encode_prompts(sdxl, [head + " fox"], ["ugly"])
    assert long_a["prompt_embeds"].shape == (1, 154, 64)
    assert long_a["negative_prompt_embeds"].shape == (1, 154, 64)
    image_a = render(sdxl, **long_a)
    assert image_a.shape == (1, 64, 64, 3) and np.isfinite(image_a).all()
    assert not np.array_equal(image_a, render(sdxl, **long_b))
    np.testing.assert_array_equal(
        render(sdxl, prompt="a cat on a mat", negative_prompt="ugly"), render(sdxl, **plain)
    )


def test_sdxl_clip_skip_two_is_the_native_layer(sdxl: Any) -> None:
    import torch

    from render.prompts import encode_prompts

    one = encode_prompts(sdxl, ["a cat"], ["ugly"], clip_skip=1)
    two = encode_prompts(sdxl, ["a cat"], ["ugly"], clip_skip=2)
    assert torch.equal(one["prompt_embeds"], two["prompt_embeds"])
