"""Tests for render.wildcards: exact expansions, exact counts, errors, determinism."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from render.wildcards import (
    COUNT_LIMIT,
    MAX_DEPTH,
    MAX_NESTING,
    Expansion,
    Library,
    Literal,
    Option,
    Seq,
    Variant,
    Wildcard,
    WildcardError,
    combinations,
    count,
    longest,
    parse,
    sample,
)

REPO = Path(__file__).resolve().parents[1]

FILES = {
    "seasons.txt": "# the four seasons\nsummer\n  autumn  \n\nwinter\nspring\nsummer\n",
    "colors/warm.txt": "red\norange\n",
    "colors/cold.txt": "blue\n{teal|cyan}\n",
    "nested.txt": "a __seasons__ day\n__colors/warm__ sky\n",
    "deep/er/name.txt": "bottom\n",
    "empty.txt": "# nothing here\n\n   \n",
    "void/one.txt": "",
    "void/two.yaml": "two: []\n",
    "animals.yaml": textwrap.dedent("""\
        animals:
          mammals: [cat, dog]
          birds:
            - owl
            - "3::crow"
            - {text: wren, weight: 0}
        pets: hamster
        years:
          - 1984
          - 1.50
          - yes
        """),
    "styles.json": json.dumps({"styles": {"paint": ["oil", "watercolor"]}, "moods": ["calm"]}),
    "sub/items.yml": "- hat\n- scarf\n",
    "loop/a.txt": "x\n__loop/b__\n",
    "loop/b.txt": "__loop/a__\n",
}


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    first = write(tmp_path_factory.mktemp("a") / "wildcards", FILES)
    second = write(tmp_path_factory.mktemp("b") / "wildcards",
                   {"seasons.txt": "monsoon\n", "extra.txt": "bonus\n"})
    return [first, second]


@pytest.fixture(scope="module")
def lib(dirs: list[Path]) -> Library:
    return Library(dirs)


def texts(template: str, library: Library) -> list[str]:
    return [e.text for e in combinations(template, library)]


# ---------------------------------------------------------------------------------- exact


EXPECTED: list[tuple[str, list[str]]] = [
    ("plain text", ["plain text"]),
    ("", [""]),
    ("{a|b|c}", ["a", "b", "c"]),
    ("A {red|green|blue} {square|circle}", [
        "A red square", "A red circle", "A green square", "A green circle",
        "A blue square", "A blue circle"]),
    ("{a|{b|c}}", ["a", "b", "c"]),
    ("{{rose|white} gold|platinum} band", ["rose gold band", "white gold band",
                                           "platinum band"]),
    ("{a|}", ["a", ""]),
    ("x{|}y", ["xy", "xy"]),
    ("{}", [""]),
    ("{solo}", ["solo"]),
    # {k$$...}: orderings of k distinct options (SYNTAX.md), k = lo..hi, each in order
    ("{2$$a|b|c}", ["a, b", "a, c", "b, a", "b, c", "c, a", "c, b"]),
    ("{1-2$$a|b|c}", ["a", "b", "c", "a, b", "a, c", "b, a", "b, c", "c, a", "c, b"]),
    ("{-2$$a|b|c}", ["a", "b", "c", "a, b", "a, c", "b, a", "b, c", "c, a", "c, b"]),
    ("{3-$$a|b|c}", ["a, b, c", "a, c, b", "b, a, c", "b, c, a", "c, a, b", "c, b, a"]),
    ("{0-1$$a|b}", ["", "a", "b"]),
    ("{4$$a|b}", ["a, b", "b, a"]),
    ("{2$$ and $$a|b|c}", ["a and b", "a and c", "b and a", "b and c", "c and a",
                           "c and b"]),
    ("{2$$$$a|b}", ["ab", "ba"]),
    ("{2$$ | $$a|b}", ["a | b", "b | a"]),
    ("{2$$a|}", ["a", "a"]),
    ("{2$$a|{b|c}}", ["a, b", "a, c", "b, a", "c, a"]),
    ("{2$$a|a|b}", ["a, b", "b, a"]),      # without replacement: never "a, a"
    ("__colors/{warm|cold}__", ["red", "orange", "blue", "teal", "cyan"]),   # name variants
    ("{x|y} __colors/{warm|cold}__", ["x red", "x orange", "x blue", "x teal", "x cyan",
                                      "y red", "y orange", "y blue", "y teal", "y cyan"]),
    # variables: set for what follows; non-immediate re-expands at each use
    ("${s={a|b}}${s} and ${s}", ["a and a", "a and b", "b and a", "b and b"]),
    ("${s=!{a|b}}${s} and ${s}", ["a and a", "b and b"]),      # immediate: chosen once
    ("x ${y:def} z", ["x def z"]),
    ("${y=set}x ${y:def} z", ["x set z"]),
    ("${a={x|y}}${b=!${a}${a}}${b}/${b}", ["xx/xx", "xy/xy", "yx/yx", "yy/yy"]),
    ("${c=__colors/warm__}{1-2$$${c}|none}", [
        "red", "orange", "none", "red, none", "orange, none", "none, red", "none, orange"]),
    # the wrap command: the prompt where the wrapper's first "..." is
    ("%{beautiful ... painting$${cat|dog}}", ["beautiful cat painting", "beautiful dog painting"]),
    ("%{{oil|ink} ...$$__colors/warm__} {x|y}", [
        "oil red x", "oil red y", "oil orange x", "oil orange y",
        "ink red x", "ink red y", "ink orange x", "ink orange y"]),
    ("100% %{a...b$$}", ["100% ab"]),
    ("a}b", ["a}b"]),                      # a stray '}' is text
    ("{a|b}}", ["a}", "b}"]),
    ("{0.5::a|2::b|c}", ["a", "b", "c"]),
    ("{ a | b }x", ["a x", "b x"]),
    ("{2:: a|b}", [" a", "b"]),
    ("{ 2$$ a| b}", ["a, b", "b, a"]),
    ("{a\n|\nb}", ["a\n", "b"]),
    ("__seasons__", ["summer", "autumn", "winter", "spring"]),
    ("__seasons__ and {x|y}", [
        "summer and x", "summer and y", "autumn and x", "autumn and y",
        "winter and x", "winter and y", "spring and x", "spring and y"]),
    ("__colors/cold__", ["blue", "teal", "cyan"]),
    ("__nested__", ["a summer day", "a autumn day", "a winter day", "a spring day",
                    "red sky", "orange sky"]),
    ("__deep/er/name__", ["bottom"]),
    ("__extra__", ["bonus"]),
    ("{2$$__colors/warm__}", ["red, orange", "orange, red"]),
    ("{2$$__seasons__}", ["summer, autumn", "summer, winter", "summer, spring",
                          "autumn, summer", "autumn, winter", "autumn, spring",
                          "winter, summer", "winter, autumn", "winter, spring",
                          "spring, summer", "spring, autumn", "spring, winter"]),
    ("{1-$$ + $$__colors/cold__}", [
        "blue", "teal", "cyan", "blue + teal", "blue + cyan", "teal + blue", "cyan + blue"]),
    ("{__colors/warm__|none}", ["red", "orange", "none"]),
    # escapes
    (r"\{a|b\}", ["{a|b}"]),
    (r"{a\|b|c}", ["a|b", "c"]),
    (r"\__seasons__", ["__seasons__"]),
    (r"\_\_seasons\_\_", ["__seasons__"]),
    (r"a\b \(c\) \\{x|y}", [r"a\b \(c\) \\x", r"a\b \(c\) \\y"]),
    # things that are not wildcards
    ("snake_case_word a__ b__", ["snake_case_word a__ b__"]),
    ("__ spaced__ __x", ["__ spaced__ __x"]),
    ("50% off, $5, $$9, \\#1 fan // http://x.io", ["50% off, $5, $$9, #1 fan // http://x.io"]),
    # `#` comments (SYNTAX.md), to the end of the line, with the spaces before them
    ("a {b|c} # the rest is a comment {x|y}", ["a b", "a c"]),
    ("#a whole line\nkept {b|c}", ["\nkept b", "\nkept c"]),
    ("{a # note\n|b}", ["a\n", "b"]),
]


@pytest.mark.parametrize(("template", "expected"), EXPECTED, ids=[t for t, _ in EXPECTED])
def test_expansions_exact(template: str, expected: list[str], lib: Library) -> None:
    assert texts(template, lib) == expected
    assert count(template, lib) == len(expected)


def test_a1111_syntax_passes_through(lib: Library) -> None:
    prompt = ("masterpiece, (cozy cabin:1.2), ((snow)), [summer:winter:0.5], [cat|dog], "
              "<lora:add_detail:0.6>, <hypernet:x:1>, \\(artist\\), a AND b BREAK c, [[x]]")
    assert list(combinations(prompt, lib)) == [Expansion(prompt, ())]
    assert sample(prompt, lib, random.Random(3)) == Expansion(prompt, ())
    mixed = "(a {red|blue} cabin:1.2), [a|b], <lora:x:0.6>"
    assert texts(mixed, lib) == ["(a red cabin:1.2), [a|b], <lora:x:0.6>",
                                 "(a blue cabin:1.2), [a|b], <lora:x:0.6>"]


def test_picks_are_top_level_choices(lib: Library) -> None:
    result = list(combinations("a __colors/cold__ {x|{y|z}} cabin", lib))
    assert result[0] == Expansion("a blue x cabin", ("blue", "x"))
    assert result[-1] == Expansion("a cyan z cabin", ("cyan", "z"))
    assert {len(e.picks) for e in result} == {2}
    assert sample("{2$$a|b|c} __extra__", lib, random.Random(0)).picks[1] == "bonus"


def test_parse_tree() -> None:
    assert parse("a {2-$$; $$x|0.5::__y__} b") == Seq((
        Literal("a "),
        Variant((Option(Seq((Literal("x"),))), Option(Seq((Wildcard("y"),)), 0.5)),
                lo=2, hi=None, sep="; "),
        Literal(" b"),
    ))
    assert parse("{-3$$a}") == Seq((Variant((Option(Seq((Literal("a"),))),), 1, 3),))


# ---------------------------------------------------------------------------------- files


def test_txt_values_know_file_and_line(lib: Library, dirs: list[Path]) -> None:
    values = lib.values("seasons")
    assert [(v.text, v.line) for v in values] == [
        ("summer", 2), ("autumn", 3), ("winter", 5), ("spring", 6)]
    assert values[0].file == dirs[0] / "seasons.txt"
    assert values[1].where == f"{dirs[0] / 'seasons.txt'}:3"


def test_first_dir_wins_and_later_dirs_are_searched(lib: Library) -> None:
    assert "monsoon" not in texts("__seasons__", lib)
    assert texts("__extra__", lib) == ["bonus"]


def test_yaml_and_json_paths(lib: Library, dirs: list[Path]) -> None:
    assert texts("__animals/mammals__", lib) == ["cat", "dog"]
    assert texts("__animals/birds__", lib) == ["owl", "crow", "wren"]
    with pytest.raises(WildcardError, match="__pets__ not found"):   # `pets: hamster`:
        texts("__pets__", lib)                  # no array, ignored (SYNTAX.md, `flurp: 12345`)
    assert texts("__years__", lib) == ["1984", "1.50", "yes"]     # as written
    assert texts("__styles/paint__", lib) == ["oil", "watercolor"]
    assert texts("__moods__", lib) == ["calm"]
    assert texts("__sub/items__", lib) == ["hat", "scarf"]        # top-level list: file stem
    birds = lib.values("animals/birds")
    assert [(v.text, v.weight, v.line) for v in birds] == [
        ("owl", 1.0, 4), ("crow", 3.0, 5), ("wren", 0.0, 6)]
    assert lib.values("moods")[0].where == str(dirs[0] / "styles.json")
    assert "animals/mammals" in lib.names()
    assert "animals" not in lib.names()


def test_globs_are_unions_in_name_order(lib: Library) -> None:
    assert texts("__colors/*__", lib) == ["blue", "teal", "cyan", "red", "orange"]
    assert texts("__*/warm__", lib) == ["red", "orange"]
    assert texts("__animals/*__", lib) == ["owl", "crow", "wren", "cat", "dog"]
    assert texts("__color?/warm__", lib) == ["red", "orange"]
    assert count("{2$$__colors/*__}", lib) == 18     # values count 1, 2, 1, 1: 2! e_2 = 18


def test_duplicate_values_are_dropped(tmp_path: Path) -> None:
    write(tmp_path, {"d.txt": "a\nb\na\n", "e/x.txt": "b\nc\n"})
    library = Library([tmp_path])
    assert texts("__d__", library) == ["a", "b"]
    assert texts("__*__", library) == ["a", "b", "c"]


def test_library_is_lazy_and_caches(tmp_path: Path) -> None:
    Library([tmp_path / "does-not-exist-yet"])       # constructing reads nothing
    write(tmp_path, {"w.txt": "one\n"})
    library = Library([tmp_path])
    assert texts("__w__", library) == ["one"]
    (tmp_path / "w.txt").write_text("two\n")
    assert texts("__w__", library) == ["one"]
    assert texts("__w__", Library([tmp_path])) == ["two"]


def test_hidden_files_and_other_suffixes_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, {".hidden.txt": "x\n", ".git/y.txt": "y\n", "notes.md": "z\n",
                     "UP.TXT": "upper\n"})
    assert Library([tmp_path]).names() == ["UP"]


# ---------------------------------------------------------------------------------- errors


def test_missing_wildcard_error_is_verbatim(lib: Library, dirs: list[Path]) -> None:
    with pytest.raises(WildcardError) as info:
        count("a __season__ cabin", lib)
    assert str(info.value) == (f"wildcard __season__ not found (looked in: {dirs[0]}, "
                               f"{dirs[1]}); did you mean __seasons__?")
    assert info.value.name == "__season__"
    assert info.value.where is None


def test_a_name_not_found_is_looked_for_under_any_folder(lib: Library, dirs: list[Path]) -> None:
    assert texts("__name__", lib) == ["bottom"]         # `**/name`: deep/er/name
    assert texts("__er/name__", lib) == ["bottom"]
    with pytest.raises(WildcardError, match=r"did you mean __deep/er/name__\?$"):
        count("__deep/er/nmae__", lib)
    with pytest.raises(WildcardError) as info:
        count("__qqqqqqq__", lib)
    assert str(info.value) == f"wildcard __qqqqqqq__ not found (looked in: {dirs[0]}, {dirs[1]})"


def test_missing_dir_is_marked(tmp_path: Path) -> None:
    with pytest.raises(WildcardError) as info:
        count("__x__", Library([tmp_path / "nope"]))
    assert str(info.value) == f"wildcard __x__ not found (looked in: {tmp_path / 'nope'} (missing))"
    with pytest.raises(WildcardError) as info:
        count("__x__", Library([]))
    assert str(info.value) == ("wildcard __x__ not found (no wildcard directories are "
                               "configured)")


def test_empty_wildcard_and_empty_glob(lib: Library, dirs: list[Path]) -> None:
    with pytest.raises(WildcardError) as info:
        sample("__empty__", lib, random.Random(0))
    assert str(info.value) == f"wildcard __empty__ is empty: {dirs[0]}/empty.txt has no values"
    with pytest.raises(WildcardError) as info:
        combinations("__nothing/*__", lib)
    assert str(info.value) == (f"wildcard __nothing/*__ matches no wildcard (looked in: "
                               f"{dirs[0]}, {dirs[1]})")
    with pytest.raises(WildcardError) as info:
        count("__empt?__", lib)
    assert str(info.value) == f"wildcard __empt?__ is empty: {dirs[0]}/empty.txt has no values"
    with pytest.raises(WildcardError) as info:
        count("__void/*__", lib)
    assert str(info.value) == ("wildcard __void/*__ is empty: none of the 2 wildcards it "
                               "matches has values")
    with pytest.raises(WildcardError) as info:
        count("__void/two__", lib)
    assert str(info.value) == (f"wildcard __void/two__ is empty: {dirs[0]}/void/two.yaml (two) "
                               "has no values")


def test_error_inside_a_wildcard_file_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, {"outer.txt": "fine\nuses __ghost__\n", "broken.txt": "ok\n{a|b\n"})
    library = Library([tmp_path])
    with pytest.raises(WildcardError) as info:
        count("x __outer__", library)
    assert str(info.value) == (f"{tmp_path / 'outer.txt'}:2: wildcard __ghost__ not found "
                               f"(looked in: {tmp_path})")
    assert info.value.where == f"{tmp_path / 'outer.txt'}:2"
    with pytest.raises(WildcardError) as info:
        count("__broken__", library)
    assert str(info.value) == f"{tmp_path / 'broken.txt'}:2:1: unclosed '{{'"   # file:line:col
    assert info.value.name == "__broken__"


def test_cycle_is_an_error_in_every_mode(lib: Library) -> None:
    message = "wildcard cycle: __loop/a__ -> __loop/b__ -> __loop/a__"
    for call in (lambda: count("__loop/a__", lib),
                 lambda: combinations("__loop/a__", lib),
                 lambda: sample("__loop/a__", lib, random.Random(0))):
        with pytest.raises(WildcardError) as info:
            call()
        assert info.value.message == message
        assert info.value.where is not None and info.value.where.endswith("b.txt:1")


def test_self_including_glob_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path, {"a.txt": "x\n__*__\n"})
    with pytest.raises(WildcardError, match=r"wildcard cycle: __a__ -> __\*__ -> __\*__"):
        count("__a__", Library([tmp_path]))


def test_depth_limit(tmp_path: Path) -> None:
    chain = {f"w{i}.txt": f"__w{i + 1}__\n" for i in range(MAX_DEPTH + 1)}
    chain[f"w{MAX_DEPTH + 1}.txt"] = "end\n"
    write(tmp_path, chain)
    library = Library([tmp_path])
    with pytest.raises(WildcardError, match=f"nested more than {MAX_DEPTH} levels deep"):
        count("__w0__", library)
    assert texts(f"__w{3}__", library) == ["end"]


def test_duplicate_definition_in_one_dir(tmp_path: Path) -> None:
    write(tmp_path, {"color.txt": "red\n", "more.yaml": "color: [blue]\nshape: [round]\n"})
    library = Library([tmp_path])
    with pytest.raises(WildcardError) as info:
        count("__color__", library)
    assert str(info.value) == (f"wildcard __color__ is defined twice in {tmp_path}: color.txt "
                               "and more.yaml (color)")
    assert texts("__shape__", library) == ["round"]


def test_unreadable_structured_file_is_reported_when_a_name_is_missing(tmp_path: Path) -> None:
    write(tmp_path, {"bad.yaml": "a: [1, 2\n", "bad.json": "{\"a\": }", "ok.txt": "fine\n"})
    library = Library([tmp_path])
    assert texts("__ok__", library) == ["fine"]
    with pytest.raises(WildcardError) as info:
        count("__a__", library)
    assert "invalid JSON" in str(info.value) and "invalid YAML" in str(info.value)
    assert str(tmp_path / "bad.json") + ":1: invalid JSON" in str(info.value)


def test_bad_structured_items(tmp_path: Path) -> None:
    write(tmp_path, {"w.yaml": "nested: [[a, b]]\nweights: [{text: a, weight: heavy}]\n"
                               "notext: [{weight: 2}]\n"})
    library = Library([tmp_path])
    with pytest.raises(WildcardError, match=r"w\.yaml:1: a wildcard list item must be text"):
        count("__nested__", library)
    with pytest.raises(WildcardError, match=r"w\.yaml:2: weight 'heavy' is not a number"):
        count("__weights__", library)
    with pytest.raises(WildcardError, match=r"w\.yaml:3: a mapping in a wildcard list needs"):
        count("__notext__", library)


@pytest.mark.parametrize(("template", "message"), [
    ("a {b", "unclosed '{' at column 3"),
    ("{a|{b}", "unclosed '{' at column 1"),
    ("{3-1$$a|b}", "empty range 3-1$$ in variant at column 1"),
    ("{2$$~a|b}", "sampler prefix '~' applies to a single pick, not to 2-2$$ at column 5"),
    ("{" * 40 + "}" * 40, f"variants nested more than {MAX_NESTING} deep at column 33"),
    ("x %{fox$$y}", "the wrapper of %{...$$...} needs `...` where the prompt goes at column 3"),
    ("%{a ...}", "the wrap command %{...} needs `$$` between the wrapper and the prompt"),
    ("%{a ...$$b|c}", "unclosed '%{' at column 1"),
    ("${=x}", "expected a variable name after '${' at column 3"),
])
def test_syntax_errors(template: str, message: str) -> None:
    with pytest.raises(WildcardError) as info:
        parse(template)
    assert str(info.value).startswith(message)
    assert info.value.name == template


def test_nesting_up_to_the_limit_works(lib: Library) -> None:
    deep = "{a|" * MAX_NESTING + "z" + "}" * MAX_NESTING
    assert count(deep, lib) == MAX_NESTING + 1
    assert texts(deep, lib)[-1] == "z"
    assert sample(deep, lib, random.Random(0)).text in {"a", "z"}


def test_dotdot_is_refused(lib: Library) -> None:
    with pytest.raises(WildcardError, match=r"may not contain '\.\.'"):
        count("__../etc/passwd__", lib)


# ---------------------------------------------------------------------------------- random


def test_sample_is_deterministic_and_one_of_the_combinations(lib: Library) -> None:
    template = "{2$$a|b|c|d} __nested__ {0.1::x|y} __colors/*__ {1-3$$ / $$__seasons__}"
    every = set(combinations(template, lib))
    draws = [sample(template, lib, random.Random(seed)) for seed in range(200)]
    assert draws == [sample(template, lib, random.Random(seed)) for seed in range(200)]
    assert all(d in every for d in draws)
    assert len(set(draws)) > 100


def test_weights_bias_sampling(lib: Library) -> None:
    rng = random.Random(1234)
    drawn = Counter(sample("{1::a|3::b|0::never}", lib, rng).text for _ in range(4000))
    assert drawn["never"] == 0
    assert 0.72 < drawn["b"] / 4000 < 0.78
    birds = Counter(sample("__animals/birds__", lib, rng).text for _ in range(4000))
    assert birds["wren"] == 0                          # weight 0
    assert 0.72 < birds["crow"] / 4000 < 0.78          # "3::crow" against owl's 1
    pairs = Counter(sample("{2$$1::a|1::b|8::c}", lib, rng).text for _ in range(4000))
    assert set(pairs) == {"a, c", "b, c", "a, b", "c, a", "c, b", "b, a"}
    both = Counter(frozenset(pair.split(", ")) for pair in pairs.elements())
    assert both[frozenset("ab")] < both[frozenset("ac")] / 4   # c is almost always picked
    assert pairs["c, a"] > pairs["a, c"]               # and mostly drawn first


def test_zero_weights_everywhere_fall_back_to_uniform(lib: Library) -> None:
    rng = random.Random(5)
    assert {sample("{0::a|0::b}", lib, rng).text for _ in range(100)} == {"a", "b"}
    assert {sample("{2$$0::a|0::b|0::c}", lib, rng).text for _ in range(100)} == {
        "a, b", "a, c", "b, a", "b, c", "c, a", "c, b"}


def test_range_sampling_covers_every_size(lib: Library) -> None:
    rng = random.Random(9)
    sizes = Counter(len(sample("{0-3$$a|b|c}", lib, rng).text.split(", ")) for _ in range(400))
    seen = {sample("{0-3$$a|b|c}", lib, rng).text for _ in range(400)}
    assert "" in seen and "a, b, c" in seen and sizes[2] > 50


DETERMINISM_SCRIPT = """
import json, random, sys
from render.wildcards import Library, sample
lib = Library(sys.argv[1:])
t = "{2$$a|b|c|d|e} __colors/*__ {1-$$__animals/*__} {0.3::x|y} __nested__"
print(json.dumps([list(map(str, sample(t, lib, random.Random(s)).__dict__.values()))
                  for s in range(50)] + [sample(t, lib, random.Random("job-a:7")).text]))
"""


def test_sampling_is_independent_of_hash_seed(lib: Library, dirs: list[Path]) -> None:
    outputs = []
    for hash_seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        run = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, *map(str, dirs)],
                             capture_output=True, text=True, env=env, check=True, cwd=REPO)
        outputs.append(json.loads(run.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    template = "{2$$a|b|c|d|e} __colors/*__ {1-$$__animals/*__} {0.3::x|y} __nested__"
    here = [sample(template, lib, random.Random(s)) for s in range(50)]
    assert [[e.text, str(e.picks)] for e in here] == outputs[0][:50]


# ---------------------------------------------------------------------------------- scale


def test_huge_count_is_exact_and_cheap(lib: Library) -> None:
    ten = "{" + "|".join(str(i) for i in range(10)) + "}"
    template = " ".join([ten] * 12)
    assert count(template, lib) == 10**12
    stream = combinations(template, lib)
    assert next(stream).text == " ".join(["0"] * 12)
    assert next(stream).text == " ".join(["0"] * 11 + ["1"])
    assert sample(template, lib, random.Random(0)).text.count(" ") == 11
    options = "|".join(f"{{x{i}|y{i}|z{i}}}" for i in range(2000))
    assert count("{1-$$" + options + "}", lib) == COUNT_LIMIT     # 4**2000 - 1: saturated
    assert count("{2$$" + options + "}", lib) == 9 * 2000 * 1999     # ordered pairs
    ten3 = "|".join(f"{{x{i}|y{i}|z{i}}}" for i in range(10))
    assert count("{1-$$" + ten3 + "}", lib) == sum(
        math.comb(10, k) * 3**k * math.factorial(k) for k in range(1, 11))
    # counted from the top: e_9 = 10 * 3**9 and e_10 = 3**10 orderings
    assert count("{9-$$" + ten3 + "}", lib) == (10 * 3**9 * math.factorial(9)
                                                  + 3**10 * math.factorial(10))
    twenty = "|".join(f"{{x{i}|y{i}|z{i}}}" for i in range(20))
    assert count("{19-$$" + twenty + "}", lib) == COUNT_LIMIT   # 3**20 * 20! orderings


def test_combinations_stream_in_order(lib: Library) -> None:
    ten = "{" + "|".join(str(i) for i in range(10)) + "}"
    template = "".join([ten] * 5)
    seen = [e.text for e in combinations(template, lib)]
    assert seen == [f"{i:05d}" for i in range(100_000)]


def test_subset_counts_with_nested_options(lib: Library) -> None:
    # options expand to 1, 2 and 3 texts: e_2 = 1*2 + 1*3 + 2*3 = 11, e_3 = 6; in order
    template = "{1-3$$a|{b|c}|{d|e|f}}"
    assert count(template, lib) == 6 + 2 * 11 + 6 * 6
    assert len(texts(template, lib)) == 64


# ---------------------------------------------------------------------------------- property


LEAVES = st.sampled_from([
    "a", "b", " ", "x y", "(w:1.2)", "[p|q]", "<lora:z:0.5>", "\\{", "\\|", "",
    "__seasons__", "__colors/*__", "__nested__", "__animals/birds__", "__colors/cold__",
])
BOUNDS = st.sampled_from(["", "", "2$$", "1-2$$", "-2$$", "2-$$", "0-1$$", "2$$ and $$", "3$$"])
WEIGHTS = st.sampled_from(["", "", " ", "2::", "0.5::", "0::"])


@st.composite
def variants(draw: st.DrawFn, children: st.SearchStrategy[str]) -> str:
    options = draw(st.lists(st.tuples(WEIGHTS, children), min_size=1, max_size=4))
    return "{" + draw(BOUNDS) + "|".join(w + o for w, o in options) + "}"


TEMPLATES = st.recursive(
    LEAVES,
    lambda kids: st.one_of(st.lists(kids, min_size=1, max_size=3).map("".join), variants(kids)),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=TEMPLATES, seed=st.integers(0, 2**32))
def test_count_matches_combinations(template: str, seed: int, lib: Library) -> None:
    n = count(template, lib)
    assume(n <= 3000)
    every = list(combinations(template, lib))
    assert len(every) == n
    picks = {len(e.picks) for e in every}
    assert len(picks) == 1
    drawn = sample(template, lib, random.Random(seed))
    assert drawn in every


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab_{}|\\$:()[]<> #\n%2-"))))
def test_any_text_parses_or_raises_wildcard_error(text: str, lib: Library) -> None:
    try:
        node = parse(text)
        count(node, lib)
    except WildcardError:
        return


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_characters="{}|\\$_#")))
def test_text_without_syntax_is_unchanged(text: str, lib: Library) -> None:
    assert list(combinations(text, lib)) == [Expansion(text, ())]


def test_a_syntax_error_in_a_wildcard_file_is_located_in_both_files(tmp_path: Path,
                                                                    capsys: Any) -> None:
    """The job file's line for the prompt, then the wildcard file's line and column: the
    one line a user needs to fix the right file."""
    from render.testing.checks import one_located_error

    write(tmp_path / "wildcards", {"brace.txt": "fine\nred {a|b\n"})
    job = tmp_path / "job.yaml"
    job.write_text("version: 1\nwildcard_dirs: [wildcards]\njobs:\n"
                   "  - {name: j, model: m, prompt: a __brace__ house}\n", encoding="utf-8")
    line = one_located_error([str(job), "--dry-run"], job, "prompt",
                             f"{tmp_path / 'wildcards' / 'brace.txt'}:2:5: unclosed '{{'",
                             capsys)
    assert line.startswith(f"error: {job}:4:")


def test_a_variant_in_a_wildcard_name_is_looked_up_for_each_name(lib: Library) -> None:
    with pytest.raises(WildcardError, match=r"wildcard __colors/hot__ not found"):
        count("__colors/{warm|hot}__", lib)       # every name is checked before expanding
    draws = {sample("__colors/{warm|cold}__", lib, random.Random(s)).text for s in range(60)}
    assert draws == {"red", "orange", "blue", "teal", "cyan"}
    assert longest("__colors/{warm|cold}__", lib) == len("orange")
    with pytest.raises(WildcardError, match=r"^in the wildcard name __x{3-1\$\$a}__: empty "
                                            r"range 3-1\$\$ in variant at column 4$"):
        parse("__x{3-1$$a}__")


def test_variables_reach_wildcard_values_and_parameters_set_them(tmp_path: Path) -> None:
    write(tmp_path, {"animal.txt": "a ${kind:cat} in the ${place:snow}\n"})
    library = Library([tmp_path])
    assert texts("__animal__", library) == ["a cat in the snow"]
    assert texts("${kind={dog|fox}}__animal__", library) == [
        "a dog in the snow", "a fox in the snow"]
    assert texts("__animal(kind=dog, place={field|wood})__", library) == [
        "a dog in the field", "a dog in the wood"]
    assert count("__animal(kind={a|b|c})__ __animal__", library) == 3
    draws = {sample("${k=!{a|b}}${k} __animal(kind=${k})__", library,
                    random.Random(seed)).text for seed in range(40)}
    assert draws == {"a a a in the snow", "b a b in the snow"}
    with pytest.raises(WildcardError, match=r"variable \$\{k\} is not set"):
        count("${k} x", library)
    with pytest.raises(WildcardError, match=r"unclosed '\$\{k='"):
        parse("${k={a|b} x")


def test_sampler_prefixes(lib: Library) -> None:
    """SYNTAX.md's samplers: ``~`` random, ``@`` cyclical, ``!`` combinatorial, whatever the
    job's mode; a ``~`` or ``@`` choice is made again for every expansion and counts once."""
    assert count("{~a|b|c} {x|y}", lib) == 2
    random_pick = texts("{x|y|z|w} {~a|b|c}", lib)
    assert len(random_pick) == 4 and {t.split()[1] for t in random_pick} <= {"a", "b", "c"}
    assert random_pick == texts("{x|y|z|w} {~a|b|c}", lib)        # the same list every run
    assert texts("{@a|b} {x|y|z}", lib) == ["a x", "b y", "a z"]   # round and round
    assert texts("__@colors/warm__ {1|2|3}", lib) == ["red 1", "orange 2", "red 3"]
    assert texts("{!a|b} {x|y}", lib) == ["a x", "a y", "b x", "b y"]
    # random mode: `@` and `!` take option n for the job's n-th prompt, `~` draws
    assert [sample("{@a|b|c}", lib, random.Random(0), draw).text for draw in range(5)] == [
        "a", "b", "c", "a", "b"]
    assert [sample("__!colors/warm__", lib, random.Random(0), d).text for d in range(3)] == [
        "red", "orange", "red"]
    drawn = Counter(sample("{~1::a|3::b}", lib, random.Random(s)).text for s in range(2000))
    assert 0.70 < drawn["b"] / 2000 < 0.80                          # weights hold
