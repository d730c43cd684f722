"""Benchmark: the gallery at 10,000 images against 100, built and opened in headless Chromium
(issue 15: "pages stay fast at 10,000 images").

For each size, a real ledger of N tiny PNGs (64x64, in 4 jobs, with cfg and seed axes and an
infotext each) is written, then measured:

- build: ``build_gallery`` from the ledger, first (every thumbnail made) and again (all
  cached: what each later run pays);
- page: the bytes of ``index.html`` (style, script and data inlined) and of the thumbnails;
- open: Chromium from navigation start to the first page of cards drawn (``#images`` in the
  DOM, measured in the page), then each card's thumbnail loaded in the first viewport;
- filter: typing a prompt word into the search box until the cards are redrawn.

    python bench/bench_gallery.py                 # 100 vs 10000
    python bench/bench_gallery.py --sizes 100 1000 10000

Needs Chromium, chromedriver and selenium (``requirements-dev.txt``), as the browser tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout, installed or not


def make_night(root: Path, n: int) -> None:
    """A ledger of ``n`` done tiny images in 4 jobs."""
    from PIL import Image

    from render.ledger import Ledger
    from render.tasks import Task

    with Ledger(root) as ledger:
        for i in range(n):
            job = f"job{i % 4}"
            cfg, seed = 4 + i % 5, i // 20
            task = Task(job=job, index=i, prompt=f"a cabin number {i} in {job}", negative="",
                        seed=seed, model="m", width=64, height=64, steps=20, cfg=float(cfg),
                        sampler="Euler a", axes={"cfg": cfg})
            task = dataclasses.replace(task, id=task.compute_id())
            path = root / job / f"{i:05}-{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (i % 256, (i // 256) % 256, 128)).save(path)
            ledger.record_done(task, [path], {}, f"{task.prompt}\nSteps: 20, Sampler: Euler a, "
                                                 f"CFG scale: {cfg}, Seed: {seed}, Size: 64x64")


def measure(n: int, work: Path, driver) -> dict[str, float]:
    from render.gallery import THUMBS, build_gallery
    from render.ledger import Ledger
    from render.testing import browser

    root = work / f"n{n}"
    make_night(root, n)
    with Ledger(root) as ledger:
        t0 = time.perf_counter()
        page = build_gallery(root, ledger)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_gallery(root, ledger)
        again = time.perf_counter() - t0
    thumbs = sum(p.stat().st_size for p in (root / THUMBS).iterdir())
    opens, thumbs_loaded, filters = [], [], []
    for _ in range(3):
        driver.get("about:blank")
        driver.get(browser.file_url(page))
        drawn = driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
        opens.append(drawn)
        t0 = time.perf_counter()
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const imgs = [...document.querySelectorAll('.card img')].filter(i => {"
            "  const r = i.getBoundingClientRect(); return r.top < innerHeight; });"
            "Promise.all(imgs.map(i => i.complete ? 1 : new Promise(r => {"
            "  i.onload = i.onerror = r; }))).then(() => done(imgs.length));")
        thumbs_loaded.append(drawn + (time.perf_counter() - t0) * 1000)
        filters.append(driver.execute_script(
            "const box = document.getElementById('text-filter');"
            "const t0 = performance.now(); box.value = 'number 77';"
            "box.dispatchEvent(new Event('change'));"
            "document.querySelectorAll('.card').length; return performance.now() - t0;"))
    errors = browser.console_errors(driver)
    if errors:
        raise SystemExit(f"console errors at {n} images: {errors[:3]}")
    return {"images": n, "build_first_s": first, "build_again_s": again,
            "page_kb": page.stat().st_size / 1024, "thumbs_kb": thumbs / 1024,
            "open_ms": min(opens), "viewport_ms": min(thumbs_loaded),
            "filter_ms": min(filters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000])
    args = parser.parse_args()
    from render.testing import browser

    why = browser.missing()
    if why:
        raise SystemExit(why)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, browser.chromium() as driver:
        for n in args.sizes:
            rows.append(measure(n, Path(tmp), driver))
            print(rows[-1], flush=True)
    base = rows[0]
    print(f"\n{'images':>7} {'build':>8} {'rebuild':>8} {'page':>9} {'thumbs':>9} "
          f"{'open':>8} {'viewport':>9} {'filter':>8}")
    for r in rows:
        print(f"{r['images']:>7} {r['build_first_s']:>7.2f}s {r['build_again_s']:>7.2f}s "
              f"{r['page_kb']:>7.0f}kB {r['thumbs_kb']:>7.0f}kB {r['open_ms']:>6.0f}ms "
              f"{r['viewport_ms']:>7.0f}ms {r['filter_ms']:>6.0f}ms")
    for r in rows[1:]:
        print(f"{r['images']} vs {base['images']} images: page x"
              f"{r['page_kb'] / base['page_kb']:.1f}, open x{r['open_ms'] / base['open_ms']:.1f}, "
              f"first viewport x{r['viewport_ms'] / base['viewport_ms']:.1f}, "
              f"rebuild x{r['build_again_s'] / base['build_again_s']:.1f}")


if __name__ == "__main__":
    main()
