"""Cleaning the training labels by clustering descriptors (2020 retrieval 3rd place, docs/training.md#the-2020-retrieval-seeds).

Embed every GLDv2 image with a model trained on GLDv2c (``python -m kernel extract`` into a store), then,
inside each landmark:

1. DBSCAN (cosine distance ``eps``, ``min_samples``) splits the landmark's images into clusters; every cluster
   becomes a class of its own (a landmark photographed inside and outside becomes two classes);
2. the images DBSCAN called noise are clustered again with a looser ``recover_eps`` / ``recover_min_samples``:
   those clusters become classes too (they recover long-tail views the first pass was too strict for);
3. what is still noise is dropped.

The output CSV has ``id,landmark_id,source_landmark_id,cluster`` (``landmark_id`` the new class, numbered
from 0; ``cluster`` like ``0``, ``1`` for the first pass and ``r0`` for recovered clusters), ready for
``fit`` as the ``gldv2_clustered`` data set (save it as ``train_clustered.csv``). A JSON report with the
counts lies beside it. The paper's run: 4.1 M images in, 2.8 M images in ~210 k classes out.
Thresholds are **our reading** (the source gives none); keep them parameters.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from kernel.errors import KernelError

log = logging.getLogger(__name__)


def cluster_class(emb: np.ndarray, eps: float, min_samples: int, recover_eps: float, recover_min_samples: int):
    """Cluster one landmark's L2-normalised descriptors. Returns a list with, per image, ``"k"`` (first-pass
    cluster k), ``"rk"`` (recovered cluster k) or ``None`` (dropped)."""
    from sklearn.cluster import DBSCAN

    out: list = [None] * len(emb)
    if len(emb) >= min_samples:
        first = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(emb)
    else:
        first = np.full(len(emb), -1)
    for i, c in enumerate(first):
        if c >= 0:
            out[i] = str(c)
    noise = np.flatnonzero(first < 0)
    if len(noise) >= recover_min_samples:
        second = DBSCAN(eps=recover_eps, min_samples=recover_min_samples, metric="cosine").fit_predict(emb[noise])
        for i, c in zip(noise, second):
            if c >= 0:
                out[i] = f"r{c}"
    return out


def clean_labels(labels: pd.DataFrame, ids, emb: np.ndarray, eps: float = 0.4, min_samples: int = 3,
                 recover_eps: float = 0.55, recover_min_samples: int = 2, progress: bool = True):
    """Run the cleaning over every landmark of ``labels`` (``id,landmark_id``), descriptors ``emb`` of
    ``ids``. Returns ``(clean_df, report)``."""
    if not 0 < eps <= recover_eps:
        raise KernelError(f"need 0 < eps <= recover_eps (got {eps}, {recover_eps})")
    row = {str(i): n for n, i in enumerate(ids)}
    has = labels["id"].map(row)
    missing = int(has.isna().sum())
    if missing == len(labels):
        raise KernelError("no image of the label CSV has a descriptor in the store (other split or model?)")
    if missing:
        log.warning("%d images of the label CSV have no descriptor: they are dropped", missing)
    df = labels.assign(row=has).dropna(subset=["row"])
    df["row"] = df["row"].astype(np.int64)
    emb = np.asarray(emb, dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    out_ids, out_src, out_cluster = [], [], []
    split, recovered = 0, 0
    groups = df.groupby("landmark_id").indices
    for lid, idx in tqdm(groups.items(), desc="DBSCAN per landmark", disable=not progress):
        sub = df.iloc[idx]
        clusters = cluster_class(emb[sub["row"].to_numpy()], eps, min_samples, recover_eps, recover_min_samples)
        kept = {c for c in clusters if c is not None}
        split += len(kept) > 1
        for image_id, c in zip(sub["id"], clusters):
            if c is None:
                continue
            recovered += c.startswith("r")
            out_ids.append(image_id)
            out_src.append(int(lid))
            out_cluster.append(c)
    clean = pd.DataFrame({"id": out_ids, "source_landmark_id": out_src, "cluster": out_cluster})
    keys = clean["source_landmark_id"].astype(str) + "/" + clean["cluster"]
    clean.insert(1, "landmark_id", pd.factorize(keys)[0].astype(np.int64))
    report = {
        "images_in": int(len(labels)),
        "images_without_descriptor": missing,
        "classes_in": int(labels["landmark_id"].nunique()),
        "images_out": int(len(clean)),
        "classes_out": int(clean["landmark_id"].nunique()),
        "classes_split": int(split),
        "classes_dropped": int(labels["landmark_id"].nunique() - clean["source_landmark_id"].nunique()),
        "images_dropped": int(len(df) - len(clean)),
        "images_recovered": int(recovered),
        "params": {"eps": eps, "min_samples": min_samples, "recover_eps": recover_eps,
                   "recover_min_samples": recover_min_samples},
    }
    return clean, report


def run_clean(store, model: str | None, split: str, train_csv, out, **params) -> dict:
    """``python -m kernel.train clean``: read the store and the labels, clean, write CSV + report atomically."""
    from kernel import store as st
    from kernel.cli import output_file
    from kernel.train.data import read_labels

    output_file(out, "--out", inputs=[store, train_csv], side_files=[Path(out).with_name(Path(out).stem + ".report.json")])
    models = st.list_models(store)
    if model is None:
        if len(models) != 1:
            raise KernelError(f"{store}: holds {len(models)} models ({', '.join(models) or 'none'}); pick one with --model")
        model = models[0]
    ids, emb = st.load_split(store, model, split)  # checked by the store's reader
    labels = read_labels(train_csv)
    clean, report = clean_labels(labels, ids, emb, **params)
    report.update(store=str(store), model=model, split=split, train_csv=str(train_csv))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    clean.to_csv(tmp, index=False)
    tmp.replace(out)
    rep = out.with_name(out.stem + ".report.json")
    rep.with_name(rep.name + ".tmp").write_text(json.dumps(report, indent=2))
    rep.with_name(rep.name + ".tmp").replace(rep)
    log.info("cleaned %s: %d -> %d images, %d -> %d classes (%d split, %d images dropped, %d recovered)",
             train_csv, report["images_in"], report["images_out"], report["classes_in"], report["classes_out"],
             report["classes_split"], report["images_dropped"], report["images_recovered"])
    return report
