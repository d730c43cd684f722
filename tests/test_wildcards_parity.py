"""Parity with sd-dynamic-prompts, measured against the ``dynamicprompts`` library itself.

Every template of tests/fixtures/wildcard_parity/corpus.yaml is expanded in combinatorial mode
by ``render.wildcards`` and by ``dynamicprompts`` (0.31) over the same wildcard folder, and the
sets of prompts compared. ``same`` entries must agree; ``ours`` entries are deliberate
differences (each with its reason, listed in the README); ``todo`` entries are where this
project is still wrong or incomplete: they are strict xfails, so a fix shows up as a failure
until its entry moves to ``same`` or ``ours``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from render import wildcards

HERE = Path(__file__).parent / "fixtures" / "wildcard_parity"
CORPUS = yaml.safe_load((HERE / "corpus.yaml").read_text(encoding="utf-8"))
WILDCARDS = HERE / "wildcards"


def ours(template: str) -> set[str] | str:
    """This project's prompts, or its error's first words."""
    try:
        return {e.text for e in wildcards.combinations(template, wildcards.Library([WILDCARDS]))}
    except wildcards.WildcardError as exc:
        return f"error: {exc}"


def theirs(template: str) -> set[str] | str:
    """dynamicprompts' prompts (its warnings and log lines silenced), or its exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dynamicprompts.generators import CombinatorialPromptGenerator
        from dynamicprompts.wildcards import WildcardManager

        logging.getLogger("dynamicprompts").setLevel(logging.CRITICAL)
        generator = CombinatorialPromptGenerator(WildcardManager(WILDCARDS))
        try:
            return {str(p) for p in generator.generate(template, max_prompts=10_000)}
        except Exception as exc:   # its parser's errors have no common base class
            return f"error: {type(exc).__name__}: {exc}"


def _params() -> list[Any]:
    params = []
    for entry in CORPUS:
        marks = []
        if entry["v"] == "todo":
            marks.append(pytest.mark.xfail(strict=True, reason=entry["why"]))
        params.append(pytest.param(entry, id=f"{entry['v']}:{entry['t']}", marks=marks))
    return params


@pytest.mark.parametrize("entry", _params())
def test_parity_with_dynamicprompts(entry: dict[str, Any]) -> None:
    template, verdict = entry["t"], entry["v"]
    mine, reference = ours(template), theirs(template)
    if verdict == "same":
        assert mine == reference
    elif verdict == "ours":
        assert mine != reference, "no longer a difference: make it `same`"
        if "want" in entry:
            assert mine == set(entry["want"])
        else:
            assert isinstance(mine, str) and mine.startswith("error: ")
    else:   # todo: the documented semantics (or dynamicprompts' output) is the target
        assert mine == (set(entry["want"]) if "want" in entry else reference)


def test_the_corpus_says_why_for_every_difference() -> None:
    for entry in CORPUS:
        assert entry["v"] in ("same", "ours", "todo"), entry
        assert entry["v"] == "same" or entry.get("why"), entry
    assert len({entry["t"] for entry in CORPUS}) == len(CORPUS), "a template listed twice"
