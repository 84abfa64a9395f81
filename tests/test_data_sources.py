"""Image sources: Kaggle competition folders, plain folders and CSV lists, sorted and validated."""
from __future__ import annotations

from pathlib import Path

import pytest

from kernel.data.sources import (
    Record,
    csv_source,
    folder_source,
    kaggle_path,
    kaggle_split,
    open_source,
    parse_shard,
    shard,
)
from kernel.errors import KernelError

IDS = ["f00dbabe00000001", "0123456789abcdef", "abc0000000000002", "0120000000000003"]


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\xff\xd8")
    return p


def _competition(root: Path) -> Path:
    for split in ("train", "test", "index"):
        for i in IDS:
            _touch(kaggle_path(root, split, i))
    (root / "train.csv").write_text("id,landmark_id\n" + "".join(f"{i},{n}\n" for n, i in enumerate(IDS)))
    (root / "sample_submission.csv").write_text("id,landmarks\n" + "".join(f"{i},\n" for i in IDS))
    return root


def test_kaggle_split_walks_abc_layout_sorted(tmp_path):
    root = _competition(tmp_path / "comp")
    recs = kaggle_split(root, "test")
    assert [r.id for r in recs] == sorted(IDS)
    assert all(isinstance(r, Record) and Path(r.path) == kaggle_path(root, "test", r.id) for r in recs)
    assert Path(recs[0].path).relative_to(root).parts[:4] == ("test", "0", "1", "2")
    assert [r.id for r in kaggle_split(root, "index")] == sorted(IDS)


def test_kaggle_ids_listed_without_a_file_become_records(tmp_path, caplog):
    root = _competition(tmp_path / "comp")
    with (root / "sample_submission.csv").open("a") as fh:
        fh.write("ffff000000000009,\n")
    recs = kaggle_split(root, "test")
    assert recs[-1] == Record("ffff000000000009", str(kaggle_path(root, "test", "ffff000000000009")))
    assert not Path(recs[-1].path).exists()  # decoding will report it as a missing file
    assert "no image file" in caplog.text


def test_missing_split_folder_names_the_path(tmp_path):
    root = _competition(tmp_path / "comp")
    with pytest.raises(KernelError, match=r"comp/valid.*not found"):
        kaggle_split(root, "valid")


def test_folder_source_recursive_skips_hidden_and_non_images(tmp_path):
    d = tmp_path / "imgs"
    _touch(d / "b.jpg")
    _touch(d / "sub" / "a.PNG")
    _touch(d / ".hidden.jpg")
    _touch(d / ".cache" / "c.jpg")
    (d / "notes.txt").write_text("x")
    assert [r.id for r in folder_source(d)] == ["a", "b"]


def test_folder_source_duplicate_ids(tmp_path):
    _touch(tmp_path / "x" / "a.jpg")
    _touch(tmp_path / "x" / "sub" / "a.png")
    with pytest.raises(KernelError, match="'a' appears twice"):
        folder_source(tmp_path / "x")
    with pytest.raises(KernelError, match="nowhere.*not found"):
        folder_source(tmp_path / "nowhere")


def test_csv_source_relative_and_absolute_paths(tmp_path):
    img = _touch(tmp_path / "data" / "q.jpg")
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "l.csv"
    csv.write_text(f"id,path\nz1,../data/q.jpg\na1,{img}\n")
    recs = csv_source(csv)
    assert [r.id for r in recs] == ["a1", "z1"]
    assert Path(recs[1].path).resolve() == img.resolve()


@pytest.mark.parametrize("text,match", [
    ("id,file\na,b.jpg\n", "column 'path' is missing"),
    ("id,path\na,x.jpg\na,y.jpg\n", "'a' appears twice"),
    ("id,path\n,x.jpg\n", "line 2: empty id"),
])
def test_csv_source_errors_name_file_and_field(tmp_path, text, match):
    p = tmp_path / "l.csv"
    p.write_text(text)
    with pytest.raises(KernelError, match=match) as exc:
        csv_source(p)
    assert str(p) in str(exc.value)


def test_open_source_detects_the_kind(tmp_path):
    root = _competition(tmp_path / "comp")
    assert len(open_source(root, "train")) == 4
    _touch(tmp_path / "plain" / "p1.jpg")
    assert [r.id for r in open_source(tmp_path / "plain", "test")] == ["p1"]
    (tmp_path / "l.csv").write_text("id,path\nk,plain/p1.jpg\n")
    assert [r.id for r in open_source(tmp_path / "l.csv", "whatever")] == ["k"]
    with pytest.raises(KernelError, match="not found"):
        open_source(tmp_path / "absent", "test")
    with pytest.raises(KernelError, match="split folder 'index' not found"):
        (root / "index").rename(root / "index_old")
        open_source(root, "index")


def test_shards_partition_the_records():
    recs = [Record(f"{i:03d}", f"{i}.jpg") for i in range(10)]
    parts = [shard(recs, i, 3) for i in range(3)]
    assert sorted(r for p in parts for r in p) == recs
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(KernelError, match="--shard"):
            parse_shard(bad)
