"""The gallery in a real headless Chromium, as a user meets it in the morning (issue 15).

A real tiny run (a grid job, an animation, a job whose prompt is hostile markup and whose
second task fails) writes ``index.html``; the browser opens it from ``file://`` and the tests
click through it: every image listed, the sheets, filters by job, axis and text, the full
view with its infotext and copy button, the comparison, the failures; no console error, no
network request, no markup from a prompt executed. Screenshots go to ``$RENDER_SCREENSHOTS``
(default: the test's temp folder). Skipped where Chromium is not installed, unless
``RENDER_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets): then a missing browser fails.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.ledger import Ledger
from render.tasks import Task
from render.testing import browser

FRAMES = Path(__file__).parent / "fixtures" / "frames_plugin"
HOSTILE = ('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> '
           '& "quoted" cabin')
FAIL_SEED_2 = '''
from render.api import hookimpl


@hookimpl
def task_inputs(task, pipe):
    if task.job == "hostile" and task.seed == 2:
        raise RuntimeError("injected <b>fault</b> & more")
'''

needs_browser = pytest.mark.skipif(
    browser.missing() is not None and os.environ.get("RENDER_REQUIRE_BROWSER") != "1",
    reason=f"no headless Chromium here: {browser.missing()}")
pytestmark = needs_browser


@pytest.fixture(scope="module")
def night(tmp_path_factory, kit) -> Path:
    """The output root of a real run: 8 grid images, one GIF, a hostile job with a failure."""
    import torch

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("gallery")
    plugins = work / "plugins"
    plugins.mkdir()
    (plugins / "fail_seed_2.py").write_text(FAIL_SEED_2)
    job = work / "job.yaml"
    job.write_text(f"""
version: 1
model_dirs: [{kit}]
output: {{dir: "out/{{job}}"}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}}
jobs:
  - name: cabins
    prompt: "a {{red|blue}} cabin in the woods"
    wildcards: combinatorial
    seeds: [1, 2]
    grid: {{cfg: [5, 9]}}
  - name: lantern
    prompt: a paper lantern
    frames: {{count: 4, fps: 4}}
    output: {{format: gif, grid: false}}
  - name: hostile
    prompt: '{HOSTILE}'
    seeds: [1, 2]
""")
    code = main([str(job), "--plugins-dir", str(plugins), "--plugins-dir", str(FRAMES),
                 "--batch-size", "2", "-q"])
    assert code == 1          # the injected failure
    return work / "out"


@pytest.fixture(scope="module")
def driver():
    with browser.chromium() as d:
        yield d


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("RENDER_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(driver, root: Path, hash_: str = "") -> None:
    browser.console_errors(driver)
    browser.requests(driver)                                   # start both logs afresh
    driver.get(browser.file_url(root / "index.html") + hash_)
    wait(driver, lambda: driver.find_elements("css selector", "#images"))


def wait(driver, predicate, timeout: float = 20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def css(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def card_names(driver) -> list[str]:
    return [c.get_attribute("data-name") for c in css(driver, ".card")]


def select(driver, selector: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(css(driver, selector)[0]).select_by_value(value)


def clean(driver) -> None:
    """No console error, no request off this machine, no script from user text ran."""
    assert browser.console_errors(driver) == []
    remote = [u for u in browser.requests(driver)      # (chrome:// is the browser's own)
              if u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")]
    assert remote == []
    assert driver.execute_script("return window.pwned === undefined")


def done_rows(root: Path) -> list:
    with Ledger(root) as ledger:
        return [r for r in ledger.rows() if r.status == "done"]


def test_every_image_and_sheet_of_the_run_is_listed(night, driver, shots):
    open_page(driver, night)
    rows = done_rows(night)
    assert len(rows) == 8 + 1 + 1
    assert sorted(card_names(driver)) == sorted(r.paths[0].name for r in rows)
    with Ledger(night) as ledger:
        sheets = sorted(p.name for p in ledger.sheets())
    assert sheets and sorted(s.get_attribute("data-name") for s in css(driver, ".sheet")) == sheets
    summary = css(driver, "#summary")[0].text
    assert summary.startswith("10 images, 1 failed, 3 jobs")
    # real thumbnails: each card's picture has loaded, at the image's own size (64 px)
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    sizes = wait(driver, lambda: (lambda s: s if all(w > 0 for w, _ in s) else None)(
        driver.execute_script("return [...document.querySelectorAll('.card img')]"
                              ".map(i => [i.complete ? i.naturalWidth : 0, i.naturalHeight])")))
    assert len(sizes) == 10 and all(w == 64 for w, _ in sizes)
    # the animation plays: its card shows the GIF itself, not the still thumbnail
    (anim,) = [c for c in css(driver, ".card") if c.get_attribute("data-name").endswith(".gif")]
    src = anim.find_element("css selector", "img").get_attribute("src")
    assert src.endswith(".gif")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shots / "gallery.png"))
    clean(driver)


def test_filters_by_job_axis_and_text(night, driver, shots):
    open_page(driver, night)
    select(driver, "#job-filter", "cabins")
    assert len(card_names(driver)) == 8
    axes = {s.get_attribute("data-axis") for s in css(driver, ".axis-filter")}
    assert {"cfg", "seed"} <= axes
    select(driver, '.axis-filter[data-axis="cfg"]', "9")
    names = card_names(driver)
    assert len(names) == 4
    assert all("CFG scale: 9" in metadata.read_metadata(p)[0]
               for p in (night / "cabins").glob("*.png") if p.name in names)
    assert "a.cfg=9" in driver.current_url and "job=cabins" in driver.current_url
    search = css(driver, "#text-filter")[0]
    search.send_keys("blue\n")
    assert len(card_names(driver)) == 2
    driver.save_screenshot(str(shots / "gallery-filtered.png"))
    # the view is in the URL: a reload keeps it
    driver.refresh()
    wait(driver, lambda: css(driver, "#images"))
    assert len(card_names(driver)) == 2
    css(driver, "#clear")[0].click()
    assert len(card_names(driver)) == 10
    # all jobs: the seed filter spans them
    select(driver, '.axis-filter[data-axis="seed"]', "2")
    assert len(card_names(driver)) == 4          # cabins' 4 at seed 2; hostile's seed 2 failed
    assert len(css(driver, "li.failure")) == 1
    clean(driver)


def test_full_view_shows_the_infotext_and_copies_it(night, driver, shots):
    open_page(driver, night, "#job=hostile")
    driver.execute_cdp_cmd("Browser.grantPermissions", {
        "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    (card,) = css(driver, ".card")
    card.find_element("css selector", ".thumb").click()
    overlay = css(driver, "#overlay")[0]
    assert overlay.is_displayed()
    (row,) = [r for r in done_rows(night) if r.job == "hostile"]
    shown = overlay.find_element("css selector", "pre.infotext").text
    assert shown == row.infotext.strip() and shown.startswith(HOSTILE)
    img = overlay.find_element("css selector", ".media img")
    assert img.get_attribute("src").endswith(row.paths[0].name)        # the full image
    driver.save_screenshot(str(shots / "gallery-viewer.png"))
    overlay.find_element("css selector", "button.copy").click()
    wait(driver, lambda: overlay.find_element("css selector", "button.copy").text == "Copied")
    copied = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.clipboard.readText().then(done, e => done('error: ' + e));")
    assert copied == row.infotext
    driver.find_element("tag name", "body").send_keys("\ue00c")   # Escape closes
    assert not overlay.is_displayed()
    clean(driver)


def test_compare_shows_two_side_by_side_with_what_differs(night, driver, shots):
    open_page(driver, night, "#job=cabins&a.seed=1&q=red")
    cards = css(driver, ".card")
    assert len(cards) == 2                       # cfg 5 and 9 of one prompt and seed
    compare = css(driver, "#compare")[0]
    assert not compare.is_enabled()
    for n in range(2):
        css(driver, ".card")[n].find_element("css selector", "input.choose").click()
    css(driver, "#compare")[0].click()
    overlay = css(driver, "#overlay")[0]
    panes = overlay.find_elements("css selector", ".compare .pane img")
    assert len(panes) == 2 and panes[0].get_attribute("src") != panes[1].get_attribute("src")
    differs = [r.find_element("css selector", "th").text
               for r in overlay.find_elements("css selector", "tr.differs")]
    assert differs == ["CFG scale"]
    same = [r.find_element("css selector", "th").text
            for r in overlay.find_elements("css selector", "tr.same")]
    assert {"Prompt", "Seed", "Steps", "Sampler"} <= set(same)
    driver.save_screenshot(str(shots / "gallery-compare.png"))
    overlay.find_element("css selector", "button.close").click()
    clean(driver)


def test_failed_tasks_are_listed_with_their_error_as_text(night, driver):
    open_page(driver, night)
    (item,) = css(driver, "li.failure")
    text = item.text
    assert "hostile · #1 · seed 2" in text
    assert "injected <b>fault</b> & more" in text       # shown, not interpreted
    assert item.find_elements("css selector", "b") == []
    clean(driver)


def make_task(index: int, job: str) -> Task:
    task = Task(job=job, index=index, prompt=f"{job} prompt {index}", negative="", seed=index,
                model="m", width=16, height=16, steps=4, cfg=float(5 + index % 3),
                sampler="Euler a")
    return dataclasses.replace(task, id=task.compute_id())


def test_pages_list_every_image_of_a_big_night_once(tmp_path, driver):
    root = tmp_path / "out"
    with Ledger(root) as ledger:
        for i in range(230):
            job = "big" if i < 200 else "small"
            path = root / job / f"{i:05}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (i % 256, 80, 160)).save(path)
            ledger.record_done(make_task(i, job), [path], {"cfg": 5 + i % 3},
                               f"{job} prompt {i}\nSteps: 4, CFG scale: {5 + i % 3}")
        from render.gallery import build_gallery

        build_gallery(root, ledger)
    open_page(driver, root)
    seen: list[str] = []
    while True:
        seen.extend(card_names(driver))
        nxt = css(driver, ".pager .next")[0]
        if not nxt.is_enabled():
            break
        nxt.click()
    assert sorted(seen) == sorted(f"{i:05}.png" for i in range(230)) and len(seen) == 230
    assert "page 3 of 3" in css(driver, ".pager .page")[0].text
    select(driver, ".pager select", "500")
    assert len(card_names(driver)) == 230
    clean(driver)
