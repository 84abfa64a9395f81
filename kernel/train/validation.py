"""Validation of a training step: descriptors and head predictions of the held-out images, sharded over the
DDP ranks, scored with the project's own metrics (GAP of the head's predictions, mAP@100 of the held-out images
retrieving each other).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from kernel.train.data import ClassMap
from kernel.train.nets import get_head

if TYPE_CHECKING:
    from kernel.train.distributed import Dist


@torch.no_grad()
def embed(net, dataset, device, batch_size: int, workers: int, amp_dtype=None, desc="embed"):
    """Descriptors and head outputs of a whole dataset (eval mode). Returns ``(emb, logits)`` float32 numpy."""
    net.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    embs, preds = [], []
    head = get_head(net)
    for x, _ in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 5):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            e = net(x.to(device, non_blocking=True))
        logits = head(e.float())
        conf, cls = logits.max(dim=1)
        embs.append(e.float().cpu())
        preds.append(torch.stack([cls.float(), conf.float()], dim=1).cpu())
    return torch.cat(embs).numpy(), torch.cat(preds).numpy()


def embed_sharded(net, dataset, env: Dist, batch_size: int, workers: int, amp_dtype=None):
    """:func:`embed` with the dataset split into ``env.world`` contiguous shards, one per rank, gathered on
    every rank in dataset order (padded to equal length for ``all_gather``, then trimmed). No process group: plain
    :func:`embed`."""
    if not env.distributed:
        return embed(net, dataset, env.device, batch_size, workers, amp_dtype, desc="validate")
    shards = np.array_split(np.arange(len(dataset)), env.world)
    mine = shards[env.rank]
    width = None
    if len(mine):
        emb, preds = embed(net, Subset(dataset, mine.tolist()), env.device, batch_size, workers, amp_dtype,
                           desc="validate")
        rows = torch.from_numpy(np.concatenate([emb, preds], axis=1))
        width = rows.shape[1]
    sizes = [None] * env.world
    dist.all_gather_object(sizes, width)
    width = next(w for w in sizes if w is not None)
    longest = max(len(x) for x in shards)
    buf = torch.zeros(longest, width, device=env.device)
    if len(mine):
        buf[: len(mine)] = rows.to(env.device)
    parts = [torch.empty_like(buf) for _ in range(env.world)]
    dist.all_gather(parts, buf)
    out = torch.cat([p[: len(sh)] for p, sh in zip(parts, shards)]).cpu().numpy()
    return out[:, :-2], out[:, -2:]


def validation_metrics(ids, landmarks, emb, preds, class_map: ClassMap, k: int = 100, device=None) -> dict:
    """GAP of the head's predictions and mAP@k of held-out images retrieving each other (a query never
    retrieves itself; queries whose landmark has no other held-out image are left out). A landmark id below 0
    is a non-landmark image: no true landmark for GAP (a prediction on it counts as wrong), never a query,
    but retrievable (a distractor). Similarities run on ``device`` (default CPU)."""
    from kernel.metrics import gap, map_at_k

    ids = [str(i) for i in ids]
    landmarks = np.asarray(landmarks)
    pred_lm = class_map.decode(preds[:, 0].astype(np.int64))
    recognition = {i: (int(p), float(c)) for i, p, c in zip(ids, pred_lm, preds[:, 1])}
    truth = {i: [int(t)] if t >= 0 else [] for i, t in zip(ids, landmarks)}
    out = {"gap": float(gap(recognition, truth)), "n_val": len(ids)}
    e = torch.from_numpy(emb).to(device or "cpu")
    retrieved, relevant = {}, {}
    by_lm: dict[int, list[str]] = {}
    for i, t in zip(ids, landmarks):
        by_lm.setdefault(int(t), []).append(i)
    kk = min(k, len(ids) - 1)
    for start in range(0, len(ids), 1024):
        sims = e[start : start + 1024] @ e.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + start] = -float("inf")
        top = sims.topk(kk, dim=1).indices.cpu().numpy() if kk > 0 else np.zeros((sims.shape[0], 0), np.int64)
        for r, q in enumerate(range(start, start + sims.shape[0])):
            rel = [j for j in by_lm[int(landmarks[q])] if j != ids[q]] if landmarks[q] >= 0 else []
            if rel:
                retrieved[ids[q]] = [ids[j] for j in top[r]]
                relevant[ids[q]] = rel
    out["map100"] = float(map_at_k(retrieved, relevant, k=k)) if relevant else float("nan")
    out["n_queries"] = len(relevant)
    return out
