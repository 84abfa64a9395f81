"""kernel.search: exact chunked top-k, deterministic ties, score_fn, agreement with faiss."""
import numpy as np
import pytest
import torch

from kernel import prefilter as bf16, search, selection


def reference_topk(q, d, k, score=None):
    """Exhaustive search: full score matrix, ordered by (score desc, index asc)."""
    s = (torch.as_tensor(q, dtype=torch.float64) @ torch.as_tensor(d, dtype=torch.float64).T).numpy()
    if score is not None:
        s = score(s)
    k = min(k, d.shape[0])
    idx = np.empty((len(q), k), np.int64)
    for r in range(len(q)):
        order = np.lexsort((np.arange(d.shape[0]), -s[r]))
        idx[r] = order[:k]
    return np.take_along_axis(s, idx, 1), idx


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


PREFILTERS = ["off", "bf16"]  # the float32 search, and the bfloat16 prefilter forced on (any CPU runs it)


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("qc,dc", [(None, None), (3, 5), (7, 64), (1, 1000)])
def test_equals_exhaustive_search(qc, dc, prefilter):
    rng = np.random.default_rng(0)
    q, d = unit(rng.standard_normal((23, 16))), unit(rng.standard_normal((300, 16)))
    v, i = search.topk(q, d, 10, query_chunk=qc, db_chunk=dc, prefilter=prefilter)
    rv, ri = reference_topk(q, d, 10)
    assert v.shape == (23, 10) and v.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, atol=1e-6)


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("segment", [0, 2, 3, 32])
@pytest.mark.parametrize("dc", [2, 3, 7, 24, 1000])
def test_ties_ordered_by_index_and_lowest_kept(dc, segment, prefilter, monkeypatch):
    # 0/1 vectors: integer inner products, many exact ties, straddling the k-th place, chunk and segment
    # borders; small segments force the segment-maximum filter on every block
    monkeypatch.setattr(selection, "SEGMENT", segment)
    rng = np.random.default_rng(1)
    q = rng.integers(0, 2, (40, 6)).astype(np.float32)
    d = rng.integers(0, 2, (250, 6)).astype(np.float32)
    v, i = search.topk(q, d, 7, db_chunk=dc, query_chunk=9, prefilter=prefilter)
    rv, ri = reference_topk(q, d, 7)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("segment", [0, 4, 32])
def test_segment_filter_exact_on_many_blocks(segment, prefilter, monkeypatch):
    monkeypatch.setattr(selection, "SEGMENT", segment)
    rng = np.random.default_rng(6)
    q, d = unit(rng.standard_normal((64, 16))), unit(rng.standard_normal((6000, 16)))
    # 700 = 21 segments of 32 + a tail
    v, i = search.topk(q, d, 20, db_chunk=700, query_chunk=32, prefilter=prefilter)
    rv, ri = reference_topk(q, d, 20)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, atol=1e-6)


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_all_equal_scores_give_first_positions(prefilter):
    q = np.ones((2, 4), np.float32)
    d = np.ones((10, 4), np.float32)
    v, i = search.topk(q, d, 3, db_chunk=4, prefilter=prefilter)
    assert i.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert v.tolist() == [[4.0] * 3] * 2


def test_block_topk_tie_rule_by_hand():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    v, i = selection.block_topk(s, 3)
    assert i.tolist() == [[1, 3, 0]] and v[0].tolist() == pytest.approx([0.9, 0.9, 0.5])
    v, i = selection.block_topk(s, 10)  # k beyond the block: everything, ordered
    assert i.tolist() == [[1, 3, 0, 2, 5, 4]]


def test_small_database_and_empty_queries():
    rng = np.random.default_rng(2)
    d = unit(rng.standard_normal((4, 8)))
    v, i = search.topk(d, d, 100)
    assert i.shape == (4, 4) and (i[:, 0] == np.arange(4)).all()
    v, i = search.topk(np.zeros((0, 8), np.float32), d, 5)
    assert v.shape == (0, 4)
    with pytest.raises(ValueError):
        search.topk(d, unit(rng.standard_normal((4, 9))), 2)


def test_score_fn_is_exact_and_sees_positions():
    rng = np.random.default_rng(3)
    q, d = unit(rng.standard_normal((17, 8))), unit(rng.standard_normal((90, 8)))
    bias = rng.standard_normal(90).astype(np.float32)
    calls = []

    def fn(block, rows, cols):
        calls.append((rows.start, rows.stop, cols.start, cols.stop, tuple(block.shape)))
        return block.clamp_(0, 1).sub_(torch.as_tensor(bias[cols], device=block.device))

    v, i = search.topk(q, d, 5, score_fn=fn, query_chunk=5, db_chunk=16)
    rv, ri = reference_topk(q, d, 5, score=lambda s: np.clip(s, 0, 1) - bias[None, :])
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, atol=1e-6)
    assert all(shape == (r1 - r0, c1 - c0) for r0, r1, c0, c1, shape in calls)


def test_float16_path_exact_on_representable_data():
    # small integer data: every product and sum is exact in float16, so the fp16 path (the GPU one) is exact
    rng = np.random.default_rng(4)
    q = rng.integers(0, 3, (12, 16)).astype(np.float32)
    d = rng.integers(0, 3, (40, 16)).astype(np.float32)
    v, i = search.topk(q, d, 6, dtype=torch.float16, db_chunk=8)
    rv, ri = reference_topk(q, d, 6)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)


def test_default_device_and_dtype():
    # no device: the GPU when there is one, else the CPU; an explicit "cpu" is the CPU either way
    assert search.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = search.resolve_device("cpu")
    assert cpu == torch.device("cpu") and search.compute_dtype(cpu) == torch.float32
    # float32 products on a GPU too: the GPU's answers are the CPU's (float16 moved near-ties on an H100)
    assert search.compute_dtype(torch.device("cuda")) == torch.float32
    qc, dc = search.chunk_sizes(10, 10**6, 100, torch.device("cpu"))
    assert qc == 10 and dc * qc <= search.CPU_BLOCK_ELEMENTS * 2


def test_search_runs_in_ieee_float32_and_restores_the_callers_precision():
    seen = []
    rng = np.random.default_rng(4)
    q, d = unit(rng.standard_normal((5, 8))), unit(rng.standard_normal((40, 8)))

    def fn(block, rows, cols):
        seen.append(torch.get_float32_matmul_precision())
        return block

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # a notebook that allowed TF32 for its models
        search.topk(q, d, 3, score_fn=fn)
        assert seen and set(seen) == {"highest"}  # no TF32 inside the search
        assert torch.get_float32_matmul_precision() == "high"  # the caller's setting is back
    finally:
        torch.set_float32_matmul_precision(before)


def test_same_results_as_faiss_flat_ip():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    q, d = unit(rng.standard_normal((200, 64))), unit(rng.standard_normal((5000, 64)))
    index = faiss.IndexFlatIP(64)
    index.add(d)
    fv, fi = index.search(q, 50)
    v, i = search.topk(q, d, 50)
    np.testing.assert_allclose(v, fv, atol=1e-5)
    same = i == fi
    # positions that differ may only be float-rounding near-ties (equal scores to 1e-5)
    exact = (torch.as_tensor(q, dtype=torch.float64) @ torch.as_tensor(d, dtype=torch.float64).T).numpy()
    r, c = np.nonzero(~same)
    assert np.all(np.abs(exact[r, i[r, c]] - exact[r, fi[r, c]]) < 1e-5)
    assert same.mean() > 0.99


# ---- the bfloat16 prefilter: exact float32 results from bfloat16 block scores ----


def test_prefilter_error_bound_holds():
    # the inequality the prefilter rests on: |bf16 block score - float32 score| <= c |s| + E_q, here on
    # unit rows, on rows of very different norms and on rows with a huge dynamic range inside
    rng = np.random.default_rng(7)
    cases = [
        (unit(rng.standard_normal((40, 64))), unit(rng.standard_normal((500, 64)))),
        ((rng.standard_normal((40, 64)) * rng.uniform(0.01, 100, (40, 1))).astype(np.float32),
         (rng.standard_normal((500, 64)) * rng.uniform(0.01, 100, (500, 1))).astype(np.float32)),
        ((rng.standard_normal((40, 64)) * 10.0 ** rng.integers(-6, 3, (40, 64))).astype(np.float32),
         (rng.standard_normal((500, 64)) * 10.0 ** rng.integers(-6, 3, (500, 64))).astype(np.float32)),
    ]
    for q, d in cases:
        q, d = torch.from_numpy(q), torch.from_numpy(d)
        bdb = bf16.Bf16Database(d)
        q16 = q.bfloat16()
        s = torch.mm(q16, bdb.bf16.T).double()
        f = (q.double() @ d.double().T)
        e = bdb.bound(q, q16)
        assert bool(((s - f).abs() <= bf16._BF16_C * s.abs() + e[:, None]).all())


@pytest.mark.parametrize("dc", [5, 64, 1000])
def test_prefilter_resolves_what_bfloat16_cannot_see(dc):
    # six groups of 50 rows that are one and the same vector in bfloat16 (components in [0.5, 1), where
    # bfloat16 steps by 2^-8, plus offsets below half a step) but clearly different in float32: every
    # bfloat16 score of a group ties, so which rows of a group make the top k, and their order, can only
    # come from the float32 rescoring
    rng = np.random.default_rng(8)
    base = torch.from_numpy(rng.uniform(0.5, 1.0, (6, 32))).bfloat16().double().numpy()
    d = (np.repeat(base, 50, axis=0) + rng.uniform(-0.0015, 0.0015, (300, 32))).astype(np.float32)
    d16 = torch.from_numpy(d).bfloat16()
    assert all(bool((d16[g * 50 : g * 50 + 50] == d16[g * 50]).all()) for g in range(6))
    q = rng.uniform(-1, 1, (3, 32)).astype(np.float32)
    v, i = search.topk(q, d, 30, db_chunk=dc, prefilter="bf16")
    rv, ri = reference_topk(q, d, 30)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, rtol=1e-6, atol=1e-6)


def test_prefilter_duplicates_and_large_norms():
    rng = np.random.default_rng(9)
    d = (rng.standard_normal((400, 24)) * 50).astype(np.float32)
    d[200:] = d[:200]  # every row twice: equal scores, the lower position first
    q = (rng.standard_normal((10, 24)) * 3).astype(np.float32)
    v, i = search.topk(q, d, 40, db_chunk=64, prefilter="bf16")
    v32, i32 = search.topk(q, d, 40, db_chunk=64, prefilter="off")
    np.testing.assert_array_equal(i, i32)
    np.testing.assert_allclose(v, v32, rtol=1e-6)
    assert np.all(i[:, 0::2] < 200) and np.all(i[:, 1::2] == i[:, 0::2] + 200)
    np.testing.assert_array_equal(v[:, 0::2], v[:, 1::2])


def test_prefilter_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big = bf16.PREFILTER_MIN_PAIRS
    assert not bf16.use_prefilter("auto", cpu, torch.float32, None, 10, 100, 5)  # too small to pay
    assert not bf16.use_prefilter("bf16", cpu, torch.float32, lambda *a: a[0], 10**4, 10**5, 5)  # score_fn
    assert not bf16.use_prefilter("bf16", cuda, torch.float16, None, 10**4, 10**5, 5)  # GPUs: fp16 search
    assert not bf16.use_prefilter("bf16", cpu, torch.float32, None, 10, 5, 5)  # k covers the database
    assert bf16.use_prefilter("bf16", cpu, torch.float32, None, 10, 100, 5)
    assert bf16.use_prefilter("auto", cpu, torch.float32, None, big, 10**5, 5) == bf16.bf16_prefilter_available()
    with pytest.raises(ValueError, match="prefilter"):
        search.topk(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 2, prefilter="int8")


def test_prefilter_keeps_rows_bfloat16_ranks_too_low():
    # random descriptors: many float32 top-k rows sit below the bfloat16 k-th score; the error band must
    # bring every one of them back (a band too narrow loses some, and the ids then differ)
    rng = np.random.default_rng(10)
    q, d = unit(rng.standard_normal((300, 64))), unit(rng.standard_normal((20000, 64)))
    v, i = search.topk(q, d, 50, prefilter="bf16")
    v32, i32 = search.topk(q, d, 50, prefilter="off")
    s16 = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(d).bfloat16().T).float()
    kth16 = torch.topk(s16, 50, dim=1).values[:, -1:]
    below = s16.gather(1, torch.from_numpy(i32)) < kth16
    assert int(below.sum()) > 0  # the case the band exists for does occur here
    np.testing.assert_allclose(v, v32, atol=1e-6)
    # the two float32 computations (block products, sampled products) round differently: rows may only
    # swap places where their exact scores are equal to float32 rounding
    exact = (torch.as_tensor(q, dtype=torch.float64) @ torch.as_tensor(d, dtype=torch.float64).T).numpy()
    r, c = np.nonzero(i != i32)
    assert len(r) < 10 and np.all(np.abs(exact[r, i[r, c]] - exact[r, i32[r, c]]) < 1e-6)


def test_streamed_search_with_an_empty_side_answers_empty_arrays():
    from kernel.rows import ArrayRows

    q = unit(np.random.default_rng(0).standard_normal((3, 8)))
    for database in (np.zeros((0, 8), np.float32), ArrayRows(np.zeros((0, 8), np.float32))):
        v, i = search.topk(q, database, 5)
        assert v.shape == i.shape == (3, 0) and v.dtype == np.float32 and i.dtype == np.int64
    v, i = search.topk(ArrayRows(np.zeros((0, 8), np.float32)), ArrayRows(q), 2)
    assert v.shape == (0, 2)


def test_only_the_database_side_stays_whole_on_a_gpu(monkeypatch):
    # on a GPU the database is loaded whole when it fits half the free memory; the queries are built in host
    # memory, so their passes keep the pass size whatever the GPU (a big card must not lift the host budget)
    from kernel.rows import ArrayRows

    rows = ArrayRows(np.zeros((1000, 8), np.float32))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (10 ** 12, 10 ** 12))
    gpu = torch.device("cuda")
    assert search.pass_rows(rows, gpu, torch.float32, 32 * 100, resident=True) == 1000
    assert search.pass_rows(rows, gpu, torch.float32, 32 * 100) == 100
    assert search.pass_rows(rows, torch.device("cpu"), torch.float32, 32 * 100, resident=True) == 100
