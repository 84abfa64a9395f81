"""The store's bookkeeping of a resumable extraction: which ids are stored, part numbers of shards, merging,
failure files of shards, reading ids alone, and the meta.json of a model."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from kernel import store as kstore
from kernel.errors import KernelError


def _emb(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------- read_ids

def test_read_ids_gives_the_ids_as_str(tmp_path):
    path = kstore.save_split(tmp_path, "m", "test", ["b", "a", "7"], _emb(3))
    ids = kstore.read_ids(path)
    assert ids.tolist() == ["b", "a", "7"] and ids.dtype.kind == "U"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"<html>not found</html>"])
def test_read_ids_of_a_corrupt_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "m" / "test.npz"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(KernelError, match=r"test\.npz: cannot read descriptor file"):
        kstore.read_ids(path)


def test_read_ids_of_a_file_without_embeddings_is_an_error(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, ids=np.array(["a"]))
    with pytest.raises(KernelError, match=r"other\.npz: descriptor file must hold 'ids' and 'embeddings'"):
        kstore.read_ids(path)


# ------------------------------------------------------------------------------------------- stored ids

def test_stored_ids_are_the_split_and_the_readable_shards(tmp_path, caplog):
    kstore.save_split(tmp_path, "m", "test", ["a", "b"], _emb(2))
    kstore.write_part(tmp_path, "m", "test", 0, ["c"], _emb(1))
    kstore.write_part(tmp_path, "m", "test", 1, ["d", "e"], _emb(2))
    bad = kstore.write_part(tmp_path, "m", "test", 2, ["f"], _emb(1))
    bad.write_bytes(bad.read_bytes()[:40])  # the disk filled up mid-write of an earlier run
    with caplog.at_level(logging.WARNING):
        ids = kstore.stored_ids(tmp_path, "m", "test")
    assert ids == {"a", "b", "c", "d", "e"}  # the unreadable shard's id is computed again
    assert "part-000002.npz" in caplog.text and "computed again" in caplog.text


def test_stored_ids_of_a_model_without_descriptors_is_empty(tmp_path):
    assert kstore.stored_ids(tmp_path, "m", "test") == set()


def test_stored_ids_with_an_unreadable_split_file_is_an_error(tmp_path):
    path = kstore.split_path(tmp_path, "m", "test")
    path.parent.mkdir()
    path.write_bytes(b"garbage")
    with pytest.raises(KernelError, match=r"m/test\.npz"):
        kstore.stored_ids(tmp_path, "m", "test")


# ------------------------------------------------------------------------------------------- part numbers

def test_each_shard_numbers_its_parts_in_its_own_range(tmp_path):
    assert kstore.part_offset(None) == 0 and kstore.part_offset((3, 4)) == 3 * kstore.PART_RANGE
    one = kstore.part_offset((1, 2))
    assert kstore.next_part(tmp_path, "m", "test", 0) == 0  # no shards yet
    kstore.write_part(tmp_path, "m", "test", 0, ["a"], _emb(1))
    kstore.write_part(tmp_path, "m", "test", 1, ["b"], _emb(1))
    kstore.write_part(tmp_path, "m", "test", one, ["c"], _emb(1))
    assert kstore.next_part(tmp_path, "m", "test", 0) == 2
    assert kstore.next_part(tmp_path, "m", "test", one) == one + 1
    assert kstore.next_part(tmp_path, "m", "test", kstore.part_offset((2, 3))) == 2 * kstore.PART_RANGE


# ------------------------------------------------------------------------------------------- merging

def test_merge_parts_keeps_the_previous_split_and_sorts_by_id(tmp_path):
    old = _emb(2, seed=1)
    kstore.save_split(tmp_path, "m", "test", ["d", "a"], old)
    new = _emb(2, seed=2)
    kstore.write_part(tmp_path, "m", "test", 0, ["c", "b"], new)
    stale = kstore.parts_dir(tmp_path, "m", "test") / ".part-000001.npz.x.tmp"  # a write killed half-way
    stale.write_bytes(b"half")
    path = kstore.merge_parts(tmp_path, "m", "test", np.float32)
    assert path == kstore.split_path(tmp_path, "m", "test")
    ids, emb = kstore.load_split(tmp_path, "m", "test")
    assert ids.tolist() == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(emb, np.stack([old[1], new[1], new[0], old[0]]))
    assert not kstore.parts_dir(tmp_path, "m", "test").exists()


def test_discard_descriptors_removes_the_split_and_its_shards(tmp_path):
    kstore.save_split(tmp_path, "m", "test", ["a"], _emb(1))
    kstore.save_split(tmp_path, "m", "train", ["t"], _emb(1))
    kstore.write_part(tmp_path, "m", "test", 0, ["b"], _emb(1))
    kstore.discard_descriptors(tmp_path, "m", "test")
    assert kstore.stored_ids(tmp_path, "m", "test") == set()
    assert kstore.has_split(tmp_path, "m", "train")  # other splits stay
    kstore.discard_descriptors(tmp_path, "other", "test")  # nothing to discard: no error


# ------------------------------------------------------------------------------------------- failures

def test_failures_of_shards_are_read_and_dropped_once_merged(tmp_path):
    assert kstore.failures_name("train", None) == "train"
    name0, name1 = kstore.failures_name("train", (0, 2)), kstore.failures_name("train", (1, 2))
    assert name1 == "train.shard-1-of-2"
    kstore.write_failures(tmp_path, name0, {"x": "empty file"})
    kstore.write_failures(tmp_path, name1, {"y": "truncated"})
    kstore.write_failures(tmp_path, "other", {"z": "not an image"})  # another split's file is not read
    assert kstore.read_all_failures(tmp_path, "train") == {"x": "empty file", "y": "truncated"}
    kstore.write_failures(tmp_path, "train", {"x": "empty file", "w": "truncated"})  # merged: x but not y
    kstore.drop_merged_failure_files(tmp_path, "train")
    assert not kstore.failures_path(tmp_path, name0).exists()
    assert kstore.failures_path(tmp_path, name1).exists()  # its row is not in train.csv yet
    assert kstore.read_all_failures(tmp_path, "train") == {"x": "empty file", "w": "truncated", "y": "truncated"}


def test_no_failure_files_means_no_failures(tmp_path):
    assert kstore.read_all_failures(tmp_path, "train") == {}
    kstore.drop_merged_failure_files(tmp_path, "train")  # nothing to drop: no error


# ------------------------------------------------------------------------------------------- meta, folder

ENTRY = {"name": "m1", "family": "effnet", "image_size": 64, "checkpoint": "m1.pth", "group": "g",
         "tracks": ["recognition"], "backbone": "tf_efficientnet_b5", "priority": 2}


def test_model_meta_records_the_model_and_the_descriptors(tmp_path):
    meta = kstore.model_meta(ENTRY, "ab12", "float16", 1536)
    assert meta == {"name": "m1", "family": "effnet", "image_size": 64, "sha256": "ab12", "checkpoint": "m1.pth",
                    "tracks": ["recognition"], "backbone": "tf_efficientnet_b5", "dim": 1536, "dtype": "float16"}
    kstore.write_meta(tmp_path, "m1", meta)
    assert kstore.read_meta(tmp_path, "m1") == json.loads(json.dumps(meta))


def test_model_meta_of_a_minimal_entry():
    entry = {k: ENTRY[k] for k in ("name", "family", "image_size", "checkpoint")}
    meta = kstore.model_meta(entry, None, None, 512)
    assert meta["tracks"] == [] and meta["backbone"] is None and meta["sha256"] is None and meta["dim"] == 512


def test_make_writable_creates_the_store_or_says_why_not(tmp_path):
    assert kstore.make_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(KernelError, match=r"file/s: cannot create the descriptor store"):
        kstore.make_writable(tmp_path / "file" / "s")
