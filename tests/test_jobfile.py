"""The YAML loader keeps line/column marks and refuses what yaml.safe_load would hide."""

import pytest

from render.errors import JobError
from render.jobfile import load, load_text, plain, where


def test_marks_point_at_keys_and_items():
    data = load_text("version: 1\njobs:\n  - name: a\n    grid:\n      cfg: [5, seven]\n",
                     "x.yaml")
    assert str(where(data, "version")) == "x.yaml:1:10"
    assert str(where(data["jobs"], 0)) == "x.yaml:3:5"
    assert str(where(data["jobs"][0]["grid"]["cfg"], 1)) == "x.yaml:5:16"
    assert plain(data) == {"version": 1, "jobs": [{"name": "a", "grid": {"cfg": [5, "seven"]}}]}


def test_duplicate_key_is_an_error():
    with pytest.raises(JobError) as info:
        load_text("a: 1\nb: 2\na: 3\n", "d.yaml")
    assert str(info.value) == "d.yaml:3:1: a: duplicate key (first defined at line 1)"


def test_syntax_error_is_located():
    with pytest.raises(JobError) as info:
        load_text("jobs:\n  - name: [a\n", "s.yaml")
    assert str(info.value).startswith("s.yaml:3:1: invalid YAML: ")


def test_unsafe_tags_are_refused():
    with pytest.raises(JobError) as info:
        load_text("a: !!python/object:os.system {}\n", "t.yaml")
    assert "t.yaml:1:4: invalid YAML" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(JobError) as info:
        load(tmp_path / "nope.yaml")
    assert str(info.value).endswith("nope.yaml: job file not found")
