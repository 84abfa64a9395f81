"""DBSCAN cleaning: a class made of two distant clusters is split, noise dropped, long tail recovered."""
import json

import numpy as np
import pandas as pd
import pytest

from kernel import store
from kernel.train.clean import clean_labels, cluster_class
from kernel.train.cli import main


def _blob(center, n, spread, rng):
    x = center + spread * rng.standard_normal((n, len(center)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(rng, dim=16):
    e = np.eye(dim)
    emb = np.concatenate([
        _blob(e[0], 12, 0.05, rng),  # landmark 7, view 1 (e.g. outside)
        _blob(e[1], 10, 0.05, rng),  # landmark 7, view 2 (inside): far from view 1
        _blob(e[2], 15, 0.05, rng),  # landmark 9: one tight cluster ...
        e[3:4] + 0.0,                # ... plus an unrelated outlier
        _blob(e[4], 2, 0.15, rng),   # landmark 11: two long-tail views, too few for the first pass
    ])
    ids = [f"img{i:03d}" for i in range(len(emb))]
    labels = pd.DataFrame({"id": ids, "landmark_id": [7] * 22 + [9] * 16 + [11] * 2})
    return ids, emb, labels


def test_cluster_class_splits_two_distant_clusters():
    rng = np.random.default_rng(0)
    ids, emb, labels = _data(rng)
    out = cluster_class(emb[:22], eps=0.2, min_samples=3, recover_eps=0.5, recover_min_samples=2)
    assert len({c for c in out[:12]}) == 1 and len({c for c in out[12:]}) == 1 and out[0] != out[12]


def test_clean_labels_report():
    rng = np.random.default_rng(1)
    ids, emb, labels = _data(rng)
    clean, rep = clean_labels(labels, ids, emb, eps=0.2, min_samples=3, recover_eps=0.5, recover_min_samples=2,
                              progress=False)
    assert rep["classes_in"] == 3 and rep["classes_split"] == 1
    assert rep["classes_out"] == 4  # 7 -> two classes, 9, 11 (recovered)
    assert rep["images_dropped"] == 1 and "img037" not in set(clean["id"])  # the outlier
    assert rep["images_recovered"] == 2 and set(clean.loc[clean["source_landmark_id"] == 11, "cluster"]) == {"r0"}
    seven = clean[clean["source_landmark_id"] == 7]
    assert seven.groupby("landmark_id").size().sort_values().tolist() == [10, 12]
    assert sorted(clean["landmark_id"].unique()) == [0, 1, 2, 3]


def test_clean_command_reads_store_and_writes_csv_and_report(tmp_path, capsys):
    rng = np.random.default_rng(2)
    ids, emb, labels = _data(rng)
    store.save_split(tmp_path / "store", "dolg_effnet_b5_768", "train", ids[:-1], emb[:-1])  # one without descriptor
    store.write_meta(tmp_path / "store", "dolg_effnet_b5_768", {"name": "dolg_effnet_b5_768", "family": "dolg"})
    labels.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "train_clustered.csv"
    rc = main(["clean", "--store", str(tmp_path / "store"), "--train-csv", str(tmp_path / "train.csv"),
               "--out", str(out), "--eps", "0.2", "--recover-eps", "0.5"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["images_without_descriptor"] == 1 and rep["classes_split"] == 1
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "landmark_id", "source_landmark_id", "cluster"]
    assert json.loads((tmp_path / "train_clustered.report.json").read_text())["images_out"] == len(df)
    from kernel.train.data import read_labels

    assert len(read_labels(out)) == len(df)  # fit reads it as the gldv2_clustered data set


def test_clean_command_errors(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("id,landmark_id\na,1\n")
    rc = main(["clean", "--store", str(tmp_path / "nostore"), "--model", "m", "--train-csv",
               str(tmp_path / "train.csv"), "--out", str(tmp_path / "o.csv")])
    assert rc == 2 and "error:" in capsys.readouterr().err
    with pytest.raises(Exception):
        clean_labels(pd.DataFrame({"id": ["a"], "landmark_id": [1]}), ["a"], np.ones((1, 4)), eps=0.6, recover_eps=0.5)
