"""k-NN landmark voting: the label and confidence every re-ranking step starts from (docs/postprocessing.md#k-nn-voting).

The k-NN label of an image x: take its ``k`` nearest labelled train images, sum their similarities per
landmark; label(x) = the landmark with the largest sum, conf(x) = that sum / ``divisor`` (the 2019 code
divides by k = 3, **our reading**; the recognition post-processing keeps the plain sum, divisor 1).

Landmarks are integer codes here (``-1`` = no label); :func:`kernel.postprocess.reference.codes` maps landmark
ids to codes.
"""
from __future__ import annotations

import numpy as np

from kernel import search


def vote(scores: np.ndarray, labels: np.ndarray, divisor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Sum the neighbours' scores per landmark and pick the best landmark of every row.

    Args:
        scores: (N, k) neighbour scores, best first.
        labels: (N, k) integer landmark codes of those neighbours (``-1`` = no neighbour, never chosen).
        divisor: the winning sum is divided by it.

    Returns:
        ``(label, conf)``: int64 codes (``-1`` when a row has no neighbour) and float32 confidences (0.0
        there). Equal sums go to the landmark of the better-ranked neighbour.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, k = labels.shape
    if k == 0:
        return np.full(n, -1, np.int64), np.zeros(n, np.float32)
    valid = labels >= 0
    # sums[r, j] = total score of the landmark of neighbour j in row r (O(k^2), k is tiny)
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, None, :]
    sums = (same * np.where(valid, scores, 0.0)[:, None, :]).sum(axis=2)
    sums = np.where(valid, sums, -np.inf)
    best = np.argmax(sums, axis=1)  # first maximum = best-ranked neighbour among equal sums
    rows = np.arange(n)
    label = np.where(valid[rows, best], labels[rows, best], -1)
    conf = np.where(label >= 0, sums[rows, best] / divisor, 0.0)
    return label.astype(np.int64), conf.astype(np.float32)


def knn_labels(
    queries, train, train_codes: np.ndarray, k: int = 3, divisor: float | None = None, **search_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """k-NN label and confidence of every query row against labelled train descriptors.

    ``divisor`` defaults to ``k`` (conf = best landmark's similarity sum / k). Returns int64 codes and
    float32 confidences; with an empty train set every label is ``-1``.
    """
    n = len(queries)
    if len(train) == 0:
        return np.full(n, -1, np.int64), np.zeros(n, np.float32)
    sims, idx = search.topk(queries, train, k, **search_kwargs)
    return vote(sims, np.asarray(train_codes)[idx], float(k if divisor is None else divisor))
