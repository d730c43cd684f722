"""render.aside: what render sets aside is never overwritten, and moves with its journals."""

from __future__ import annotations

from pathlib import Path

from render.aside import move_aside


def test_copies_set_aside_in_one_second_never_overwrite_each_other(tmp_path: Path) -> None:
    db = tmp_path / "render.db"
    moved = []
    for content in ("first", "second"):
        db.write_text(content)
        (tmp_path / "render.db-wal").write_text(f"{content} journal")
        moved.append(move_aside(db, "corrupt", companions=("-wal", "-shm")))
    assert moved[0] != moved[1] and not db.exists()
    assert [p.read_text() for p in moved] == ["first", "second"]
    for target in moved:   # each journal beside its database, under the same tail
        wal = target.with_name(target.name.replace("render.db", "render.db-wal", 1))
        assert wal.read_text() == f"{target.read_text()} journal"
    assert not (tmp_path / "render.db-shm").exists()   # absent companions are no error


def test_keep_suffix_keeps_the_file_type_visible(tmp_path: Path) -> None:
    image = tmp_path / "00001-7.png"
    image.write_bytes(b"edited")
    moved = move_aside(image, "changed", keep_suffix=True)
    assert moved.suffix == ".png" and moved.name.startswith("00001-7.changed-")
    assert moved.read_bytes() == b"edited"
