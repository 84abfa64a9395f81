"""The named steps of an extraction call, each on its own: argument checks, batch sizes, the store's
meta.json check, known failures, the loop's failure bookkeeping, stopping, shard writing, and the summary's
report of items recomputed in fp32."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kernel import store as kstore
from kernel.data.sources import folder_source
from kernel.demo import SAMPLE_DIR
from kernel.errors import KernelError
from kernel.extract import ExtractSummary, api, loop, resume
from kernel.extract.planning import DEFAULT_BATCH, batch_sizes
from kernel.models import load_manifest, select

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- the call's checks

def test_split_names_and_dtypes_are_checked():
    entry = {"name": "m"}
    api._check_arguments([entry], "train.v2-a", "float16")
    with pytest.raises(KernelError, match="no models to extract"):
        api._check_arguments([], "test", "float16")
    for bad in ("../test", "a b", "train.shard-0-of-2"):
        with pytest.raises(KernelError, match="split name"):
            api._check_arguments([entry], bad, "float16")
    with pytest.raises(KernelError, match="dtype must be float16 or float32"):
        api._check_arguments([entry], "test", "int8")


def test_records_of_a_shard_and_their_ids():
    records = [(i, Path(f"/x/{i}.jpg")) for i in range(5)]
    assert api._own_records(records, None)[1] == ("1", "/x/1.jpg")
    assert [r[0] for r in api._own_records(records, (1, 2))] == ["1", "3"]
    assert api._unique_ids([("a", "p"), ("b", "q")], "test") == {"a", "b"}
    with pytest.raises(KernelError, match="image id 'b' appears more than once in the records of split 'test'"):
        api._unique_ids([("a", "p"), ("b", "q"), ("b", "r")], "test")


def test_batch_sizes_per_model():
    assert batch_sizes(["a", "b"], None, CPU) == {"a": DEFAULT_BATCH["cpu"], "b": DEFAULT_BATCH["cpu"]}
    assert batch_sizes(["a", "b"], None, torch.device("cuda", 0)) == {"a": 32, "b": 32}
    assert batch_sizes(["a", "b"], 5, CPU) == {"a": 5, "b": 5}
    assert batch_sizes(["a", "b"], {"b": 2}, CPU) == {"a": DEFAULT_BATCH["cpu"], "b": 2}
    with pytest.raises(KernelError, match="batch size must be >= 1"):
        batch_sizes(["a"], {"a": 0}, CPU)


def test_decode_workers_default_depends_on_the_device(monkeypatch):
    import kernel.data.loader

    monkeypatch.setattr(kernel.data.loader, "default_workers", lambda: 6)
    assert api._decode_workers(None, torch.device("cuda", 0)) == 6
    assert api._decode_workers(None, CPU) == 3
    assert api._decode_workers(0, CPU) == 0


# ------------------------------------------------------------------------------------------- what the store holds

ENTRY = {"name": "m1", "family": "effnet", "image_size": 64, "checkpoint": "m1.pth", "sha256": "a" * 64,
         "tracks": ["recognition"], "embedding_dim": 8}


def test_meta_of_another_checkpoint_or_size_is_refused(tmp_path):
    path = tmp_path / "meta.json"
    resume.check_meta(path, {"sha256": "a" * 64, "image_size": 64}, "m1", "a" * 64, 64)
    resume.check_meta(path, {}, "m1", None, 64)  # nothing recorded: nothing to compare
    with pytest.raises(KernelError, match=r"meta\.json: descriptors were computed with sha256 bbbb.*--overwrite"):
        resume.check_meta(path, {"sha256": "b" * 64}, "m1", "a" * 64, 64)
    with pytest.raises(KernelError, match="computed with image_size 32, but model 'm1' now has 64"):
        resume.check_meta(path, {"image_size": 32}, "m1", "a" * 64, 64)


def test_prepare_model_writes_meta_and_returns_the_stored_ids(tmp_path):
    assert resume.prepare_model(tmp_path, ENTRY, tmp_path, "test", "float16", False) == set()
    meta = kstore.read_meta(tmp_path, "m1")
    assert meta == kstore.model_meta(ENTRY, "a" * 64, "float16", 8) and "group" not in meta
    kstore.save_split(tmp_path, "m1", "test", ["x"], np.ones((1, 8), np.float32) / np.sqrt(8))
    assert resume.prepare_model(tmp_path, ENTRY, tmp_path, "test", "float16", False) == {"x"}
    assert resume.prepare_model(tmp_path, ENTRY, tmp_path, "test", "float16", True) == set()  # overwrite


def test_prepare_model_drops_the_group_of_an_old_meta(tmp_path):
    kstore.write_meta(tmp_path, "m1", {**kstore.model_meta(ENTRY, "a" * 64, "float16", 8), "group": "effnet"})
    resume.prepare_model(tmp_path, ENTRY, tmp_path, "test", "float16", False)
    assert "group" not in kstore.read_meta(tmp_path, "m1")


def test_descriptor_dim_defaults_to_512():
    assert resume.descriptor_dim(ENTRY) == 8 and resume.descriptor_dim({"name": "m"}) == 512


def test_known_failures_leave_out_other_records_and_images_every_model_has(tmp_path):
    kstore.write_failures(tmp_path, "test", {"a": "empty file", "b": "truncated", "c": "not an image"})
    kstore.write_failures(tmp_path, kstore.failures_name("test", (1, 2)), {"d": "truncated"})
    done = {"m1": {"b"}, "m2": {"b"}}  # b decoded in a later retry: its row is stale
    assert resume.known_failures(tmp_path, "test", {"a", "b", "d"}, done) == {"a": "empty file", "d": "truncated"}


# ------------------------------------------------------------------------------------------- the loop's steps

def _run(tmp_path, records, names=("m1", "m2"), **kw) -> loop._Run:
    ids = [r[0] for r in records]
    fields = dict(store=tmp_path, split="test", records=records, id_set=set(ids),
                  todo={n: np.ones(len(records), bool) for n in names}, failures={}, known={"b"},
                  summary=ExtractSummary("test", len(records), list(names)), device=CPU, precision="fp32",
                  dtype=np.dtype("float32"), per_model={n: 2 for n in names}, workers=0, flush_images=10,
                  flush_seconds=60.0, shard=None, deadline=None, max_batches=None, on_batch=None, progress=False,
                  t_start=time.monotonic())
    return loop._Run(**{**fields, **kw})


def test_a_failed_image_is_recorded_and_no_model_tries_it_again(tmp_path):
    records = [("a", "/a.jpg"), ("b", "/b.jpg"), ("c", "/c.jpg")]
    run = _run(tmp_path, records)
    g = loop._Group(positions=np.array([1, 2]), by_size={32: ["m1", "m2"]}, runners={}, writers={})
    loop._record_failures(run, g, {"failed": [(0, "truncated"), (1, "empty file")]})  # b (known) and c (new)
    assert run.failures == {"b": "truncated", "c": "empty file"} and run.summary.new_failures == 1
    assert all(t.tolist() == [True, False, False] for t in run.todo.values())


def test_the_loop_stops_at_max_batches_or_the_deadline(tmp_path):
    run = _run(tmp_path, [("a", "/a.jpg")], max_batches=2)
    run.batches = 1
    assert not loop._stops_here(run) and run.summary.stopped == ""
    run.batches = 2
    assert loop._stops_here(run) and run.summary.stopped == "max_batches"
    late = _run(tmp_path, [("a", "/a.jpg")], deadline=time.monotonic() - 1)
    assert loop._stops_here(late) and late.summary.stopped == "deadline"
    asked = _run(tmp_path, [("a", "/a.jpg")], should_stop=lambda: True)
    assert loop._stops_here(asked) and asked.summary.stopped == "stopped"


def test_the_writer_writes_shards_after_the_existing_ones(tmp_path):
    kstore.write_part(tmp_path, "m1", "test", 4, ["old"], np.ones((1, 2), np.float32) / np.sqrt(2))
    w = loop._Writer(tmp_path, "m1", "test", np.dtype("float16"), 0)
    w.add(["a", "b"], torch.nn.functional.normalize(torch.randn(2, 2), dim=1))
    assert w.pending() == 2 and w.count == 2
    w.flush()
    w.flush()  # nothing pending: no empty shard
    assert sorted(p.name for p in kstore.parts_dir(tmp_path, "m1", "test").iterdir()) == \
        ["part-000004.npz", "part-000005.npz"]
    assert kstore.read_ids(kstore.parts_dir(tmp_path, "m1", "test") / "part-000005.npz").tolist() == ["a", "b"]
    assert w.pending() == 0 and w.next == 6


# ------------------------------------------------------------------------------------------- fp32 recomputation

def test_the_summary_line_reports_items_recomputed_in_fp32():
    s = ExtractSummary("test", 10, ["m1", "m2"], computed={"m1": 10, "m2": 10},
                       model_seconds={"m1": 1.0, "m2": 2.0}, fp32_recomputed={"m1": 3, "m2": 0}, device="cpu")
    line = s.line()
    assert "m1 10 in 1.0 s (10.0 img/s), 3 images recomputed in fp32 (non-finite half-precision output)" in line
    assert line.count("recomputed") == 1  # m2 needed none
    s.fp32_recomputed["m2"] = 1
    assert "m2 10 in 2.0 s (5.0 img/s), 1 image recomputed in fp32" in s.line()


class _OverflowFirst(nn.Module):
    """Stands in for a hybrid model: the first image of every batch overflows in half precision."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        out = x.float().mean(dim=(2, 3)) @ self.w + 1.0
        if torch.is_autocast_enabled("cpu"):
            out = out.clone()
            out[0] = float("inf")
        return out


def test_an_extraction_reports_the_images_its_nan_guard_recomputed(tiny_weights, tmp_path, monkeypatch):
    import kernel.models

    monkeypatch.setattr(kernel.models, "load_model", lambda entry, weights_dir, device: _OverflowFirst().eval())
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(SAMPLE_DIR.glob("*.jpg"))[:4]:
        shutil.copy(p, images / p.name)
    entries = select(load_manifest(tiny_weights[1]), ["effnet_b5_704"])
    s = api.extract(entries, tiny_weights[0], folder_source(images), "test", tmp_path / "s", device="cpu",
                    batch_size=2, workers=0, progress=False, precision="bf16", dtype="float32")
    assert s.complete and s.fp32_recomputed == {"effnet_b5_704": 2}  # one per batch of two
    assert "2 images recomputed in fp32" in s.line()
    assert np.isfinite(kstore.load_split(tmp_path / "s", "effnet_b5_704", "test")[1]).all()
