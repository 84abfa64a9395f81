"""Recognition post-processing: family descriptors, non-landmark bank, voting; synthetic proof."""
import math

import numpy as np
import pytest

from kernel import metrics
from tests import synthetic
from kernel.postprocess import pipeline
from kernel.postprocess import recognition as rec


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_family_descriptors_by_hand():
    a1 = np.array([[1.0, 0.0]], np.float32)
    a2 = np.array([[0.0, 1.0]], np.float32)
    b1 = np.array([[0.6, 0.8]], np.float32)
    d = rec.family_descriptors([[a1, a2], [b1]]).cpu().numpy()
    # family a: mean (0.5, 0.5); family b: (0.6, 0.8); concatenated, then L2-normalised
    want = np.array([0.5, 0.5, 0.6, 0.8]) / math.sqrt(0.5 + 1.0)
    np.testing.assert_allclose(d[0], want, atol=1e-6)


def test_family_descriptors_partial_rows():
    # row 1 is held only by model a2 of family a, and by nobody in family b
    a1 = np.array([[1.0, 0.0]], np.float32)  # holds row 0
    a2 = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)  # holds rows 0 and 1
    b1 = np.array([[0.6, 0.8]], np.float32)  # holds row 0
    present = [[np.array([1, 0], bool), np.array([1, 1], bool)], [np.array([1, 0], bool)]]
    d = rec.family_descriptors([[a1, a2], [b1]], present, n=2).cpu().numpy()
    np.testing.assert_allclose(d[1], [0.0, 1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(d[0], np.array([0.5, 0.5, 0.6, 0.8]) / math.sqrt(1.5), atol=1e-6)


def test_nonlandmark_postprocessing_by_hand():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    train = np.stack([e1, e2])  # t1 = e1 (landmark A, code 0), t2 = e2 (landmark B, code 1)
    codes = np.array([0, 1])
    bank = np.stack([e2])  # a non-landmark image that looks like t2
    q = unit(np.array([[1.0, 1.2, 0.0]]))
    c1, c2 = float(q[0] @ e1), float(q[0] @ e2)  # 0.640, 0.768
    # without bank: plain k-NN voting, B picked (0.768 > 0.640)
    code, conf = rec.recognize(q, train, codes, None, k=2)
    assert code.tolist() == [1] and conf[0] == pytest.approx(c2, abs=1e-6)
    # with bank: B(t1) = 0, B(t2) = 1 -> s = 0.640 and -0.232; C(q) = cos(q, e2) = 0.768
    code, conf = rec.recognize(q, train, codes, bank, k=2, bank_k_train=1, bank_k_query=1)
    assert code.tolist() == [0] and conf[0] == pytest.approx(c1 - c2, abs=1e-6)
    # k = 2 neighbours of the same landmark add up; B and C average over a bank smaller than their k
    train3 = np.stack([e1, unit(np.array([[1.0, 0.0, 1.0]]))[0], e2])
    code, conf = rec.recognize(q, train3, np.array([0, 0, 1]), bank, k=2)
    s = [c1 - 0.0, float(q[0] @ train3[1]) - float(train3[1] @ e2)]
    assert code.tolist() == [0] and conf[0] == pytest.approx(sum(s) - c2, abs=1e-6)


def test_negative_cosines_are_clipped_to_zero():
    train = np.array([[-1.0, 0.0], [0.0, 1.0]], np.float32)
    q = np.array([[1.0, 0.0]], np.float32)  # cos -1 and 0: both clip to 0, the tie goes to the first row
    code, conf = rec.recognize(q, train, np.array([4, 9]), None, k=1)
    assert code.tolist() == [4] and conf.tolist() == [0.0]
    code, conf = rec.recognize(q, train, np.array([4, 9]), None, k=1, clip=(-1.0, 1.0))
    assert code.tolist() == [9]


def test_bank_similarity_edge_cases():
    x = unit(np.random.default_rng(0).standard_normal((5, 4)))
    assert rec.bank_similarity(x, None, 5).tolist() == [0.0] * 5
    assert rec.bank_similarity(x, x[:0], 5).tolist() == [0.0] * 5
    np.testing.assert_allclose(rec.bank_similarity(x, x, 1), 1.0, atol=1e-6)


MODELS = ["dolg_effnet_b5_768", "dolg_effnet_b6_768", "hybrid_b3_swin224_896", "effnet_b6_512"]


def test_nonlandmark_bank_beats_plain_voting_on_synthetic_world(tmp_path):
    cfg = synthetic.SyntheticConfig(seed=1, recognition_queries=200, recognition_nonlandmark_queries=200, n_bank=400)
    world = synthetic.generate(cfg)
    result = {}
    for bank in (True, False):
        paths = synthetic.write_store(world, tmp_path / str(bank), "recognition", models=MODELS, bank=bank)
        sol = metrics.read_solution(paths["solution"], "recognition")
        scored = {**sol["Public"], **sol["Private"]}
        preds = pipeline.recognition_from_store(paths["store"], paths["train_labels"], progress=False)
        assert set(preds) == set(world.recognition_test.ids) and all(p is not None for p in preds.values())
        result[bank] = metrics.gap(preds, scored)
        if bank:
            lm = [preds[k][1] for k, v in scored.items() if v]
            nl = [preds[k][1] for k, v in scored.items() if not v]
            assert np.mean(nl) < np.mean(lm) - 0.3  # non-landmark queries lose their confidence
    single = pipeline.recognition_from_store(paths["store"], paths["train_labels"], models=MODELS[:1], progress=False)
    result["single"] = metrics.gap(single, scored)
    assert result[True] > result[False] + 0.03, result
    assert result[False] > result["single"], result  # family ensemble beats one model
