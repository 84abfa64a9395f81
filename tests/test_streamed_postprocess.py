"""Streamed and prepared post-processing give the in-memory answers (issue: competition scale).

The store is written as real stores are (float16 ``.npz``), one model misses some test ids and another
holds its train rows in another order. The streamed path runs with passes of a few rows and reads of a
few rows (so every merge and alignment path runs); the reference is computed here, in memory, with the
array-level functions of :mod:`kernel.postprocess` on whole float32 arrays.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import kernel.rows
from kernel import search, store
from kernel.postprocess import knn, pipeline, prepared, reference
from kernel.postprocess import recognition as rec
from kernel.postprocess import retrieval as ret
from kernel.prepare import prepare_recognition, prepare_retrieval
from tests.synthetic import SyntheticConfig, generate, write_store

CONFIG = SyntheticConfig(n_landmarks=60, train_max=12, n_bank=90, index_landmarks=40, index_per_landmark=4,
                         index_distractors=150, retrieval_queries=40, retrieval_nonlandmark_queries=8,
                         recognition_queries=40, recognition_nonlandmark_queries=20, dim=32)


def _as_real_store(root, drop_test: int = 5):
    """fp16 splits; the first model misses ``drop_test`` test ids; the second's train rows are reversed."""
    names = store.list_models(root)
    for j, name in enumerate(names):
        for split in ("test", "train", "index", "nonlandmark"):
            if not store.has_split(root, name, split):
                continue
            ids, emb = store.load_split(root, name, split)
            if split == "test" and j == 0:
                ids, emb = ids[drop_test:], emb[drop_test:]
            if split == "train" and j == 1:
                ids, emb = ids[::-1], emb[::-1]
            store.save_split(root, name, split, ids, emb.astype(np.float16))
    return names


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    world = generate(CONFIG)
    out = {}
    for track in ("recognition", "retrieval"):
        d = tmp_path_factory.mktemp(track)
        paths = write_store(world, d, track)
        _as_real_store(paths["store"])
        out[track] = paths
    nobank = tmp_path_factory.mktemp("nobank")
    paths = write_store(world, nobank, "recognition", bank=False)
    _as_real_store(paths["store"])
    out["nobank"] = paths
    return out


@pytest.fixture
def tiny_passes(monkeypatch):
    """Passes of 40 rows over a model's streamed split (13 of a 3-family descriptor), reads of 3 rows;
    one torch thread (tiny products on two threads of a shared 2-core machine wait on each other)."""
    monkeypatch.setattr(search, "PASS_BYTES", 40 * 32 * 4)
    monkeypatch.setattr(kernel.rows, "READ_ROWS", 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(root, name, split):
    return store.load_split(root, name, split)


def _test_side(root, names, test_ids):
    arrays, present = [], []
    for name in names:
        ids, emb = _load(root, name, "test")
        rows = pipeline._query_rows(test_ids, ids)
        mask = np.zeros(len(test_ids), bool)
        mask[rows] = True
        arrays.append(emb[np.argsort(rows)])
        present.append(mask)
    return arrays, present


def _aligned(root, names, split):
    ref, _ = _load(root, names[0], split)
    out = []
    for name in names:
        ids, emb = _load(root, name, split)
        pos = {k: n for n, k in enumerate(ids)}
        out.append(emb[[pos[k] for k in ref]])
    return ref, out


def _reference_recognition(paths, bank: bool):
    root = paths["store"]
    metas = pipeline.select_models(root, "recognition")
    fams: dict = {}
    for m in metas:
        fams.setdefault(m["family"], []).append(m["name"])
    order = reference.family_order(fams)
    test_ids = pipeline.store_test_ids(root, metas)
    t_arrays, t_present = [], []
    for f in order:
        a, p = _test_side(root, fams[f], test_ids)
        t_arrays.append(a)
        t_present.append(p)
    flat = [n for f in order for n in fams[f]]
    train_ids, train_all = _aligned(root, flat, "train")
    it = iter(train_all)
    tr = [[next(it) for _ in fams[f]] for f in order]
    test = rec.family_descriptors(t_arrays, t_present, n=len(test_ids))
    train = rec.family_descriptors(tr)
    if bank:
        _, bank_all = _aligned(root, flat, "nonlandmark")
        it = iter(bank_all)
        bank_desc = rec.family_descriptors([[next(it) for _ in fams[f]] for f in order])
    labels = pipeline.read_train_labels(paths["train_labels"])
    codes_of = {}
    codes = reference.codes(labels.reindex(train_ids).to_numpy(), codes_of)
    uniq = reference.landmarks_of(np.arange(len(codes_of)), codes_of)
    c, conf = rec.recognize(test, train, codes, bank_desc if bank else None)
    have = np.any([m for p in t_present for m in p], axis=0)
    return {q: (str(uniq[c[j]]), float(conf[j])) if have[j] and c[j] >= 0 else None for j, q in enumerate(test_ids)}


def _same_recognition(got, want):
    assert list(got) == list(want)
    for q in want:
        assert (got[q] is None) == (want[q] is None), q
        if want[q] is not None:
            assert got[q][0] == want[q][0], q
            assert abs(got[q][1] - want[q][1]) <= 1e-6, q


@pytest.mark.parametrize("world", ["recognition", "nobank"])
def test_recognition_streamed_equals_in_memory(worlds, world, tiny_passes):
    paths = worlds[world]
    want = _reference_recognition(paths, bank=world == "recognition")
    got = pipeline.recognition_from_store(paths["store"], paths["train_labels"], progress=False)
    assert sum(v is not None for v in got.values()) > len(got) // 2
    _same_recognition(got, want)


def _reference_retrieval(paths, rerank: str):
    root = paths["store"]
    metas = pipeline.select_models(root, "retrieval")
    names = [m["name"] for m in metas]
    test_ids = pipeline.store_test_ids(root, metas)
    labels = pipeline.read_train_labels(paths["train_labels"])
    if rerank == "soft":
        index_ids, _ = _load(root, names[0], "index")
        per_model, codes_of = [], {}
        for name in names:
            q_ids, q = _load(root, name, "test")
            _, idx = _aligned(root, [names[0], name], "index")
            t_ids, train = _load(root, name, "train")
            t_codes = reference.train_codes(t_ids, labels, root, codes_of)
            q_lab, _ = knn.knn_labels(q, train, t_codes)
            i_lab, i_conf = knn.knn_labels(idx[1], train, t_codes)
            s, r = ret.soft_scores(q, idx[1], q_lab, i_lab, i_conf)
            full_s = np.zeros((len(test_ids), s.shape[1]), np.float32)
            full_r = np.full((len(test_ids), s.shape[1]), -1, np.int32)
            qr = pipeline._query_rows(test_ids, q_ids)
            full_s[qr], full_r[qr] = s, r
            per_model.append((full_s, full_r))
        ranked = ret.sum_ensemble(per_model, len(index_ids))
    else:
        arrays, present = _test_side(root, names, test_ids)
        q = ret.ensemble_descriptors(arrays, present)
        index_ids, idx = _aligned(root, names, "index")
        idx = ret.ensemble_descriptors(idx)
        _, initial = search.topk(q, idx, 100)
        ranked = list(initial)
        if rerank == "two-stage":
            t_ids, train = _aligned(root, names, "train")
            t_codes = reference.train_codes(t_ids, labels, root, {})
            train = ret.ensemble_descriptors(train)
            ql, qc = knn.knn_labels(q, train, t_codes)
            il, ic = knn.knn_labels(idx, train, t_codes)
            ranked = ret.two_stage(initial, None, ql, qc, il, ic)
        have = np.any(present, axis=0)
        ranked = [r if h else r[:0] for r, h in zip(ranked, have)]
    return {q: [str(index_ids[j]) for j in r] for q, r in zip(test_ids, ranked)}


@pytest.mark.parametrize("rerank", ["soft", "two-stage", "none"])
def test_retrieval_streamed_equals_in_memory(worlds, rerank, tiny_passes):
    paths = worlds["retrieval"]
    want = _reference_retrieval(paths, rerank)
    got = pipeline.retrieval_from_store(paths["store"], paths["train_labels"], rerank=rerank, progress=False)
    assert sum(bool(v) for v in got.values()) > len(got) // 2
    assert got == want


@pytest.mark.slow
def test_prepared_artefacts_used_and_same_answers(worlds, tiny_passes, tmp_path, caplog):
    rp, tp = worlds["recognition"], worlds["retrieval"]
    kw = dict(device=search.resolve_device("cpu"), progress=False, pass_bytes=None)
    reuse_r = reference.Reuse(dirs=[], cache=tmp_path / "rec")
    written = prepare_recognition(rp["store"], reuse_r, pipeline.resolve_params(pipeline.RECOGNITION_PARAMS, {}), kw)
    assert {w.name for w in written} == {"recognition_train.npz", "recognition_bank.npz", "recognition_bias.npz"}
    reuse_t = reference.Reuse(dirs=[], cache=tmp_path / "ret")
    written = prepare_retrieval(tp["store"], tp["train_labels"], reuse_t,
                                pipeline.resolve_params(pipeline.RETRIEVAL_PARAMS, {}), kw, two_stage=True)
    assert len(written) == len(store.list_models(tp["store"])) + 1

    with caplog.at_level(logging.INFO):
        got = pipeline.recognition_from_store(rp["store"], rp["train_labels"], progress=False,
                                              prepared_dirs=[tmp_path / "rec"])
    used = [r.getMessage() for r in caplog.records if r.getMessage().startswith("using prepared")]
    assert len(used) == 3, used
    _same_recognition(got, _reference_recognition(rp, bank=True))
    for rerank in ("soft", "two-stage"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            got = pipeline.retrieval_from_store(tp["store"], tp["train_labels"], rerank=rerank, progress=False,
                                                prepared_dirs=[tmp_path / "ret"])
        assert any(r.getMessage().startswith("using prepared") for r in caplog.records)
        assert got == _reference_retrieval(tp, rerank)


def test_stale_artefact_is_recomputed_and_said(worlds, tmp_path, caplog):
    """Changed train labels: the prepared index labels no longer match; they are recomputed, not used."""
    tp = worlds["retrieval"]
    kw = dict(device=search.resolve_device("cpu"), progress=False, pass_bytes=None)
    prepare_retrieval(tp["store"], tp["train_labels"], reference.Reuse(dirs=[], cache=tmp_path / "p"),
                      pipeline.resolve_params(pipeline.RETRIEVAL_PARAMS, {}), kw, two_stage=False)
    labels = tp["train_labels"].read_text().splitlines()
    first = labels[1].split(",")
    labels[1] = f"{first[0]},{int(first[1]) + 100000}"  # one train image relabelled
    changed = tmp_path / "train.csv"
    changed.write_text("\n".join(labels) + "\n")
    with caplog.at_level(logging.WARNING):
        got = pipeline.retrieval_from_store(tp["store"], changed, progress=False, prepared_dirs=[tmp_path / "p"],
                                            cache_dir=tmp_path / "cache")
    stale = [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()]
    assert stale and all("train_labels" in m for m in stale)
    assert got == pipeline.retrieval_from_store(tp["store"], changed, progress=False, prepared_dirs=[])
    # what was recomputed is kept for the next chunk, with the new fingerprint
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached and all(prepared.read_fingerprint(tmp_path / "cache" / c)["train_labels"] for c in cached)


def test_reuse_evaluates_a_fingerprint_only_with_a_file_to_compare_or_to_write(tmp_path, caplog):
    calls = []
    fp = reference.lazy(lambda: calls.append(1) or {"kind": "x"})
    reuse = reference.Reuse(dirs=[tmp_path / "p"], cache=None)
    assert reuse.find("a.npz", fp) is None
    reuse.save("a.npz", fp, ["i0"], conf=np.zeros(1))  # no cache: nothing written, nothing computed
    assert calls == [] and not (tmp_path / "p").exists()
    reference.Reuse(dirs=[], cache=tmp_path / "p").save("a.npz", fp, ["i0"], conf=np.zeros(1))
    assert calls == [1] and prepared.read_fingerprint(tmp_path / "p" / "a.npz") == {"kind": "x"}
    assert reuse.find("a.npz", fp) == tmp_path / "p" / "a.npz" and calls == [1]  # computed once
    with caplog.at_level(logging.WARNING):
        assert reuse.find("a.npz", reference.lazy(lambda: {"kind": "y"})) is None  # stale: said, not used
    assert any("does not match" in r.getMessage() and "kind" in r.getMessage() for r in caplog.records)


def test_no_fingerprint_without_prepared_folder_or_cache(worlds, tmp_path, monkeypatch, caplog):
    """No prepared folder and nothing saved: no ids hashed, no labels digested; saving and a stale
    artefact still compute them."""
    calls = []
    for name in ("split_fingerprint", "labels_digest"):
        real = getattr(prepared, name)
        monkeypatch.setattr(prepared, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    rp, tp = worlds["recognition"], worlds["retrieval"]
    assert not prepared.prepared_dir(rp["store"]).exists() and not prepared.prepared_dir(tp["store"]).exists()
    pipeline.recognition_from_store(rp["store"], rp["train_labels"], progress=False)
    for rerank in ("soft", "two-stage"):
        pipeline.retrieval_from_store(tp["store"], tp["train_labels"], rerank=rerank, progress=False)
    assert calls == []
    want = pipeline.retrieval_from_store(tp["store"], tp["train_labels"], progress=False, knn_k=2,
                                         cache_dir=tmp_path / "c")
    assert {"split_fingerprint", "labels_digest"} <= set(calls)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        f"retrieval_{m}.npz" for m in store.list_models(tp["store"]))
    with caplog.at_level(logging.WARNING):  # knn_k 3 (the default) against artefacts of knn_k 2
        got = pipeline.retrieval_from_store(tp["store"], tp["train_labels"], progress=False,
                                            prepared_dirs=[tmp_path / "c"])
    stale = [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()]
    assert len(stale) == len(store.list_models(tp["store"])) and all("params.knn_k" in m for m in stale)
    assert got == pipeline.retrieval_from_store(tp["store"], tp["train_labels"], progress=False) != want


def test_split_rows_reads_blocks_and_reports_bad_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel.rows, "READ_ROWS", 4)
    emb = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float16)
    ids = [f"x{i:02d}" for i in range(30)]
    path = store.save_split(tmp_path, "m", "train", ids, emb)
    rows = kernel.rows.SplitRows(path)
    assert rows.layout is not None and rows.stored_dtype == np.float16
    np.testing.assert_array_equal(rows.block(3, 29), emb[3:29].astype(np.float32))
    perm = np.random.default_rng(1).permutation(30)
    aligned = rows.aligned_to(np.asarray(ids)[perm], "ref")
    np.testing.assert_array_equal(aligned.block(0, 30), emb[perm].astype(np.float32))
    emb[17, 2] = np.nan
    store.save_split(tmp_path, "m", "train", ids, emb)
    with pytest.raises(Exception, match=r"train.npz: 1 descriptors hold NaN or infinite values \(first: id x17\)"):
        kernel.rows.SplitRows(path).block(0, 30)
    np.savez_compressed(tmp_path / "c.npz", ids=np.asarray(ids), embeddings=emb[:, :])
    assert kernel.rows.SplitRows(tmp_path / "c.npz").layout is None  # compressed: read whole, still works


def test_split_rows_refuse_zero_rows_and_integer_descriptors(tmp_path):
    emb = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float16)
    emb[4] = 0
    ids = [f"z{i}" for i in range(10)]
    path = store.save_split(tmp_path, "m", "train", ids, emb)
    with pytest.raises(Exception, match=r"1 descriptors are all zeros \(first: id z4\)"):
        kernel.rows.SplitRows(path).block(0, 10)
    store.save_split(tmp_path, "m", "train", ids, (emb * 100).astype(np.int8))
    with pytest.raises(Exception, match="dtype int8"):
        kernel.rows.SplitRows(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_streamed_search_on_the_gpu_matches_the_cpu(tmp_path, monkeypatch):
    """float16 passes on the GPU (device-resident database, then forced streaming) give the CPU's
    neighbours up to float16 rounding of the scores."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20000, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = emb[:500] + 0.1 * rng.standard_normal((500, 64)).astype(np.float32)
    path = store.save_split(tmp_path, "m", "train", [f"t{i}" for i in range(20000)], emb.astype(np.float16))
    rows = kernel.rows.SplitRows(path)
    v_cpu, i_cpu = search.topk(q, rows, 10, device="cpu")
    for pass_bytes in (None, 1000 * 64 * 2):  # whole database on the device, then passes of 1,000 rows
        if pass_bytes:
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 0))  # pretend it does not fit
        v_gpu, i_gpu = search.topk(q, rows, 10, device="cuda", pass_bytes=pass_bytes)
        np.testing.assert_allclose(v_gpu, v_cpu, atol=5e-3)
        assert np.mean(i_gpu == i_cpu) > 0.95
