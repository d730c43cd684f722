"""The static gallery: every image and failure, thumbnails, relative links, escaping."""

from __future__ import annotations

import dataclasses
import html
import re
from pathlib import Path
from urllib.parse import unquote

from PIL import Image

from render.gallery import THUMB_SIZE, THUMBS, build_gallery, thumbnail
from render.ledger import Ledger
from render.tasks import Task
from render.testing.checks import gallery_data


def make_task(index: int, job: str = "demo", **kw: object) -> Task:
    base: dict[str, object] = dict(
        job=job, index=index, prompt=f"{job} {index}", negative="", seed=index, model="m",
        width=32, height=32, steps=4, cfg=7.0, sampler="Euler a",
    )
    base.update(kw)
    task = Task(**base)  # type: ignore[arg-type]
    return dataclasses.replace(task, id=task.compute_id())


def fill(tmp_path: Path) -> tuple[Ledger, list[Path], list[Task]]:
    root = tmp_path / "out"
    ledger = Ledger(root)
    images = []
    for job in ("cabins", "portraits & <friends>"):
        for i in range(3):
            path = root / job / f"{i:05} #{i}?.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 32), (i * 60, 100, 150)).save(path)
            task = make_task(i, job=job)
            ledger.record_done(task, [path], {}, f'{task.prompt} "q" <script>x</script>\nSteps: 4')
            images.append(path)
    failed = [make_task(9, job="cabins"), make_task(8, job="new-job")]
    ledger.record_failed(failed[0], "RuntimeError: <b>CUDA</b> out of memory & more")
    ledger.record_failed(failed[1], "ValueError: bad")
    return ledger, images, failed


def links(page: str) -> set[str]:
    """Every file the page points to: markup links and the data's file fields."""
    found = {unquote(html.unescape(m)) for m in re.findall(r'(?:href|src)="([^"]+)"', page)}
    data = gallery_data(page)
    for item in data["images"] + [s for job in data["jobs"] for s in job["sheets"]]:
        found.update(unquote(item[k]) for k in ("f", "t") if k in item)
        found.update(unquote(href) for _name, href in item.get("e", []))
    return found


def test_gallery_lists_every_image_sheet_and_failure(tmp_path: Path) -> None:
    ledger, images, failed = fill(tmp_path)
    root = ledger.root
    sheet = root / "cabins" / "grids" / "cabins-grid.png"
    sheet.parent.mkdir(parents=True)
    Image.new("RGB", (400, 300), "white").save(sheet)
    elsewhere = tmp_path / "other-root" / "x" / "grids" / "x-grid.png"
    elsewhere.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), "white").save(elsewhere)
    ledger.record_sheets("cabins", [sheet])
    ledger.record_sheets("x", [elsewhere])
    path = build_gallery(root, ledger)
    ledger.close()
    assert path == root / "index.html"
    page = path.read_text(encoding="utf-8")
    data = gallery_data(page)
    found = links(page)
    for image in images:
        assert image.relative_to(root).as_posix() in found
    assert "cabins/grids/cabins-grid.png" in found
    assert not any("other-root" in link for link in found)
    assert [j["name"] for j in data["jobs"] if j["sheets"]] == ["cabins"]
    thumbs = [p for p in found if p.startswith(f"{THUMBS}/")]
    assert len(thumbs) == len(images) + 1
    for thumb in thumbs:
        with Image.open(root / thumb) as im:
            assert im.format == "JPEG" and max(im.size) <= 2 * THUMB_SIZE
    for item in data["images"]:
        with Image.open(root / unquote(item["t"])) as im:
            assert im.size == (48, 32)                  # the image's own size: never enlarged
    # failures with their errors, also of a job without images
    errors = {f["err"] for f in data["failed"]}
    assert errors == {"RuntimeError: <b>CUDA</b> out of memory & more", "ValueError: bad"}
    assert failed[1].id[:12] in {f["id"] for f in data["failed"]}
    assert data["total_done"] == 6 and data["total_failed"] == 2
    assert "6 images, 2 failed" in page
    # everything user-made is escaped: no markup from prompts, errors or job names
    assert "<script>x" not in page and "<b>" not in page
    assert page.count("</script>") == 2                 # the data block's and the script's
    assert "\\u003cscript\\u003ex" in page
    assert "portraits & <friends>" in {j["name"] for j in data["jobs"]}
    assert any('"q" <script>x</script>' in im["x"] for im in data["images"])
    # links are relative and percent-encoded
    assert not any(link.startswith("/") for link in found)
    assert "%23" in page and "%3F" in page                              # '#' and '?' in names


def test_one_image_is_counted_in_the_singular(tmp_path: Path) -> None:
    root = tmp_path / "out"
    with Ledger(root) as ledger:
        path = root / "one.png"
        Image.new("RGB", (8, 8)).save(path)
        ledger.record_done(make_task(0), [path], {}, "one")
        page = build_gallery(root, ledger).read_text(encoding="utf-8")
    assert "1 image, 0 failed" in page and "1 images" not in page


def test_sheets_of_jobs_not_in_this_run_stay_listed(tmp_path: Path) -> None:
    """The sheets come from the ledger: a run of another job (``--only``) keeps them, and a
    sheet deleted by the user drops out instead of leaving a broken link."""
    ledger, _images, _ = fill(tmp_path)
    root = ledger.root
    keep, gone = (root / "cabins" / "grids" / f"cabins-grid-{n}.png" for n in ("a", "b"))
    keep.parent.mkdir(parents=True)
    for sheet in (keep, gone):
        Image.new("RGB", (60, 40), "white").save(sheet, pnginfo=_parameters("sheet text"))
    ledger.record_sheets("cabins", [keep, gone])
    gone.unlink()
    data = gallery_data(build_gallery(root, ledger).read_text(encoding="utf-8"))
    ledger.close()
    cabins = next(j for j in data["jobs"] if j["name"] == "cabins")
    assert [s["n"] for s in cabins["sheets"]] == ["cabins-grid-a.png"]
    assert cabins["sheets"][0]["x"] == "sheet text"


def _parameters(text: str):  # noqa: ANN202 - a PngInfo
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_thumbnails_are_reused_and_pruned(tmp_path: Path) -> None:
    ledger, images, _ = fill(tmp_path)
    root = ledger.root
    build_gallery(root, ledger)
    thumb = thumbnail(images[0], root)
    assert thumb is not None
    mtime = thumb.stat().st_mtime_ns
    gone = images[1].with_name("gone.png")
    images[1].rename(gone)                              # a thumbnail of no ledger image
    stale = thumbnail(gone, root)
    assert stale is not None and stale.exists()
    foreign = root / THUMBS / "holiday.jpg"             # the user's own file, not ours
    Image.new("RGB", (8, 8)).save(foreign)
    build_gallery(root, ledger)
    assert thumb.stat().st_mtime_ns == mtime           # not rebuilt: the image is older
    assert not stale.exists()                           # no longer referenced
    assert foreign.exists()                             # never ours: never pruned
    ledger.close()


def test_a_foreign_index_html_is_left_alone(tmp_path: Path) -> None:
    """Issue 12: an output root that already holds somebody's index.html keeps it; the
    gallery goes to render-gallery.html, and is rewritten there on the next run."""
    ledger, _images, _ = fill(tmp_path)
    root = ledger.root
    (root / "index.html").write_text("<html>my homepage</html>")
    path = build_gallery(root, ledger)
    assert path == root / "render-gallery.html"
    assert (root / "index.html").read_text() == "<html>my homepage</html>"
    assert build_gallery(root, ledger) == path
    ledger.close()


def test_missing_files_and_non_images(tmp_path: Path) -> None:
    root = tmp_path / "out"
    with Ledger(root) as ledger:
        gone, video = make_task(0), make_task(1)
        ledger.record_done(gone, [root / "gone.png"], {}, "gone")
        (root / "clip.mp4").write_bytes(b"\0\0\0 ftypisom")
        ledger.record_done(video, [root / "clip.mp4"], {}, "video")
        page = build_gallery(root, ledger).read_text(encoding="utf-8")
    kinds = {im["n"]: (im["k"], im["f"]) for im in gallery_data(page)["images"]}
    assert kinds["gone.png"][0] == "missing"
    assert kinds["clip.mp4"] == ("file", "clip.mp4")   # not decodable here: linked as a file


def test_temp_and_hidden_files_never_appear(tmp_path: Path) -> None:
    ledger, _, _ = fill(tmp_path)
    (ledger.root / "cabins" / ".00001.tmp-1-abcdef.png").write_bytes(b"x")
    page = build_gallery(ledger.root, ledger).read_text(encoding="utf-8")
    ledger.close()
    assert ".tmp-" not in page


def test_pages_and_thumbnails_of_earlier_versions_are_still_ours(tmp_path: Path) -> None:
    """Issue 12 (found reviewing): pages and thumbnails written before they carried the
    mark are recognised by how render wrote them, so an upgrade keeps updating index.html
    instead of leaving it stale and starting render-gallery.html."""
    import os

    ledger, images, _ = fill(tmp_path)
    root = ledger.root
    (root / "index.html").write_text(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        "<title>render: out</title><style>\n"
        "body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}\n"
        "</style></head><body><h1>out</h1></body></html>\n")
    old = thumbnail(images[0], root)
    assert old is not None
    Image.new("RGB", (8, 8)).save(old, format="JPEG")          # unmarked, as before
    os.utime(old, (1, 1))                                       # older than its image
    assert build_gallery(root, ledger) == root / "index.html"
    assert 'content="render gallery"' in (root / "index.html").read_text()
    assert not (root / "render-gallery.html").exists()
    with Image.open(old) as im:
        assert im.info.get("comment") == b"render gallery thumbnail" and im.size != (8, 8)
    ledger.close()


def test_a_big_image_gets_a_256_pixel_thumbnail_made_again_only_when_it_changes(tmp_path):
    import os

    root = tmp_path / "out"
    big = root / "big.png"
    big.parent.mkdir(parents=True)
    Image.new("RGB", (1024, 640), "teal").save(big)
    thumb = thumbnail(big, root)
    assert thumb is not None
    with Image.open(thumb) as im:
        assert im.size == (256, 160) and im.format == "JPEG"
    made = thumb.stat().st_mtime_ns
    assert thumbnail(big, root) == thumb and thumb.stat().st_mtime_ns == made
    Image.new("RGB", (1024, 640), "red").save(big)
    os.utime(big, ns=(made + 10**9, made + 10**9))          # the image changed after it
    thumbnail(big, root)
    with Image.open(thumb) as im:
        assert im.getpixel((128, 80))[0] > 200              # made again: now red
