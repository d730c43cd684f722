"""Grid sheets from ledger rows: layout arithmetic, Z sheets, seeds, partial runs, pages."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
from PIL import Image

from render import grids
from render.errors import Location
from render.grids import EMPTY_FILL, build_grids, plan_grids
from render.ledger import Ledger, LedgerRow
from render.tasks import Job, OutputSpec, Task

CW, CH = 40, 30


def make_job(axes: tuple[str, ...]) -> Job:
    return Job(name="demo", file="job.yaml", base_dir=Path("."), where=Location("job.yaml"),
               output=OutputSpec(), grid_axes=axes)


def colour(n: int) -> tuple[int, int, int]:
    return ((n * 67) % 200 + 30, (n * 131) % 200 + 30, (n * 29) % 200 + 30)


def render_rows(tmp_path: Path, axes: dict[str, list[object]], seeds: list[int] = [1],  # noqa: B006
                fail: set[int] = frozenset(), skip: set[int] = frozenset(),  # type: ignore[assignment]
                delete: set[int] = frozenset(), size=(CW, CH)) -> list[LedgerRow]:  # type: ignore[assignment]
    """Tasks in the job order (grid product, then seeds), recorded in a real ledger."""
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    index = 0
    with Ledger(out) as ledger:
        for combo in itertools.product(*axes.values()):
            for seed in seeds:
                values = dict(zip(axes, combo, strict=True))
                task = Task(job="demo", index=index, prompt=f"p {values}", negative="",
                            seed=seed, model="m", width=size[0], height=size[1], steps=4,
                            cfg=float(values.get("cfg", 7)), sampler="Euler a", axes=values)
                task = dataclasses.replace(task, id=task.compute_id())
                if index in fail:
                    ledger.record_failed(task, "RuntimeError: out of memory\ntraceback...")
                elif index not in skip:
                    path = out / f"{index:05}.png"
                    Image.new("RGB", size, colour(index)).save(path)
                    ledger.record_done(task, [path], {}, "info")
                    if index in delete:
                        path.unlink()
                index += 1
        return ledger.rows(job="demo")


def centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


def has_ink(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    lo, _ = image.crop(box).convert("L").getextrema()
    return lo < 128


def test_complete_xy_grid_layout(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"cfg": [5, 7, 9], "sampler": ["Euler a", "DPM++ 2M"]})
    job = make_job(("cfg", "sampler"))
    plan = plan_grids(rows, job)
    assert plan is not None
    layout = plan.layout
    assert plan.x_labels == ["cfg: 5", "cfg: 7", "cfg: 9"]
    assert plan.y_labels == ["sampler: Euler a", "sampler: DPM++ 2M"]
    (path,) = build_grids(rows, job, tmp_path / "out" / "demo")
    assert path == tmp_path / "out" / "demo" / "grids" / "demo-grid.png"
    with Image.open(path) as im:
        sheet = im.convert("RGB")
    # the sheet is exactly the label margins plus the cells
    assert sheet.size == (layout.left + 3 * CW, layout.title + layout.top + 2 * CH)
    assert layout.left > 0 and layout.top > 0 and layout.title > 0
    # task index = x * 2 + y (cfg outer, sampler inner in the job's product order)
    for x, y in itertools.product(range(3), range(2)):
        box = layout.cell_box(x, y)
        assert sheet.getpixel(centre(box)) == colour(x * 2 + y)
        assert has_ink(sheet, (box[0], layout.title, box[2], layout.title + layout.top))
        assert has_ink(sheet, (0, box[1], layout.left, box[3]))
    assert has_ink(sheet, (0, 0, sheet.width, layout.title))        # the title line


def test_one_axis_is_a_single_row(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"steps": [10, 20, 30, 40]})
    job = make_job(("steps",))
    (path,) = build_grids(rows, job, tmp_path)
    layout = plan_grids(rows, job).layout  # type: ignore[union-attr]
    with Image.open(path) as sheet:
        assert layout.left == 0
        assert sheet.size == (4 * CW, layout.title + layout.top + CH)


def test_third_axis_gives_a_sheet_per_value(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"cfg": [5, 7], "sampler": ["a", "b"], "steps": [10, 20]})
    paths = build_grids(rows, make_job(("cfg", "sampler", "steps")), tmp_path)
    assert [p.name for p in paths] == ["demo-grid-steps=10.png", "demo-grid-steps=20.png"]
    layout = plan_grids(rows, make_job(("cfg", "sampler", "steps"))).layout  # type: ignore[union-attr]
    with Image.open(paths[1]) as im:
        # index = ((x * 2) + y) * 2 + z with z = 1 on the second sheet
        assert im.convert("RGB").getpixel(centre(layout.cell_box(1, 0))) == colour(5)


def test_a_sheet_per_seed(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"cfg": [5, 7]}, seeds=[11, 12])
    paths = build_grids(rows, make_job(("cfg",)), tmp_path)
    assert [p.name for p in paths] == ["demo-grid-s11.png", "demo-grid-s12.png"]
    layout = plan_grids(rows, make_job(("cfg",))).layout  # type: ignore[union-attr]
    with Image.open(paths[1]) as im:
        assert im.convert("RGB").getpixel(centre(layout.cell_box(1, 0))) == colour(3)


def test_partial_runs_draw_empty_labelled_cells(tmp_path: Path) -> None:
    # index: 0 done, 1 failed, 2 file deleted, 3 never rendered (not in the ledger)
    rows = render_rows(tmp_path, {"cfg": [5, 7], "sampler": ["a", "b"]}, fail={1},
                       delete={2}, skip={3})
    job = make_job(("cfg", "sampler"))
    (path,) = build_grids(rows, job, tmp_path)
    layout = plan_grids(rows, job).layout  # type: ignore[union-attr]
    with Image.open(path) as im:
        sheet = im.convert("RGB")
    assert sheet.size == layout.size == (layout.left + 2 * CW, layout.title + layout.top + 2 * CH)
    assert sheet.getpixel(centre(layout.cell_box(0, 0))) == colour(0)
    for x, y in [(0, 1), (1, 0), (1, 1)]:
        box = layout.cell_box(x, y)
        assert sheet.getpixel((box[0] + 3, box[1] + 3)) == EMPTY_FILL
        assert has_ink(sheet, box)  # "failed: ..." / "file missing" / "not rendered"


def test_missing_row_of_a_whole_value_still_gives_a_sheet(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"cfg": [5, 7]}, skip={0})
    paths = build_grids(rows, make_job(("cfg",)), tmp_path)
    assert len(paths) == 1


def test_big_sheets_are_split_into_pages(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"cfg": [1, 2, 3, 4, 5], "sampler": ["a", "b", "c"]})
    job = make_job(("cfg", "sampler"))
    full = plan_grids(rows, job).layout  # type: ignore[union-attr]
    max_side = full.left + 2 * CW + 5                 # two columns per page
    max_pixels = (full.left + 2 * CW) * (full.title + full.top + 2 * CH)  # two rows
    plan = plan_grids(rows, job, max_side=max_side, max_pixels=max_pixels)
    assert plan is not None and (plan.layout.cols, plan.layout.rows) == (2, 2)
    paths = build_grids(rows, job, tmp_path, max_side=max_side, max_pixels=max_pixels)
    assert [p.name for p in paths] == [f"demo-grid-p{n}.png" for n in range(1, 7)]
    sizes = []
    for path in paths:
        with Image.open(path) as im:
            sizes.append(im.size)
            assert im.width <= max_side and im.width * im.height <= max_pixels
    lay = plan.layout
    w = [lay.left + 2 * CW, lay.left + 2 * CW, lay.left + CW]
    h = [lay.title + lay.top + 2 * CH, lay.title + lay.top + CH]
    assert sizes == [(w[c], h[r]) for r in range(2) for c in range(3)]
    # page 3 (third column block, first row block) shows cfg 5 / sampler a: index 12
    with Image.open(paths[2]) as im:
        assert im.convert("RGB").getpixel(centre(lay.cell_box(0, 0))) == colour(12)


def test_cells_fit_the_largest_image(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"size": ["s"]}, size=(64, 48))
    rows += render_rows(tmp_path / "b", {"size": ["t"]}, size=(32, 32))
    rows = [dataclasses.replace(r, index=i, id=f"{i}{r.id}") for i, r in enumerate(rows)]
    plan = plan_grids(rows, make_job(("size",)))
    assert plan is not None and (plan.layout.cell_w, plan.layout.cell_h) == (64, 48)


def test_no_axes_no_sheet(tmp_path: Path) -> None:
    rows = render_rows(tmp_path, {"cfg": [5]})
    assert build_grids(rows, make_job(()), tmp_path) == []
    assert build_grids([], make_job(("cfg",)), tmp_path) == []


@pytest.mark.parametrize("value", ["../../x", "a/b", "CON", "x" * 400])
def test_hostile_axis_values_make_safe_sheet_names(tmp_path: Path, value: str) -> None:
    rows = render_rows(tmp_path, {"cfg": [5], "sampler": ["a"], "style": [value]})
    (path,) = build_grids(rows, make_job(("cfg", "sampler", "style")), tmp_path / "d")
    assert path.parent == tmp_path / "d" / "grids"
    assert len(path.name.encode()) <= 255


def test_label_wrapping_is_bounded() -> None:
    font = grids._font(14)
    lines = grids._wrap(font, "word " * 200, 100)
    assert len(lines) == grids.MAX_LABEL_LINES and lines[-1].endswith("…")
    assert all(grids._text_w(font, line) <= 100 for line in lines)
