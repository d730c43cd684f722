"""Expansion: defaults, wildcards, grids, zip, seeds, ids; and every error located."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from render import expand
from render.errors import JobErrors
from render.expand import load_job_file, parse_seeds
from render.plugins import load_plugins


@pytest.fixture(scope="module")
def core_plugins():
    """The core alone: no feature plugins, so only core keys are known."""
    return load_plugins(builtins=False)


def tasks_of(path: Path, plugins) -> list:
    jf = load_job_file(path, plugins)
    return [t for plan in jf.jobs for t in expand.iter_tasks(plan)]


def errors_of(path: Path, plugins) -> list[str]:
    with pytest.raises(JobErrors) as info:
        load_job_file(path, plugins)
    return [str(e) for e in info.value.errors]


BASE = """
version: 1
defaults:
  model: tiny
  size: 64x64
  steps: 4
  cfg: 7
  sampler: Euler a
"""


def test_grid_times_seeds_in_order(write_job, core_plugins):
    path = write_job(BASE + """
jobs:
  - name: g
    prompt: a cat
    seeds: [1, 2]
    grid:
      cfg: [5, 9]
      sampler: [Euler a, DPM++ 2M Karras]
""")
    got = [(t.index, t.cfg, t.sampler, t.schedule, t.seed) for t in tasks_of(path, core_plugins)]
    assert got == [
        (0, 5, "Euler a", "Automatic", 1), (1, 5, "Euler a", "Automatic", 2),
        (2, 5, "DPM++ 2M", "Karras", 1), (3, 5, "DPM++ 2M", "Karras", 2),
        (4, 9, "Euler a", "Automatic", 1), (5, 9, "Euler a", "Automatic", 2),
        (6, 9, "DPM++ 2M", "Karras", 1), (7, 9, "DPM++ 2M", "Karras", 2),
    ]


def test_defaults_merge_and_job_overrides(write_job, core_plugins):
    path = write_job(BASE + """
  negative: lowres
jobs:
  - name: a
    prompt: x
  - name: b
    prompt: y
    steps: 9
    size: 128x64
    negative: null
""")
    a, b = tasks_of(path, core_plugins)
    assert (a.steps, a.width, a.height, a.negative) == (4, 64, 64, "lowres")
    assert (b.steps, b.width, b.height, b.negative) == (9, 128, 64, "")
    assert (a.model, a.cfg, a.clip_skip) == ("tiny", 7, 1)


def test_combinatorial_wildcards_then_zip_then_seeds(write_job, core_plugins, tmp_path):
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "season.txt").write_text("# comment\nspring\nwinter\n")
    path = write_job(BASE + """
jobs:
  - name: w
    prompt: "a __season__ {cabin|tower}"
    wildcards: combinatorial
    seeds: 2
    seed: 10
    zip:
      steps: [2, 3]
      negative: [blurry, dark]
""")
    got = [(t.prompt, t.steps, t.negative, t.seed) for t in tasks_of(path, core_plugins)]
    prompts = ["a spring cabin", "a spring tower", "a winter cabin", "a winter tower"]
    expected = [(p, s, n, seed) for p in prompts for s, n in ((2, "blurry"), (3, "dark"))
                for seed in (10, 11)]
    assert got == expected


def test_random_wildcards_are_deterministic_per_job_and_seed(write_job, core_plugins, tmp_path):
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "animal.txt").write_text("\n".join(f"a{i}" for i in range(50)))
    text = BASE + """
jobs:
  - name: r
    prompt: "__animal__ at {dawn|dusk|noon}"
    count: 5
"""
    first = [t.prompt for t in tasks_of(write_job(text), core_plugins)]
    again = [t.prompt for t in tasks_of(write_job(text), core_plugins)]
    assert first == again and len(first) == 5 and len(set(first)) > 1
    # the same in a process with another hash seed
    code = ("import sys; from render.expand import load_job_file, iter_tasks;"
            "from render.plugins import load_plugins;"
            "jf = load_job_file(sys.argv[1], load_plugins(builtins=False));"
            "print('|'.join(t.prompt for p in jf.jobs for t in iter_tasks(p)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.yaml")],
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent, check=True)
    assert out.stdout.strip().split("|") == first
    picks = tasks_of(write_job(text), core_plugins)[0].picks
    assert picks and picks[0].startswith("a")


def test_prompt_without_choices_is_one_task_whatever_count(write_job, core_plugins):
    path = write_job(BASE + "jobs:\n  - {name: c, prompt: plain, count: 4}\n")
    assert len(tasks_of(path, core_plugins)) == 1


def test_prompt_sr_and_prompt_axes(write_job, core_plugins):
    path = write_job(BASE + """
jobs:
  - name: sr
    prompt: a cat in a hat
    grid:
      prompt_sr: [cat, dog, fox]
  - name: p
    grid:
      prompt: [one, "{two|two}"]
""")
    tasks = tasks_of(path, core_plugins)
    assert [t.prompt for t in tasks] == ["a cat in a hat", "a dog in a hat", "a fox in a hat",
                                         "one", "two"]
    assert tasks[1].axes == {"prompt_sr": "dog"}


def test_seed_forms():
    assert list(parse_seeds(3, 5)) == [5, 6, 7]      # a range: counted, never built
    assert parse_seeds([1, 9]) == [1, 9]
    assert list(parse_seeds("100-103")) == [100, 101, 102, 103]
    assert len(parse_seeds("random")) == 1
    for bad, message in ((0, "expected a seed count >= 1, got 0"),
                         ("9-1", "seed range '9-1' runs backwards"),
                         ([1, "x"], "expected seeds as integers >= 0, got 'x'"),
                         ("lots", "expected a count, a list of seeds, a range like '100-107' "
                                  "or 'random', got 'lots'")):
        with pytest.raises(ValueError) as info:
            parse_seeds(bad)
        assert str(info.value) == message


@given(st.integers(0, 2**40), st.integers(1, 50))
def test_seed_count_property(base, n):
    seeds = parse_seeds(n, base)
    assert list(seeds) == list(range(base, base + n))


@given(st.integers(0, 2**32), st.integers(0, 2**32))
def test_seed_range_property(a, b):
    low, high = min(a, b), min(a, b) + abs(a - b) % 500
    assert list(parse_seeds(f"{low}-{high}")) == list(range(low, high + 1))


def test_errors_are_located_and_all_reported(write_job, core_plugins):
    path = write_job("""
version: 1
defaults:
  model: tiny
  stepz: 4
jobs:
  - name: one
    prompt: x
    cfg: seven
    size: 65x64
    grid:
      cfg: [5, high]
  - name: one
    prompt: y
    strength: 2
""")
    name = str(path)
    assert errors_of(path, core_plugins) == [
        f"{name}:4:3: defaults.stepz: unknown key (did you mean 'steps'?)",
        f"{name}:8:10: jobs[0].cfg: expected a number in [0, 100], got 'seven'",
        f"{name}:9:11: jobs[0].size: a width must be a multiple of 8, got 65",
        f"{name}:11:16: jobs[0].grid.cfg: expected a number in [0, 100], got 'high'",
        f"{name}:12:11: jobs[1].name: duplicate job name 'one' (first used at line 6)",
        f"{name}:14:15: jobs[1].strength: expected a number in [0, 1], got 2",
    ]


def test_top_level_errors(write_job, core_plugins):
    path = write_job("version: 2\njob:\n  - name: x\n")
    name = str(path)
    assert errors_of(path, core_plugins) == [
        f"{name}:1:1: jobs: missing; list at least one job under 'jobs:'",
        f"{name}:1:10: version: unsupported version 2; this render reads version 1",
        f"{name}:2:1: job: unknown key (did you mean 'jobs'?)",
    ]


def test_missing_wildcard_names_the_line(write_job, core_plugins):
    path = write_job(BASE + "jobs:\n  - name: w\n    prompt: a __nothing__ here\n")
    (message,) = errors_of(path, core_plugins)
    assert message.startswith(f"{path}:10:13: jobs[0].prompt: ")
    assert "__nothing__" in message


def test_prompt_syntax_is_checked_at_load(write_job, core_plugins, tmp_path):
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "pair.txt").write_text("cat\ncats AND dogs\n")
    path = write_job(BASE + """
jobs:
  - name: composition
    prompt: cats AND dogs
  - name: branch
    prompt: "a [(cat:1.2.3):dog:0.5]"
  - name: wildcard
    prompt: "a __pair__"
  - name: axis
    grid: {prompt: ["[a|b]", "[a|b AND c]"]}
  - name: fine
    prompt: "a [cat:dog:0.5] [red|blue] [artist: foo] (x:1.2) BREAK, 16:9 <lora:x:1>"
    negative: "[ugly::0.3]"
""")
    errors = errors_of(path, core_plugins)
    assert [e.split(": ", 2)[:2] for e in errors] == [
        [f"{path}:11:13", "jobs[0].prompt"], [f"{path}:13:13", "jobs[1].prompt"],
        [f"{path}:15:13", "jobs[2].prompt"], [f"{path}:17:30", "jobs[3].grid.prompt"]]
    assert "prompt-composition" in errors[0] and "'1.2.3' is not a number" in errors[1]
    assert "'a cats AND dogs'" in errors[2]


def test_prompt_syntax_beyond_the_load_checks_fails_at_expansion(write_job, core_plugins,
                                                                 tmp_path):
    from render.errors import JobError

    (tmp_path / "wildcards").mkdir()
    values = [f"word{i}" for i in range(expand.PROMPT_CHECKS)] + ["x AND y"]
    (tmp_path / "wildcards" / "many.txt").write_text("\n".join(values))
    path = write_job(BASE + "jobs:\n  - name: w\n    prompt: __many__\n"
                     "    wildcards: combinatorial\n")
    with pytest.raises(JobError) as info:
        tasks_of(path, core_plugins)
    assert str(info.value).startswith(f"{path}:10:13: jobs[0].prompt: 'AND' is A1111's")


def test_unknown_sampler_lists_known_ones(write_job, core_plugins):
    path = write_job(BASE + "jobs:\n  - {name: s, prompt: x, sampler: Euler b}\n")
    (message,) = errors_of(path, core_plugins)
    assert message.startswith(f"{path}:9:35: jobs[0].sampler: ")
    assert "Euler a" in message and "DPM++ 2M" in message


def test_explosion_guard_counts_before_expanding(write_job, core_plugins, tmp_path):
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "n.txt").write_text("\n".join(map(str, range(1000))))
    path = write_job(BASE + """
jobs:
  - name: huge
    prompt: "__n__ __n__ __n__"
    wildcards: combinatorial
    seeds: 10
""")
    jf = load_job_file(path, core_plugins)
    assert jf.task_count == 1000**3 * 10
    from render.errors import UserError
    from render.run import guard

    with pytest.raises(UserError) as info:
        guard(jf.jobs, 10000)
    assert "10,000,000,000 tasks" in str(info.value) and "--max-tasks" in str(info.value)


def test_task_ids_depend_only_on_pixels(write_job, core_plugins):
    text = BASE + "jobs:\n  - {name: %s, prompt: a cat, seeds: [1, 2]}\n"
    a = tasks_of(write_job(text % "first"), core_plugins)
    b = tasks_of(write_job(text % "renamed"), core_plugins)
    ids_a = [t.compute_id() for t in a]
    assert ids_a == [t.compute_id() for t in b]          # the job name does not decide pixels
    assert len(set(ids_a)) == 2                          # the seed does
    changed = tasks_of(write_job((text % "first").replace("steps: 4", "steps: 5")),
                       core_plugins)
    assert {t.compute_id() for t in changed}.isdisjoint(ids_a)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["cfg", "steps", "seed"]), st.integers(1, 30)))
def test_id_stable_and_sensitive_property(overrides):
    from render.tasks import Task

    base = dict(job="j", index=0, prompt="p", negative="", seed=1, model="m", width=64,
                height=64, steps=4, cfg=7, sampler="Euler a")
    task = Task(**{**base, **overrides})
    again = Task(**{**base, **overrides})
    assert task.compute_id() == again.compute_id()
    differs = {**base, **overrides}
    differs["steps"] = differs["steps"] + 1
    assert Task(**differs).compute_id() != task.compute_id()
    json.dumps(task.to_json())


@pytest.mark.parametrize("job", [
    # a cell's seeds share everything else: the first task is built, the others copied
    "    prompt: a {red|blue} cat\n    wildcards: combinatorial\n    seeds: 3\n"
    "    grid: {cfg: [5, 9], sampler: [Euler a, DDIM]}\n",
    # drawn per task (a negative with choices, a prompt axis): each is built
    "    prompt: a cat\n    negative: '{blurry|lowres}'\n    seeds: 3\n    grid: {cfg: [5, 9]}\n",
    "    prompt: a cat\n    seeds: 2\n    grid: {prompt: ['a {red|blue} dog', a bird]}\n",
    # a seed axis: the seeds of plan.seeds are not the tasks' seeds
    "    prompt: a cat\n    grid: {seed: [7, 8], cfg: [5, 9]}\n",
])
def test_copied_tasks_are_the_tasks_a_full_build_makes(write_job, core_plugins, job):
    """iter_tasks copies the first task of a cell for its other seeds (the dry run of
    100,000 tasks spent a third of its time building them); every copy must equal the task
    built from scratch, field for field, id included."""
    import itertools

    path = write_job(BASE + "jobs:\n  - name: j\n" + job)
    (plan,) = load_job_file(path, core_plugins).jobs
    fast = list(expand.iter_tasks(plan))
    base = {k: plan.file.normalise(k, v) for k, v in plan.raw.items()
            if k in expand.CORE_FIELDS or ("task", k) in plan.file.fields}
    slow, index = [], 0
    prompt_axis = any(a.top == "prompt" for a in plan.grid)
    expansions = ([expand.wildcards.Expansion("", ())] if prompt_axis
                  else expand._prompt_expansions(plan))
    for draw, expansion in enumerate(expansions):
        for cell in itertools.product(*(a.values for a in plan.grid)):
            overrides = {a.key: v for a, v in zip(plan.grid, cell, strict=True)}
            for seed in plan.seeds:
                slow.append(expand._build_task(plan, base, overrides, expansion, draw, seed,
                                               index)[0])
                index += 1
    assert len(fast) == len(slow) > 2
    for a, b in zip(fast, slow, strict=True):
        assert a == b and a.compute_id() == b.compute_id()
    assert len({t.seed for t in fast}) > 1


def test_evolve_is_replace(write_job, core_plugins):
    import dataclasses

    path = write_job(BASE + "jobs:\n  - {name: j, prompt: a cat}\n")
    (task,) = tasks_of(path, core_plugins)
    assert task.evolve(seed=5, index=3) == dataclasses.replace(task, seed=5, index=3)
    assert task.seed != 5                                       # the original is unchanged
    with pytest.raises(TypeError, match="no field 'sed'"):
        task.evolve(sed=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.evolve(seed=5).seed = 6                            # still frozen
