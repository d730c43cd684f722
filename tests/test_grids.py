"""Grid sheets: X/Y/Z choice, labels that never break mid-word, parts, blanks, metadata, and
only our own sheets written over or removed."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from render import grid_draw, grids
from render.errors import Location
from render.grids import build_grids, grid_entries, plan_grids, sheets
from render.ledger import Ledger
from render.metadata import parse_infotext
from render.tasks import GridSpec, Job, OutputSpec, Task

CW, CH = 40, 30


def make_job(axes: tuple[str, ...], zip_axes: tuple[str, ...] = (), **spec: Any) -> Job:
    return Job(name="demo", file="job.yaml", base_dir=Path("."), where=Location("job.yaml"),
               output=OutputSpec(grid_spec=GridSpec(**spec)), grid_axes=axes,
               zip_axes=zip_axes)


def colour(n: int) -> tuple[int, int, int]:
    return ((n * 67) % 200 + 30, (n * 131) % 200 + 30, (n * 29) % 200 + 30)


class Night:
    """A job's tasks (grid product, then seeds), some rendered into a real ledger."""

    def __init__(self, tmp_path: Path, axes: dict[str, list[Any]], seeds: list[int] = [1],  # noqa: B006
                 *, fail: set[int] = frozenset(), skip: set[int] = frozenset(),  # type: ignore[assignment]
                 delete: set[int] = frozenset(), size: tuple[int, int] = (CW, CH),  # type: ignore[assignment]
                 job: Job | None = None) -> None:
        self.root = tmp_path / "out"
        self.root.mkdir(parents=True, exist_ok=True)
        self.job = job or make_job(tuple(axes))
        self.tasks: list[Task] = []
        self.ledger = Ledger(self.root)
        for index, (combo, seed) in enumerate(itertools.product(
                itertools.product(*axes.values()), seeds)):
            values = dict(zip(axes, combo, strict=True))
            task = Task(job="demo", index=index, prompt=f"p {values}", negative="",
                        seed=int(values.get("seed", seed)), model="m", width=size[0],
                        height=size[1], steps=4, cfg=float(values.get("cfg", 7)),
                        sampler="Euler a", axes=values)
            task = dataclasses.replace(task, id=task.compute_id())
            self.tasks.append(task)
            if index in fail:
                self.ledger.record_failed(task, "RuntimeError: out of memory\ntraceback...")
            elif index not in skip:
                path = self.root / f"{index:05}.png"
                Image.new("RGB", size, colour(index)).save(path)
                self.ledger.record_done(task, [path], {},
                                        f"p {values}\nSteps: 4, Seed: {seed}, CFG scale: 7")
                if index in delete:
                    path.unlink()

    def entries(self, job: Job | None = None) -> list[grids.Entry]:
        return grid_entries(job or self.job, self.tasks, self.ledger.rows(job="demo"))

    def build(self, job: Job | None = None, **kw: Any) -> list[Path]:
        return build_grids(job or self.job, self.entries(job), self.root / "demo",
                           ledger=self.ledger, **kw)

    def sheets(self, job: Job | None = None, max_pixels: int = 10**9,
               **kw: Any) -> list[grids.Sheet]:
        plan = plan_grids(job or self.job, self.entries(job))
        assert plan is not None
        return sheets(plan, max_pixels=max_pixels, **kw)


@pytest.fixture
def night(tmp_path: Path):
    made: list[Night] = []

    def make(*args: Any, **kw: Any) -> Night:
        made.append(Night(tmp_path, *args, **kw))
        return made[-1]
    yield make
    for n in made:
        n.ledger.close()


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


def has_ink(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    lo, _ = image.crop(box).convert("L").getextrema()
    return lo < 128


def chunk(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[grids.SHEET_CHUNK])


def test_complete_xy_sheet_has_every_cell_under_a1111_labels(night) -> None:
    n = night({"cfg": [5, 7, 9], "sampler": ["Euler a", "DPM++ 2M"]})
    (sheet,) = n.sheets()
    (path,) = n.build()
    assert path == n.root / "demo" / "grids" / "demo-grid.png"
    data = chunk(path)
    assert data["x"]["values"] == ["CFG Scale: 5", "CFG Scale: 7", "CFG Scale: 9"]
    assert data["y"]["values"] == ["Sampler: Euler a", "Sampler: DPM++ 2M"]
    image, layout = rgb(path), sheet.layout
    assert layout is not None and image.size == layout.size
    for x, y in itertools.product(range(3), range(2)):      # index = x * 2 + y
        box = layout.cell_box(x, y)
        assert image.getpixel(centre(box)) == colour(x * 2 + y)
        assert has_ink(image, (box[0], layout.title, box[2], layout.title + layout.top))
        assert has_ink(image, (0, box[1], layout.left, box[3]))
    assert has_ink(image, (0, 0, image.width, layout.title))           # the title


def test_seeds_fill_the_next_free_axis(night) -> None:
    n = night({"cfg": [5, 7]}, seeds=[11, 12])
    (path,) = n.build()
    assert chunk(path)["y"]["values"] == ["Seed: 11", "Seed: 12"]
    n = night({"cfg": [5, 7], "sampler": ["a", "b"]}, seeds=[11, 12])
    paths = n.build()
    assert [p.name for p in paths] == ["demo-grid.png", "demo-grid-seed=11.png",
                                       "demo-grid-seed=12.png"]
    combined = rgb(paths[0])
    assert {colour(i) for i in range(8)} <= set(combined.getdata())   # every image on it
    assert chunk(paths[0])["z"]["values"] == ["Seed: 11", "Seed: 12"]
    layout = n.sheets()[2].layout            # seed 12: index = (x * 2 + y) * 2 + 1
    assert rgb(paths[2]).getpixel(centre(layout.cell_box(1, 0))) == colour(5)


def test_chosen_axes(night) -> None:
    n = night({"cfg": [5, 7], "sampler": ["a", "b"]}, seeds=[1, 2, 3])
    job = make_job(("cfg", "sampler"), x="seed", y="cfg", z="sampler")
    data = chunk(n.build(job)[0])
    assert [data[k]["key"] for k in "xyz"] == ["seed", "cfg", "sampler"]
    assert data["x"]["values"] == ["Seed: 1", "Seed: 2", "Seed: 3"]


def test_seed_as_a_grid_axis_is_one_sheet_with_every_cell(night) -> None:
    """Regression: seed was also taken as a per-sheet variant (one sheet per seed, each with
    a "not rendered" cell)."""
    n = night({"seed": [1, 2], "cfg": [5, 7]})
    (path,) = n.build()
    (sheet,) = n.sheets()
    image = rgb(path)
    for x, y in itertools.product(range(2), range(2)):
        assert image.getpixel(centre(sheet.layout.cell_box(x, y))) == colour(x * 2 + y)


def test_fourth_axis_gives_sheet_sets(night) -> None:
    n = night({"cfg": [5, 7], "sampler": ["a", "b"], "steps": [10, 20], "clip_skip": [1, 2]})
    names = [p.name for p in n.build()]
    assert names[:3] == ["demo-grid-clip_skip=1.png", "demo-grid-clip_skip=1-steps=10.png",
                         "demo-grid-clip_skip=1-steps=20.png"]
    assert len(names) == 6


def test_sheet_follows_the_tasks_planned_not_the_axes_recorded(night) -> None:
    """Regression: a task whose axis was renamed (same id, same pixels) kept its old axes
    in the ledger and fell off the new sheet."""
    n = night({"cfg": [5, 7]})
    renamed = [dataclasses.replace(t, axes={"guidance": t.axes["cfg"]}) for t in n.tasks]
    job = make_job(("guidance",))
    entries = grid_entries(job, renamed, n.ledger.rows(job="demo"))
    (sheet,) = sheets(plan_grids(job, entries), max_pixels=10**9)
    image = sheet.draw()
    assert image.getpixel(centre(sheet.layout.cell_box(1, 0))) == colour(1)


def test_partial_runs_draw_labelled_blanks(night) -> None:
    # index 0 done, 1 failed, 2 file deleted, 3 planned but not rendered yet
    n = night({"cfg": [5, 7], "sampler": ["a", "b"]}, fail={1}, delete={2}, skip={3})
    (path,) = n.build()
    layout = n.sheets()[0].layout
    image = rgb(path)
    assert image.getpixel(centre(layout.cell_box(0, 0))) == colour(0)
    reasons = [grids.cell_art(e).reason for e in n.entries()]
    assert reasons == ["", "failed: RuntimeError: out of memory", "file missing: 00002.png",
                       "not rendered yet"]
    for x, y in [(0, 1), (1, 0), (1, 1)]:
        box = layout.cell_box(x, y)
        assert image.getpixel((box[0] + 3, box[1] + 3)) == grid_draw.EMPTY_FILL
        assert has_ink(image, box)
    failed = layout.cell_box(0, 1)
    assert any(p[0] > 150 and p[1] < 50 for p in image.crop(failed).getdata())  # red text


def test_big_sheets_split_into_parts_with_the_same_labels(night) -> None:
    n = night({"cfg": [1, 2, 3, 4, 5], "sampler": ["a", "b", "c"]})
    full = n.sheets()[0].layout
    limit = (full.left + 2 * full.cell_w) * (full.title + full.top + 2 * full.cell_h)
    parts = n.sheets(max_pixels=limit)
    assert [(s.layout.cols, s.layout.rows) for s in parts] == [(2, 2), (2, 2), (1, 2),
                                                                (2, 1), (2, 1), (1, 1)]
    job = make_job(("cfg", "sampler"), max_pixels=limit)
    paths = n.build(job)
    assert [p.name for p in paths] == [f"demo-grid-part{k}of6.png" for k in range(1, 7)]
    for path, sheet in zip(paths, parts, strict=True):
        image = rgb(path)
        assert image.width * image.height <= limit
        lay = sheet.layout
        assert has_ink(image, (lay.left, lay.title, image.width, lay.title + lay.top))
        assert has_ink(image, (0, lay.title + lay.top, lay.left, image.height))
    # part 3: the third column block of the first row block shows cfg 5 / sampler a: index 12
    assert rgb(paths[2]).getpixel(centre(parts[2].layout.cell_box(0, 0))) == colour(12)
    assert chunk(paths[2])["part"] == [3, 6]


def test_no_combined_sheet_when_it_would_pass_the_limit(night) -> None:
    n = night({"cfg": [5, 7], "sampler": ["a", "b"]}, seeds=[1, 2])
    one = n.sheets()[1].layout
    job = make_job(("cfg", "sampler"), max_pixels=one.size[0] * one.size[1] + 10)
    assert [p.name for p in n.build(job)] == ["demo-grid-seed=1.png", "demo-grid-seed=2.png"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcxyz.-_:0123456789ÅДλ", min_size=1, max_size=14),
                min_size=1, max_size=12),
       st.integers(min_value=20, max_value=300))
def test_wrap_keeps_every_word_whole(words: list[str], width: int) -> None:
    fnt = grid_draw.font(14)
    text = " ".join(words)
    lines = grid_draw.wrap(fnt, text, width)
    assert " ".join(lines).split() == text.split()                 # nothing cut or dropped
    for line in lines:
        assert grid_draw.text_width(fnt, line) <= width or " " not in line


def test_cells_widen_so_no_label_breaks_mid_word() -> None:
    fnt = grid_draw.font(14)
    labels = ["AnimateDiff Motion LoRA tiny-motion-lora-with-a-long-name: 0.8", "CFG Scale: 7"]
    layout = grid_draw.make_layout(fnt, labels, [], (32, 32), max_side=16384, max_pixels=10**9)
    for label in labels:
        lines = grid_draw.wrap(fnt, label, layout.cell_w - 2 * layout.pad)
        assert " ".join(lines) == label
        assert all(grid_draw.text_width(fnt, ln) <= layout.cell_w - 2 * layout.pad
                   for ln in lines)


def test_a_long_title_wraps_over_lines(night) -> None:
    n = night({"cfg": [5]})
    short = n.sheets()[0].layout.title
    job = n.job
    long_sets = [dataclasses.replace(s, labels=["Prompt: " + "a very long prompt " * 12])
                 for s in plan_grids(job, n.entries(job)).sets]
    plan = dataclasses.replace(plan_grids(job, n.entries(job)), sets=long_sets)
    (sheet,) = sheets(plan, max_pixels=10**9)
    assert sheet.layout.title >= 4 * (short - 2 * sheet.layout.pad)
    lines, _ = grid_draw.title_block(grid_draw.font_for_cell(CW, CH),
                                     grids._title(job, long_sets[0].labels),
                                     sheet.draw().width, sheet.layout.pad)
    assert " ".join(lines).split() == grids._title(job, long_sets[0].labels).split()


def test_sheet_metadata_is_a1111s_grid_infotext(night) -> None:
    n = night({"cfg": [5, 9], "sampler": ["Euler a", "DPM++ 2M"]}, seeds=[1, 2])
    path = n.build()[0]
    with Image.open(path) as im:
        prompt, _, fields = parse_infotext(im.text["parameters"])
    assert prompt == "p {'cfg': 5, 'sampler': 'Euler a'}"
    assert fields["Script"] == "X/Y/Z plot"
    assert (fields["X Type"], fields["X Values"]) == ("CFG Scale", "5, 9")
    assert (fields["Y Type"], fields["Y Values"]) == ("Sampler", "Euler a, DPM++ 2M")
    assert (fields["Z Type"], fields["Z Values"]) == ("Seed", "1, 2")
    assert fields["Steps"] == "4"


def test_plugin_axis_names_print_on_the_sheet(night) -> None:
    n = night({"lora.detail": [0, 0.5]})
    (path,) = n.build(axis_name=lambda k: "LoRA detail" if k == "lora.detail" else k)
    assert chunk(path)["x"]["values"] == ["LoRA detail: 0", "LoRA detail: 0.5"]


def test_stale_sheets_we_wrote_are_removed_and_others_kept(night) -> None:
    n = night({"cfg": [1, 2, 3]})
    full = n.sheets()[0].layout
    small = make_job(("cfg",), max_pixels=(full.left + full.cell_w) * full.size[1])
    parts = n.build(small)
    assert len(parts) == 3
    parts[1].write_bytes(parts[1].read_bytes() + b"edited")     # the user changed part 2
    (whole,) = n.build()
    assert whole.name == "demo-grid.png"
    assert not parts[0].exists() and not parts[2].exists()
    assert parts[1].exists()                                     # not ours any more: kept
    assert n.ledger.sheets_by_job() == {"demo": [whole]}


def test_a_foreign_file_under_a_sheet_name_is_left_alone(night) -> None:
    n = night({"cfg": [5, 7]})
    folder = n.root / "demo" / "grids"
    folder.mkdir(parents=True)
    (folder / "demo-grid.png").write_bytes(b"my own file")
    said: list[str] = []
    assert n.build(warn=said.append) == []
    assert (folder / "demo-grid.png").read_bytes() == b"my own file"
    assert "not a sheet render wrote" in said[0]


def test_a_sheet_of_ours_is_rewritten_even_without_its_ledger_record(night) -> None:
    n = night({"cfg": [5, 7]})
    (path,) = n.build()
    n.ledger.record_sheets("demo", [])
    assert n.build() == [path]


def test_no_dimension_no_sheet(night) -> None:
    n = night({"cfg": [5]})
    assert build_grids(make_job(()), n.entries(make_job(())), n.root) == []
    assert build_grids(make_job(("cfg",)), [], n.root) == []


@pytest.mark.parametrize("value", ["../../x", "a/b", "CON", "x" * 400])
def test_hostile_axis_values_make_safe_sheet_names(night, value: str) -> None:
    n = night({"cfg": [5], "sampler": ["a"], "style": [value]})
    (path,) = n.build()
    assert path.parent == n.root / "demo" / "grids"
    assert len(path.name.encode()) <= 255


def test_section_axis_label() -> None:
    label = grids.section_axis_label
    assert label("lora.add_detail", "lora", "LoRA") == "LoRA add_detail"
    assert label("controlnet.0.scale", "controlnet", "ControlNet",
                 {"scale": "weight"}) == "ControlNet 0 weight"
    assert label("hires.upscaler", "hires", "Hires", {"upscaler": "Hires upscaler"}) \
        == "Hires upscaler"
    assert label("animatediff.motion_lora.m", "animatediff", "AnimateDiff",
                 {"motion_lora": "Motion LoRA"}) == "Motion LoRA m"
    assert label("lora", "lora", "LoRA") == "LoRA"
    assert label("loras.x", "lora", "LoRA") is None


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abc xyz:'_", min_size=1, max_size=200), st.integers(40, 600))
def test_a_blank_cells_reason_always_fits_its_cell(reason: str, side: int) -> None:
    """The error in a blank cell shrinks to fit; only at 8 px is the rest left to the
    metadata, marked with "…"; otherwise every word is there."""
    fnt = grid_draw.font_for_cell(side, side)
    small, lines = grid_draw.fit_text(fnt, reason, side, side)
    assert len(lines) * grid_draw.line_height(small) <= max(side, grid_draw.line_height(small))
    if not lines[-1].endswith("…"):
        assert " ".join(lines).split() == reason.split()
    else:
        assert small.size == grid_draw.MIN_CELL_FONT


def test_a_long_error_in_a_big_cell_is_shown_whole() -> None:
    error = "failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    fnt = grid_draw.font_for_cell(512, 512)
    small, lines = grid_draw.fit_text(fnt, error, 500, 500)
    assert small.size == fnt.size and " ".join(lines).split() == error.split()
