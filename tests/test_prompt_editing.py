"""A1111 prompt editing and alternation: the schedule parser (pure Python), validation, and
the step switch on a tiny SDXL pipeline (the engine-level renders are in test_engine.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from render.prompts import (
    has_prompt_editing,
    parse_attention,
    prompt_problem,
    prompt_schedule,
    step_texts,
)

S = 1 / 1.1


def schedule(text: str, steps: int = 10, hires_steps: int | None = None) -> list[list[Any]]:
    return [list(entry) for entry in prompt_schedule(text, steps, hires_steps=hires_steps)]


ALTERNATING = [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"],
               [7, "a"], [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]


# A1111's doctests of get_learned_conditioning_prompt_schedules (modules/prompt_parser.py),
# 10 steps unless the third value says a hires pass of that many steps follows.
@pytest.mark.parametrize(("text", "hires", "expected"), [
    ("test", None, [[10, "test"]]),
    ("a [b:3]", None, [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", None, [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", None, [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", None, [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", None, [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", None, [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", None, [[10, "a [unbalanced"]]),
    ("a [b:.5] c", None, [[5, "a  c"], [10, "a b c"]]),
    # The doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] and is marked "not handling this
    # right now": A1111's grammar (lark 1.1.2, as it pins) cannot place a '|' outside
    # [a|b], gives up, and renders the prompt unedited. We do what A1111 renders.
    ("a [{b|d{:.5] c", None, [[10, "a [{b|d{:.5] c"]]),
    ("((a][:b:c [d:3]", None, [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", None, ALTERNATING),
    ("[fe|]male", None, [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", None, [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
    ("a [b:.5] c", 10, [[10, "a b c"]]),
    ("a [b:1.5] c", 10, [[5, "a  c"], [10, "a b c"]]),
])
def test_a1111_doctest_schedules(text: str, hires: int | None, expected: list[Any]) -> None:
    assert schedule(text, 10, hires) == expected


@pytest.mark.parametrize(("text", "steps", "expected"), [
    # when: a number with a '.' is a fraction of the steps, one without a step number
    ("[cat:dog:0.5]", 30, [[15, "cat"], [30, "dog"]]),
    ("[cat:dog:10]", 30, [[10, "cat"], [30, "dog"]]),
    ("[cat:dog:99]", 30, [[30, "cat"]]),          # past the end: never switches
    ("[cat:dog:1.5]", 10, [[10, "cat"]]),         # 1.5 of the steps, also past the end
    ("[cat:dog:1.0]", 10, [[10, "cat"]]),
    ("[cat:dog:1]", 10, [[1, "cat"], [10, "dog"]]),
    ("[cat:dog:0]", 10, [[10, "dog"]]),           # from the start: 'to' only
    ("[cat:dog:0.05]", 10, [[10, "dog"]]),        # int(0.5) = 0
    ("[cat:dog:-3]", 10, [[10, "dog"]]),
    ("[cat:dog:2e1]", 30, [[20, "cat"], [30, "dog"]]),
    ("[cat:dog:1e999]", 10, [[10, "cat"]]),
    ("[cat:dog: 3 ]", 10, [[3, "cat"], [10, "dog"]]),
    ("[cat::3]", 10, [[3, "cat"], [10, ""]]),
    ("[:dog:3]", 10, [[3, ""], [10, "dog"]]),
    ("[ in foreground::0.6][: in background:0.25]", 100,
     [[25, " in foreground"], [60, " in foreground in background"], [100, " in background"]]),
    # nesting, alternation inside an edit and the other way round
    ("[a|[b:c:0.5]]", 4, [[1, "a"], [2, "b"], [3, "a"], [4, "c"]]),
    ("[[a|b]:c:2]", 4, [[1, "a"], [2, "b"], [3, "c"], [4, "c"]]),
    ("[a|b|c]", 4, [[1, "a"], [2, "b"], [3, "c"], [4, "a"]]),
    ("[|x]", 2, [[1, ""], [2, "x"]]),
    # weights, BREAK, embeddings and escapes ride along as text
    ("[(cat:1.3) BREAK mat:dog:2]", 4, [[2, "(cat:1.3) BREAK mat"], [4, "dog"]]),
    ("[tiny-emb:cat:2] house", 4, [[2, "tiny-emb house"], [4, "cat house"]]),
    (r"\[cat:dog:2\]", 4, [[4, r"\[cat:dog:2\]"]]),
    # square brackets holding anything else stay text (then de-emphasis)
    ("[artist: foo]", 10, [[10, "[artist: foo]"]]),
    ("[a:b]", 10, [[10, "[a:b]"]]),
    ("[a:(b:1.2)]", 10, [[10, "[a:(b:1.2)]"]]),
    ("[a:b:c:3]", 10, [[10, "[a:b:c:3]"]]),
    ("[cat:dog:2x]", 10, [[10, "[cat:dog:2x]"]]),
    ("time: 5pm", 10, [[10, "time: 5pm"]]),
    # A1111 gives up on a '|' outside [a|b] (or a lone backslash): nothing is edited
    ("a [cat:dog:2] | b", 10, [[10, "a [cat:dog:2] | b"]]),
    ("[cat|dog", 10, [[10, "[cat|dog"]]),
    ("(a|b) [c:2]", 10, [[10, "(a|b) [c:2]"]]),
    ("[c:2] a\\", 10, [[10, "[c:2] a\\"]]),
    ("", 10, [[10, ""]]),
])
def test_schedules(text: str, steps: int, expected: list[Any]) -> None:
    assert schedule(text, steps) == expected


def test_step_texts_count_from_zero_like_a1111s_sampler() -> None:
    # A1111's CFG denoiser starts at step 0 and takes the first entry with step <= until:
    # [a:b:2] is 'a' for steps 0, 1 and 2; alternation repeats its first option once
    assert step_texts("[a:b:2]", 4) == ["a", "a", "a", "b"]
    assert step_texts("[a|b]", 5) == ["a", "a", "b", "a", "b"]
    assert step_texts("[a:b:0.5]", 4) == ["a", "a", "a", "b"]
    assert step_texts("[a:b:0.5]", 8) == ["a"] * 5 + ["b"] * 3
    assert step_texts("[a:b:99]", 3) == ["a"] * 3
    assert step_texts("plain", 2) == ["plain", "plain"]
    assert step_texts("[a:b:0.5]", 0) == ["b"]  # no steps: what step 1 would take


@pytest.mark.parametrize(("text", "expected"), [
    ("[artist: foo]", [("artist: foo", S)]),
    ("[a:b]", [("a:b", S)]),
    ("[a:(b:1.2)]", [("a:", S), ("b", 1.2 * S)]),
    ("[a|b] | c", [("a|b", S), (" | c", 1.0)]),  # A1111 gave up on editing this prompt
    ("[a BREAK b]", [("a", S), ("BREAK", float("-inf")), ("b", S)]),
])
def test_brackets_that_are_not_edits_are_de_emphasis(text: str, expected: list[Any]) -> None:
    assert not has_prompt_editing(text)
    assert prompt_schedule(text, 3) == [(3, text)]
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_has_prompt_editing() -> None:
    for text in ("[a:b:1]", "[a:1]", "[a::1]", "[a|b]", "x [[a|b]] y", "([a:b:2])"):
        assert has_prompt_editing(text), text
    for text in ("[a:b]", "[a]", "a | b", "[a|b] | c", r"\[a:b:1\]", "(a:1.2)"):
        assert not has_prompt_editing(text), text


@pytest.mark.parametrize(("text", "problem"), [
    ("cats AND dogs", "AND"),
    ("[cats AND dogs:birds:0.5]", "AND"),
    ("a [(b:1.2.3):c:2]", "not a number"),
    ("a [c:(b:1.2.3):2]", "not a number"),
    ("[x|(cat:1.2.3)]", "not a number"),
])
def test_prompt_problem_finds_what_the_encoder_refuses(text: str, problem: str) -> None:
    found = prompt_problem(text)
    assert found is not None and problem in found
    if problem == "AND":
        assert "composition" in found
        with pytest.raises(ValueError, match="composition"):
            parse_attention(text)


@pytest.mark.parametrize("text", [
    "[cat:dog:0.5]", "[a|b]", "a (cat:1.3) BREAK [dog::2]", "cat:1.5", "16:9",
    "a <lora:x:0.6> [b:c:0.5]", "[a:b]", "sand AND_x, android", "",
])
def test_prompt_problem_accepts_what_renders(text: str) -> None:
    assert prompt_problem(text) is None


@given(st.text(alphabet="ab :[]()|\\.13", max_size=40), st.integers(0, 12))
def test_schedule_never_crashes_and_ends_at_the_steps(text: str, steps: int) -> None:
    entries = prompt_schedule(text, steps)
    ends = [end for end, _ in entries]
    assert ends == sorted(set(ends)) and ends[-1] == steps
    assert len(step_texts(text, steps)) == max(steps, 1)


@given(st.text(alphabet="ab :|()[]\\.1", max_size=30))
def test_escaped_brackets_are_never_edits(text: str) -> None:
    escaped = "".join("\\" + c if c in "\\()[]" else c for c in text)
    if "|" not in text:
        assert prompt_schedule(escaped, 5) == [(5, escaped)]


def test_deep_nesting_is_text_not_a_crash() -> None:
    text = "[" * 3000 + "a:b:1" + "]" * 3000
    assert prompt_schedule(text, 4)[-1][0] == 4
    assert prompt_problem("(" * 3000 + "a") is None


def test_module_imports_without_torch() -> None:
    code = ("import sys, render.prompts, render.expand; "
            "render.prompts.prompt_schedule('[a:b:1]', 3); "
            "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# the step switch itself, on the kit's SDXL pipeline (pooled embeddings switch too)
# --------------------------------------------------------------------------------------------


def test_sdxl_switch_gives_each_task_its_steps_embeddings(kit: Path, one_thread: None) -> None:
    import torch

    from render.prompts import encode_prompts, encode_schedules
    from render.testing import tiny_pipeline

    pipe = tiny_pipeline(kit, "tiny-sdxl")
    prompts, negatives = ["a [cat:dog:1]", "a [red|blue] house"], ["ugly", "[ugly:bad:2]"]
    scheduled = encode_schedules(pipe, prompts, negatives, steps=4)
    assert scheduled.texts[0] == (["a cat"] * 2 + ["a dog"] * 2, ["ugly"] * 4)
    assert scheduled.texts[1] == (["a red house"] * 2 + ["a blue house", "a red house"],
                                  ["ugly"] * 3 + ["bad"])
    assert scheduled.tensor_inputs == ["prompt_embeds", "add_text_embeds"]

    def plain(step: int) -> dict[str, Any]:
        return encode_prompts(pipe, [t[0][step] for t in scheduled.texts],
                              [t[1][step] for t in scheduled.texts])

    first = plain(0)
    assert all(torch.equal(scheduled.kwargs[k], first[k]) for k in first)
    held = {"prompt_embeds": torch.cat([first["negative_prompt_embeds"],
                                        first["prompt_embeds"]]).half(),
            "add_text_embeds": torch.cat([first["negative_pooled_prompt_embeds"],
                                          first["pooled_prompt_embeds"]])}
    pipe._guidance_scale = 7.0
    assert scheduled.callback is not None
    assert scheduled.callback(pipe, 0, None, held) == {}  # step 1 is as step 0
    for step in (1, 2):
        out = scheduled.callback(pipe, step, None, held)
        expected = plain(step + 1)
        assert out["prompt_embeds"].dtype == torch.float16  # as the pipeline holds them
        assert torch.equal(out["prompt_embeds"], torch.cat([
            expected["negative_prompt_embeds"], expected["prompt_embeds"]]).half())
        assert torch.equal(out["add_text_embeds"], torch.cat([
            expected["negative_pooled_prompt_embeds"], expected["pooled_prompt_embeds"]]))
    assert scheduled.callback(pipe, 3, None, held) == {}  # the last step: nothing after it
    pipe._guidance_scale = 1.0  # no classifier-free guidance: the prompts alone
    out = scheduled.callback(pipe, 1, None, held)
    assert torch.equal(out["add_text_embeds"], plain(2)["pooled_prompt_embeds"])
    # a negative empty at every step is SDXL's zeros, as a plain empty negative; one empty at
    # some steps only is encoded (A1111 zeroes a negative only when all its texts are empty)
    zeros = encode_schedules(pipe, ["a [cat|dog]"], ["[ugly::0]"], steps=3)
    assert not zeros.kwargs["negative_prompt_embeds"].any()
    later = encode_schedules(pipe, ["a cat"], ["[:ugly:1]"], steps=3)
    assert later.texts[0][1] == ["", "", "ugly"]
    assert later.kwargs["negative_prompt_embeds"].any()


def test_unswitched_schedule_is_exactly_the_plain_encoding(kit: Path, one_thread: None) -> None:
    import torch

    from render.prompts import encode_prompts, encode_schedules
    from render.testing import tiny_pipeline

    pipe = tiny_pipeline(kit, "tiny-sd15")
    scheduled = encode_schedules(pipe, ["a [cat:dog:99]", "[x:a (dog:1.2):0]"], ["", "[a|a]"],
                                 steps=5)
    assert scheduled.callback is None and scheduled.tensor_inputs == []
    plain = encode_prompts(pipe, ["a cat", "a (dog:1.2)"], ["", "a"])
    assert all(torch.equal(scheduled.kwargs[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="not supported by encode_prompts"):
        encode_prompts(pipe, ["a [cat:dog:99]"], [""])
