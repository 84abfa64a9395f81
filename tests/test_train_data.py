"""GLDv2 label CSVs, class map, folder layouts, dataset, holdout, sampler."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kernel.errors import KernelError
from kernel.train.data import (
    ClassMap,
    DistributedWeightedSampler,
    LandmarkDataset,
    class_weights,
    find_layout,
    holdout,
    load_named,
    read_labels,
    read_val_labels,
)


def test_read_both_csv_formats(tmp_path):
    (tmp_path / "train.csv").write_text("id,url,landmark_id\naaa1,http://x,7\nbbb2,http://y,3\nccc3,,7\n")
    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n7,aaa1 ccc3\n")
    full = read_labels(tmp_path / "train.csv")
    assert list(full.columns) == ["id", "landmark_id"] and full["landmark_id"].tolist() == [7, 3, 7]
    clean = read_labels(tmp_path / "train_clean.csv")
    assert sorted(clean["id"]) == ["aaa1", "ccc3"] and set(clean["landmark_id"]) == {7}
    x = load_named(tmp_path, "gldv2x")  # every train.csv image of the clean classes
    assert sorted(x["id"]) == ["aaa1", "ccc3"]
    assert len(load_named(tmp_path, "gldv2")) == 3


@pytest.mark.parametrize("text, message", [
    ("image,label\na,1\n", "needs columns 'id,landmark_id'"),
    ("id,landmark_id\na,x\n", "labels.csv:2: landmark_id 'x' is not a non-negative integer"),
    ("id,landmark_id\na,1\nb,007\n", "labels.csv:3: landmark_id '007' is not a non-negative integer"),
    ("id,landmark_id\na,1\na,2\n", "labels.csv:3: id a appears twice"),
    ("id,landmark_id\na b,1\n", "labels.csv:2: id 'a b' holds a comma, quote, whitespace"),
    # train_clean.csv: the line of the class row that lists the image
    ("landmark_id,images\n7,a b\n8,c a\n", "labels.csv:3: id a appears twice"),
    ("landmark_id,images\n7,a b\n-8,c\n", "labels.csv:3: landmark_id '-8' is not a non-negative integer"),
])
def test_bad_csv_names_file_line_and_field(tmp_path, text, message):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(KernelError, match=message) as err:
        read_labels(p)
    assert str(err.value).startswith(f"{p}:")


def test_training_reads_train_csv_as_post_processing_does(tmp_path):
    """One reader (kernel.labels): the same ids and landmarks, as int64 for training, as text for post-processing."""
    from kernel.labels import read_train_labels

    p = tmp_path / "train.csv"
    p.write_text("id,url,landmark_id\n aaa1 ,http://x,7\nbbb2,,9223372036854775807\n")
    df = read_labels(p)
    assert df["landmark_id"].dtype == np.int64
    assert df.to_dict("list") == {"id": ["aaa1", "bbb2"], "landmark_id": [7, 2**63 - 1]}
    assert read_train_labels(p).to_dict() == {"aaa1": "7", "bbb2": "9223372036854775807"}
    p.write_text("id,landmark_id\na,9223372036854775808\n")
    with pytest.raises(KernelError, match="train.csv:2: landmark_id '9223372036854775808' is larger"):
        read_labels(p)


def test_missing_files(tmp_path):
    with pytest.raises(KernelError, match="nope.csv: train labels file not found"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(KernelError, match="val.csv: validation labels file not found"):
        read_val_labels(tmp_path / "val.csv")
    with pytest.raises(KernelError, match="unknown data set"):
        load_named(tmp_path, "gldv3")


def test_class_map_round_trip(tmp_path):
    cm = ClassMap([30, 10, 20, 10])
    assert cm.landmark_ids == [10, 20, 30] and len(cm) == 3
    assert cm.encode([20, 30, 10]).tolist() == [1, 2, 0]
    assert cm.decode([2, 0]).tolist() == [30, 10]
    cm.save(tmp_path / "cm.csv")
    assert ClassMap.load(tmp_path / "cm.csv") == cm
    with pytest.raises(KernelError, match="landmark_id 99"):
        cm.encode([99])


def _jpg(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path)


def test_layouts_and_dataset(tmp_path):
    nested = tmp_path / "nested"
    _jpg(nested / "a" / "b" / "c" / "abc1.jpg", (255, 0, 0))
    _jpg(nested / "d" / "e" / "f" / "def2.jpg", (0, 255, 0))
    (nested / "1" / "2" / "3").mkdir(parents=True)
    (nested / "1" / "2" / "3" / "123x.jpg").write_bytes(b"not a jpeg")
    assert find_layout(nested, "abc1") == "nested"
    flat = tmp_path / "flat"
    _jpg(flat / "abc1.jpg", (0, 0, 255))
    assert find_layout(flat, "abc1") == "flat"
    with pytest.raises(KernelError, match="neither"):
        find_layout(flat, "zzz9")
    ds = LandmarkDataset(["abc1", "123x", "def2"], [0, 1, 2], nested)
    img, cls = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 20) and cls == 0
    img, cls = ds[1]  # undecodable: replaced by the next image
    assert cls == 2 and ds.failures == 1 and int(img[1].float().mean()) == 255


def test_holdout_keeps_every_class_in_training():
    df = pd.DataFrame({"id": [f"i{k}" for k in range(23)],
                       "landmark_id": [1] * 10 + [2] * 10 + [3] * 2 + [4]})
    tr, va = holdout(df, 0.3, seed=1)
    assert set(tr["landmark_id"]) == {1, 2, 3, 4}
    # floor(0.3 n) per class: the 2-image class and the singleton lose nothing (the originals' class counts)
    assert va["landmark_id"].value_counts().to_dict() == {1: 3, 2: 3}
    assert (tr["landmark_id"] == 3).sum() == 2
    assert not set(tr["id"]) & set(va["id"]) and len(tr) + len(va) == len(df)
    tr0, va0 = holdout(df, 0.0)
    assert len(va0) == 0 and len(tr0) == len(df)


def test_validation_csv_in_the_2019_solution_format(tmp_path):
    p = tmp_path / "recognition_solution_v2.1.csv"
    p.write_text("id,landmarks,Usage\na1,12,Public\nb2,,Private\nc3,7 9,Private\nd4,5,Ignored\n")
    df = read_val_labels(p)
    assert df.to_dict("list") == {"id": ["a1", "b2", "c3"], "landmark_id": [12, -1, 7]}  # -1: non-landmark
    p.write_text("id,landmarks\na1,x\n")
    with pytest.raises(KernelError, match="field 'landmarks'"):
        read_val_labels(p)
    p.write_text("id,landmark_id\na1,3\n")
    assert read_val_labels(p)["landmark_id"].tolist() == [3]
    # id,landmark_id validation labels may mark non-landmark images -1, as the solution format's empty field
    p.write_text("id,landmark_id\na1,3\nb2,-1\nc3,7\n")
    assert read_val_labels(p).to_dict("list") == {"id": ["a1", "b2", "c3"], "landmark_id": [3, -1, 7]}
    p.write_text("id,landmark_id\na1,3\nb2,-2\n")  # any other negative id is still refused, line named
    with pytest.raises(KernelError, match=r":3: landmark_id '-2'"):
        read_val_labels(p)


def test_train_labels_have_no_non_landmark_rows(tmp_path):
    # training classes are landmarks: -1 is refused in train.csv, and in a class row of train_clean.csv
    from kernel.train.data import read_labels

    p = tmp_path / "train.csv"
    p.write_text("id,landmark_id\na1,3\nb2,-1\n")
    with pytest.raises(KernelError, match=r"train.csv:3: landmark_id '-1'"):
        read_labels(p)
    p.write_text("landmark_id,images\n3,a1 b2\n-1,c3\n")
    with pytest.raises(KernelError, match=r"train.csv:3: landmark_id '-1'"):
        read_val_labels(p)
    p.write_text("landmark_id,images\n3,a1 b2\n5,c3\n")
    assert read_val_labels(p).to_dict("list") == {"id": ["a1", "b2", "c3"], "landmark_id": [3, 3, 5]}


def test_weighted_sampler_balances_and_shards():
    classes = np.array([0] * 90 + [1] * 10)
    w = class_weights(classes, 1.0)
    s0 = DistributedWeightedSampler(w, num_samples=2000, rank=0, world=2, seed=4)
    s1 = DistributedWeightedSampler(w, num_samples=2000, rank=1, world=2, seed=4)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 2000
    frac = (classes[np.array(a + b)] == 1).mean()
    assert 0.45 < frac < 0.55  # power 1: classes equally likely
    s0.set_epoch(1)
    assert list(s0) != a
