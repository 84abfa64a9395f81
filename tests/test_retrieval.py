"""Retrieval post-processing: k-NN voting, soft up/down, ensemble sum, two-stage; synthetic proof."""
import math

import numpy as np
import pytest

from kernel import metrics
from tests import synthetic
from kernel.postprocess import knn, pipeline
from kernel.postprocess import retrieval as ret


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_vote_by_hand():
    label, conf = knn.vote(np.array([[0.9, 0.5, 0.45]]), np.array([[1, 2, 2]]), divisor=3)
    assert label.tolist() == [2] and conf[0] == pytest.approx(0.95 / 3)
    # equal sums: the landmark of the better-ranked neighbour wins
    label, conf = knn.vote(np.array([[0.6, 0.3, 0.3]]), np.array([[1, 2, 2]]))
    assert label.tolist() == [1] and conf[0] == pytest.approx(0.6)
    # missing neighbours (-1) never vote; a row without any gets no label
    label, conf = knn.vote(np.array([[0.2, 0.9], [0.1, 0.1]]), np.array([[4, -1], [-1, -1]]))
    assert label.tolist() == [4, -1] and conf.tolist() == pytest.approx([0.2, 0.0])


def test_knn_labels_against_train():
    train = unit(np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32))
    codes = np.array([0, 0, 1])
    label, conf = knn.knn_labels(unit(np.array([[1, 0.05]])), train, codes, k=3)
    s = unit(np.array([[1, 0.05]])) @ train.T
    assert label.tolist() == [0] and conf[0] == pytest.approx((s[0, 0] + s[0, 1]) / 3, abs=1e-6)
    assert knn.knn_labels(train, train[:0], codes[:0])[0].tolist() == [-1, -1, -1]
    from kernel.postprocess.reference import codes as encode, landmarks_of

    codes_of = {}
    codes = encode(["7", 3, "7", "10"], codes_of)
    assert codes.tolist() == [0, 1, 0, 2] and landmarks_of(codes, codes_of).tolist() == ["7", "3", "7", "10"]


def soft_reference(q, idx, ql, il, ic, keep, down):
    s = q.astype(np.float64) @ idx.astype(np.float64).T
    same = (ql[:, None] == il[None, :]) & (ql[:, None] >= 0)
    s = np.where(same, s + ic[None, :], s - down * ic[None, :])
    order = np.stack([np.lexsort((np.arange(len(idx)), -row)) for row in s])[:, :keep]
    return np.take_along_axis(s, order, 1), order


def test_soft_by_hand():
    # one query, three index images: cos 0.9 (other label), 0.5 (same label), 0.8 (same label, no conf)
    q = np.array([[1.0, 0.0]], np.float32)
    idx = unit(np.array([[0.9, math.sqrt(1 - 0.81)], [0.5, math.sqrt(0.75)], [0.8, 0.6]], np.float32))
    v, r = ret.soft_scores(q, idx, np.array([5]), np.array([1, 5, 5]), np.array([0.6, 0.6, 0.0]), keep=3)
    # 0.9 - 0.1*0.6 = 0.84 ; 0.5 + 0.6 = 1.1 ; 0.8 + 0 = 0.8
    assert r.tolist() == [[1, 0, 2]]
    assert v[0].tolist() == pytest.approx([1.1, 0.84, 0.8], abs=1e-6)
    # a query without label gets no bonus, only the down-weight
    v, r = ret.soft_scores(q, idx, np.array([-1]), np.array([1, 5, 5]), np.array([0.6, 0.6, 0.0]), keep=2)
    assert r.tolist() == [[0, 2]]


@pytest.mark.parametrize("qc,dc", [(None, None), (4, 7)])
def test_soft_equals_dense_reference(qc, dc):
    rng = np.random.default_rng(0)
    q, idx = unit(rng.standard_normal((30, 12))), unit(rng.standard_normal((120, 12)))
    ql = rng.integers(-1, 6, 30)
    il = rng.integers(-1, 6, 120)
    ic = rng.uniform(0, 1, 120).astype(np.float32)
    v, r = ret.soft_scores(q, idx, ql, il, ic, keep=20, down=0.1, query_chunk=qc, db_chunk=dc)
    rv, rr = soft_reference(q, idx, ql, il, ic, 20, 0.1)
    np.testing.assert_allclose(v, rv, atol=1e-5)
    # ids agree except float32 near-ties, whose exact scores are equal to 1e-5
    rows, cols = np.nonzero(r != rr)
    full = soft_reference(q, idx, ql, il, ic, 120, 0.1)
    exact = np.zeros((30, 120))
    np.put_along_axis(exact, full[1], full[0], 1)
    assert np.all(np.abs(exact[rows, r[rows, cols]] - exact[rows, rr[rows, cols]]) < 1e-5)
    assert (r == rr).mean() > 0.99


def test_sum_ensemble_by_hand():
    # two models, two queries; index ids 0..4; model B does not hold query 1 (rows -1)
    a = (np.array([[0.9, 0.5, 0.4], [0.7, 0.6, 0.1]], np.float32), np.array([[0, 1, 2], [3, 4, 0]]))
    b = (np.array([[0.8, 0.3, 0.0], [0.0, 0.0, 0.0]], np.float32), np.array([[1, 3, 0], [-1, -1, -1]]))
    out = ret.sum_ensemble([a, b], n_index=5, n_results=3)
    # q0: id0 0.9+0.0=0.9, id1 0.5+0.8=1.3, id2 0.4, id3 0.3 -> 1, 0, 2
    assert out[0].tolist() == [1, 0, 2]
    assert out[1].tolist() == [3, 4, 0]
    # equal sums: ascending index; fewer kept than asked: only those
    c = (np.array([[0.5, 0.5]], np.float32), np.array([[4, 2]]))
    assert ret.sum_ensemble([c], n_index=5, n_results=100)[0].tolist() == [2, 4]


def test_ensemble_descriptors_mean_cosine_and_partial_queries():
    rng = np.random.default_rng(1)
    db = [unit(rng.standard_normal((6, 8))) for _ in range(3)]
    qs = [unit(rng.standard_normal((4, 8))) for _ in range(3)]
    D = ret.ensemble_descriptors(db).cpu().numpy()
    present = [np.ones(4, bool), np.array([1, 1, 0, 1], bool), np.array([1, 0, 0, 1], bool)]
    Q = ret.ensemble_descriptors([q[p] for q, p in zip(qs, present)], present).cpu().numpy()
    got = Q @ D.T
    for r in range(4):
        models = [m for m in range(3) if present[m][r]]
        want = np.mean([qs[m][r] @ db[m].T for m in models], axis=0)
        np.testing.assert_allclose(got[r], want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-6)  # full rows: norm 1 (1/sqrt(M))


def test_two_stage_by_hand():
    labels = np.array([0, 7, 1, 7, 1, 1, 1, 1, 7, 7])  # label of index rows 0..9
    conf = np.array([0.1, 0.2, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.3, 0.5])
    initial = np.array([[5, 3, 7, 1], [5, 3, 7, 1]])
    out = ret.two_stage(initial, None, np.array([7, 7]), np.array([0.2, 0.5]), labels, conf, n_results=10)
    # sort-step: positives 3, 1 keep their order; insert 9 (0.2+0.5>0.6), not 8 (0.2+0.3); then 5, 7
    assert out[0].tolist() == [3, 1, 9, 5, 7]
    # higher query conf admits 8 too, by descending conf: 9 (0.5) then 8 (0.3)
    assert out[1].tolist() == [3, 1, 9, 8, 5, 7]
    cut = ret.two_stage(initial, None, np.array([7, -1]), np.array([0.5, 0.5]), labels, conf, n_results=3)
    assert cut[0].tolist() == [3, 1, 9] and cut[1].tolist() == [5, 3, 7]  # no label: initial order
    eq = ret.two_stage(np.array([[0]]), None, np.array([7]), np.array([0.5]), labels, np.full(10, 0.3), n_results=5)
    assert eq[0].tolist() == [1, 3, 8, 9, 0]  # equal conf: ascending row


MODELS = ["dolg_effnet_b5_768", "dolg_effnet_b6_768", "hybrid_b3_swin224_896", "effnet_b6_512"]


@pytest.fixture(scope="module")
def retrieval_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_retrieval")
    cfg = synthetic.SyntheticConfig(
        seed=3, index_landmarks=100, index_distractors=600, retrieval_queries=150, retrieval_nonlandmark_queries=30
    )
    paths = synthetic.write_store(synthetic.generate(cfg), out, "retrieval", models=MODELS)
    sol = metrics.read_solution(paths["solution"], "retrieval")
    return paths, {**sol["Public"], **sol["Private"]}


def test_each_reranking_beats_plain_cosine_on_synthetic_world(retrieval_world):
    paths, solution = retrieval_world
    score = {}
    for rerank in ("none", "soft", "two-stage"):
        preds = pipeline.retrieval_from_store(paths["store"], paths["train_labels"], rerank=rerank, progress=False)
        assert all(len(v) == 100 for v in preds.values())
        score[rerank] = metrics.map_at_k(preds, solution)
    single = pipeline.retrieval_from_store(
        paths["store"], paths["train_labels"], rerank="none", models="dolg_effnet_b5_768", progress=False
    )
    score["single"] = metrics.map_at_k(single, solution)
    assert score["soft"] > score["none"] + 0.05, score
    assert score["two-stage"] > score["none"] + 0.01, score
    assert score["none"] > score["single"], score  # the ensemble beats one model


def test_constants_are_parameters(retrieval_world):
    paths, solution = retrieval_world
    a = pipeline.retrieval_from_store(paths["store"], paths["train_labels"], n_results=10, soft_keep=20,
                                      down_weight=0.0, knn_k=1, progress=False)
    assert all(len(v) == 10 for v in a.values())
    b = pipeline.retrieval_from_store(paths["store"], paths["train_labels"], rerank="two-stage",
                                      insert_threshold=-10.0, n_results=100, progress=False)
    assert all(len(v) == 100 for v in b.values())
    with pytest.raises(Exception, match="unknown post-processing parameter"):
        pipeline.retrieval_from_store(paths["store"], paths["train_labels"], kappa=3)
