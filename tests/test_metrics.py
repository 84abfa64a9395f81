"""kernel.metrics: GAP and mAP@100 on hand-checked cases, with Kaggle's conventions."""
import pytest

from kernel import metrics
from kernel.errors import KernelError


def test_gap_by_hand_with_non_landmark_and_missing_prediction():
    solution = {"a": ["1"], "b": ["2"], "c": [], "d": ["3"]}  # c is a non-landmark image
    preds = {"a": ("1", 0.9), "c": ("5", 0.8), "b": ("2", 0.7), "d": None}
    # ranked a (right, P=1/1), c (wrong), b (right, P=2/3); M = 3 images with a landmark
    assert metrics.gap(preds, solution) == pytest.approx((1 + 2 / 3) / 3)
    # without the non-landmark prediction b moves up: (1 + 2/2) / 3
    assert metrics.gap({**preds, "c": None}, solution) == pytest.approx(2 / 3)


def test_gap_ties_sorted_by_id_not_by_dict_order():
    solution = {"x": ["9"], "y": ["2"]}
    preds = {"y": ("2", 0.5), "x": ("1", 0.5)}  # equal confidences: x ranks first (id ascending)
    assert metrics.gap(preds, solution) == pytest.approx((0 + 1 / 2) / 2)


def test_gap_multiple_true_landmarks_int_vs_str_and_ignored_ids():
    solution = {"e": [1, 2], "f": ["7"]}
    preds = {"e": ("2", 0.3), "f": (7, 0.1), "zzz": ("1", 0.99)}  # zzz is not scored
    assert metrics.gap(preds, solution) == pytest.approx(1.0)
    assert metrics.gap({}, solution) == 0.0
    assert metrics.gap({"a": ("1", 1.0)}, {"a": []}) == 0.0  # no landmark image at all


def test_gap_negative_confidences_rank_last():
    solution = {"a": ["1"], "b": ["2"]}
    preds = {"a": ("3", -0.2), "b": ("2", -0.1)}  # b first (right), a wrong
    assert metrics.gap(preds, solution) == pytest.approx(0.5)


def test_average_precision_by_hand():
    assert metrics.average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    # a repeated id counts once but keeps its rank: b is still at rank 3
    assert metrics.average_precision(["a", "a", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.average_precision([], {"a"}) == 0.0
    assert metrics.average_precision(["a"], set()) == 0.0


def test_map_only_first_100_and_min_relevant_100():
    relevant = {f"r{i}" for i in range(150)}
    assert metrics.map_at_k({"q": sorted(relevant)}, {"q": relevant}) == pytest.approx(1.0)
    late = [f"n{i}" for i in range(100)] + ["r0"]  # the hit at rank 101 does not count
    assert metrics.map_at_k({"q": late}, {"q": {"r0"}}) == 0.0
    half = [f"n{i}" for i in range(99)] + ["r0"]  # rank 100 counts: P = 1/100
    assert metrics.map_at_k({"q": half}, {"q": {"r0"}}) == pytest.approx(0.01)


def test_map_mean_over_solution_queries():
    solution = {"q1": ["a", "b"], "q2": ["c"], "q3": ["d"]}
    preds = {"q1": ["b", "a"], "q2": ["x", "c"], "extra": ["a"]}  # q3 unanswered: 0
    assert metrics.map_at_k(preds, solution) == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics.map_at_k(preds, {}) == 0.0


def test_read_solution(tmp_path):
    p = tmp_path / "sol.csv"
    p.write_text("id,landmarks,Usage\na,1 2,Public\nb,,Private\nc,,Ignored\n")
    sol = metrics.read_solution(p, "recognition")
    assert sol == {"Public": {"a": ["1", "2"]}, "Private": {"b": []}, "Ignored": {"c": []}}
    p.write_text("id,images,Usage\nq,i1 i2,Private\n")
    assert metrics.read_solution(p, "retrieval")["Private"] == {"q": ["i1", "i2"]}


@pytest.mark.parametrize("text,needle", [
    ("id,landmarks,Usage\na,1,Secret\n", "Usage 'Secret'"),
    ("id,landmarks,Usage\na,1,Public\na,2,Public\n", "appears twice"),
    ("id,landmark,Usage\na,1,Public\n", "column 'landmarks' is missing"),
])
def test_read_solution_errors_name_the_file(tmp_path, text, needle):
    p = tmp_path / "sol.csv"
    p.write_text(text)
    with pytest.raises(KernelError, match=needle) as e:
        metrics.read_solution(p, "recognition")
    assert str(p) in str(e.value)
    with pytest.raises(KernelError, match="not found"):
        metrics.read_solution(tmp_path / "nope.csv", "recognition")
