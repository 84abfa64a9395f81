"""kernel.submission: every test id exactly once, valid fields, clear errors."""
import pytest

from kernel import submission
from kernel.errors import KernelError


def test_recognition_roundtrip_with_empty_rows(tmp_path):
    path = tmp_path / "submission.csv"
    preds = {"a": ("12", 0.1 + 0.2), "b": ("7", -0.03125), "broken": None}
    submission.write_submission("recognition", preds, ["a", "b", "broken", "c"], path)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,landmarks" and len(lines) == 5
    assert lines[3] == "broken," and lines[4] == "c,"
    back = submission.read_submission("recognition", path)
    assert back["a"] == ("12", 0.1 + 0.2)  # the confidence reads back bit-exact
    assert back["b"] == ("7", -0.03125) and back["broken"] is None and back["c"] is None
    s = submission.check_submission("recognition", path, test_ids=["c", "b", "a", "broken"])
    assert s == {"track": "recognition", "rows": 4, "predicted": 2, "empty": 2, "landmarks": 2}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_retrieval_roundtrip_cuts_to_100(tmp_path):
    path = tmp_path / "submission.csv"
    many = [f"i{j}" for j in range(150)]
    submission.write_submission("retrieval", {"q1": many, "q2": ["i3", "i1"]}, ["q1", "q2", "q3"], path)
    back = submission.read_submission("retrieval", path)
    assert back["q1"] == many[:100] and back["q2"] == ["i3", "i1"] and back["q3"] is None
    s = submission.check_submission("retrieval", path, test_ids=["q1", "q2", "q3"], index_ids=many)
    assert s["rows"] == 3 and s["predicted"] == 2 and s["mean_images"] == 51.0 and s["duplicates"] == 0


def test_write_refuses_duplicate_test_ids_and_drops_unknown(tmp_path, caplog):
    with pytest.raises(KernelError, match="listed twice"):
        submission.write_submission("retrieval", {}, ["a", "a"], tmp_path / "s.csv")
    submission.write_submission("retrieval", {"zzz": ["i"]}, ["a"], tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text() == "id,images\na,\n"
    assert "not test ids" in caplog.text


@pytest.mark.parametrize("track,text,needle", [
    ("recognition", "id,images\na,\n", "header must be 'id,landmarks'"),
    ("recognition", "id,landmarks\na,1 0.5\na,2 0.5\n", ":3: id a appears twice"),
    ("recognition", "id,landmarks\na,1\n", "'<landmark_id> <confidence>'"),
    ("recognition", "id,landmarks\na,x 0.5\n", "integer landmark_id"),
    ("recognition", "id,landmarks\na,1 nan\n", "not a finite number"),
    ("recognition", "id,landmarks\na,1,2\n", "expected 2 fields"),
    ("retrieval", "id,images\nq," + " ".join(f"i{j}" for j in range(101)) + "\n", "101 index ids, at most 100"),
])
def test_format_errors_name_file_and_line(tmp_path, track, text, needle):
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(KernelError, match=needle) as e:
        submission.check_submission(track, path)
    assert str(path) in str(e.value)


def test_check_ids_against_test_and_index(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,images\nq1,i1 i1\nq9,\n")
    with pytest.raises(KernelError, match="1 test ids missing \\(e.g. q2\\), 1 ids that are not test ids \\(e.g. q9\\)"):
        submission.check_submission("retrieval", path, test_ids=["q1", "q2"])
    with pytest.raises(KernelError, match="names i1, which is not an index id"):
        submission.check_submission("retrieval", path, index_ids=["i2"])
    assert submission.check_submission("retrieval", path)["duplicates"] == 1  # allowed, counted once
    with pytest.raises(KernelError, match="not found"):
        submission.check_submission("retrieval", tmp_path / "none.csv")
    with pytest.raises(KernelError, match="unknown track"):
        submission.check_submission("detection", path)
