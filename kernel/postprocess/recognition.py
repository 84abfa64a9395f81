"""Recognition on descriptor arrays: family averaging and the 2020 non-landmark post-processing.

docs/postprocessing.md#recognition-family-descriptors-and-non-landmark-post-processing-2020 (2021 solution using Henkel & Singer 2020):

* every image's descriptor = the L2-normalised concatenation of its per-family means of the models'
  L2-normalised descriptors (dolg, hybrid, effnet: 1536-d with the three families), :func:`family_descriptors`;
* with a bank NL of known non-landmark images, B(t) = mean of the ``bank_k_train`` (5) largest cos(t, n)
  for every train image t, s(q, t) = clip(cos(q, t), 0, 1) - B(t);
* q's ``k`` (3) best train images by s vote: sum s per landmark, prediction = the best landmark,
  confidence = its sum, minus C(q) = mean of the ``bank_k_query`` (10) largest cos(q, n).

With an empty bank B and C are 0: plain k-NN voting on clipped cosines.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from kernel import search
from kernel.devices import resolve_device
from kernel.postprocess.knn import vote

logger = logging.getLogger(__name__)

#: defaults (docs/postprocessing.md#parameters)
KNN_K = 3  # train images that vote
BANK_K_TRAIN = 5  # B(t): mean of the 5 most similar non-landmark images
BANK_K_QUERY = 10  # C(q): mean of the 10 most similar non-landmark images
CLIP = (0.0, 1.0)  # cosines are clipped to this range before B(t) is subtracted


def family_descriptors(
    families: list[list[np.ndarray]],
    present: list[list[np.ndarray]] | None = None,
    n: int | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    normalize: bool = True,
) -> torch.Tensor:
    """Average the models' descriptors within each family, concatenate the families, L2-normalise.

    Args:
        families: per family, the (rows_m, D) arrays of its models.
        present: same nesting, a boolean mask over the ``n`` output rows of the rows each model holds
            (its array holds exactly those, in ascending row order). ``None``: every model holds all rows.
        n: number of output rows (needed with ``present``).

    A row's family block is the mean over the models of that family that hold the row (zero when none
    does), so a query a model missed uses the others. Accumulates in float32 on ``device`` and returns
    an (n, D * n_families) tensor in ``dtype``. ``normalize`` False skips the final L2 normalisation
    (our reading, docs/postprocessing.md#recognition-family-descriptors-and-non-landmark-post-processing-2020).
    """
    dev = resolve_device(device)
    if n is None:
        n = families[0][0].shape[0]
    dims = [fam[0].shape[1] for fam in families]
    out = torch.zeros(n, sum(dims), dtype=dtype, device=dev)
    off = 0
    for f, fam in enumerate(families):
        acc = out[:, off : off + dims[f]] if dtype == torch.float32 else torch.zeros(n, dims[f], device=dev)
        count = torch.zeros(n, dtype=torch.float32, device=dev)
        for j, arr in enumerate(fam):
            t = torch.as_tensor(arr).to(dev, torch.float32)
            if present is None:
                acc += t
                count += 1
            else:
                rows = torch.as_tensor(np.flatnonzero(present[f][j]), device=dev)
                acc.index_add_(0, rows, t)
                count[rows] += 1
        acc /= count.clamp(min=1)[:, None]
        if dtype != torch.float32:
            out[:, off : off + dims[f]] = acc.to(dtype)
        off += dims[f]
    if not normalize:
        return out
    # L2-normalise in float32 chunks (the matrix may be float16 and large)
    step = 1 << 16
    for r0 in range(0, n, step):
        blk = out[r0 : r0 + step].float()
        out[r0 : r0 + step] = (blk / blk.norm(dim=1, keepdim=True).clamp(min=1e-12)).to(dtype)
    return out


def bank_similarity(x, bank, k: int, **search_kwargs) -> np.ndarray:
    """Mean of the ``k`` largest cosines of every row of ``x`` with the bank (0 for an empty bank).

    With fewer than ``k`` bank images the mean runs over all of them.
    """
    n = len(x)
    if bank is None or len(bank) == 0 or k < 1:
        return np.zeros(n, np.float32)
    sims, _ = search.topk(x, bank, k, **search_kwargs)
    return sims.mean(axis=1, dtype=np.float64).astype(np.float32)


class NonLandmarkScore:
    """``score_fn`` for :func:`kernel.search.topk`: s(q, t) = clip(cos(q, t), lo, hi) - B(t)."""

    def __init__(self, train_bias, clip: tuple[float, float] = CLIP, device=None):
        self.bias = torch.as_tensor(np.asarray(train_bias, np.float32), device=resolve_device(device))
        self.lo, self.hi = clip

    def __call__(self, block: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        return block.clamp_(self.lo, self.hi).sub_(self.bias[cols])


def recognize(
    test,
    train,
    train_codes: np.ndarray,
    bank=None,
    k: int = KNN_K,
    bank_k_train: int = BANK_K_TRAIN,
    bank_k_query: int = BANK_K_QUERY,
    clip: tuple[float, float] = CLIP,
    progress: bool = False,
    train_bias: np.ndarray | None = None,
    **search_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark code and confidence of every test row (Henkel & Singer 2020 post-processing).

    Args:
        test, train, bank: family descriptors (rows L2-normalised); ``bank`` may be ``None`` / empty.
        train_codes: integer landmark code of every train row.
        train_bias: B(t) of every train row when already known (a prepared artefact); computed otherwise.

    Returns:
        ``(codes, confidences)``: int64 (``-1`` only when the train set is empty) and float32.
    """
    n = len(test)
    if len(train) == 0:
        return np.full(n, -1, np.int64), np.zeros(n, np.float32)
    have_bank = bank is not None and len(bank) > 0
    if have_bank:
        logger.info("non-landmark bank: %d images; B(t) for %d train images", len(bank), len(train))
        if train_bias is None:
            train_bias = bank_similarity(train, bank, bank_k_train, progress=progress, desc="B(train)", **search_kwargs)
        query_bias = bank_similarity(test, bank, bank_k_query, progress=progress, desc="C(test)", **search_kwargs)
    else:
        logger.info("no non-landmark bank: plain k-NN voting")
        train_bias = np.zeros(len(train), np.float32)
        query_bias = np.zeros(n, np.float32)
    fn = NonLandmarkScore(train_bias, clip=clip, device=search_kwargs.get("device"))
    s, idx = search.topk(test, train, k, score_fn=fn, progress=progress, desc="recognition", **search_kwargs)
    codes, conf = vote(s, np.asarray(train_codes)[idx], divisor=1.0)
    return codes, (conf.astype(np.float64) - query_bias).astype(np.float32)
