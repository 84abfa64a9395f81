"""Test-independent post-processing work, computed once and shipped: *prepared artefacts*.

Nothing here depends on the test images, so it can be computed offline (``python -m kernel prepare``),
shipped in the Kaggle dataset next to the descriptor store, and reused by every ``postprocess`` and by
every chunk of ``predict``:

=========================== ==================================================================
file (in ``STORE/prepared``) what it holds
=========================== ==================================================================
``recognition_train.npz``    the recognition family descriptor of every train image (``ids``, ``embeddings``)
``recognition_bank.npz``     the same for the non-landmark bank
``recognition_bias.npz``     B(t) of every train image (``ids``, ``bias``): mean of its 5 best bank cosines
``retrieval_<model>.npz``    a model's k-NN landmark and confidence of every index image (``ids``,
                             ``landmarks``, ``conf``), for the soft up/down re-ranking
``two_stage.npz``            the same with the two-stage ensemble descriptor
=========================== ==================================================================

Every file carries a ``fingerprint`` (JSON) of what it was computed from: each model's name, checkpoint
sha256 and family; the count, width, dtype and a sha256 of the ids of every split used; the sha256 of
the train labels where labels matter; the parameters. A file is used only when its fingerprint equals the
one of the current inputs; otherwise the work is recomputed and the log says which fields differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kernel import store
from kernel.files import atomic_write
from kernel.errors import KernelError

logger = logging.getLogger(__name__)

PREPARED = "prepared"  # STORE/prepared/
FORMAT = 1  # bumped when an artefact's meaning changes

_split_cache: dict[tuple, dict] = {}


def prepared_dir(store_dir) -> Path:
    return Path(store_dir) / PREPARED


def ids_digest(ids) -> str:
    """sha256 of the ids, one per line, in their order."""
    h = hashlib.sha256()
    arr = np.asarray(ids).astype(str)
    for s in range(0, len(arr), 1 << 16):
        h.update(("\n".join(arr[s : s + (1 << 16)].tolist()) + "\n").encode())
    return h.hexdigest()


def split_fingerprint(path: Path) -> dict:
    """Rows, width, stored dtype and ids digest of a descriptor ``.npz`` (cached per file version)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _split_cache:
        from kernel.rows import npz_member_layout

        with np.load(path, allow_pickle=False) as z:
            ids = z["ids"]
            layout = npz_member_layout(Path(path), "embeddings.npy")
            dtype, shape = (layout[1], layout[2]) if layout else (z["embeddings"].dtype, z["embeddings"].shape)
        _split_cache[key] = {"n": int(shape[0]), "dim": int(shape[1]), "dtype": str(dtype), "ids": ids_digest(ids)}
    return _split_cache[key]


def model_fingerprint(meta: dict, store_dir, splits: tuple[str, ...]) -> dict:
    """What identifies a model's contribution: name, the sha256 of the checkpoint that computed its
    descriptors (``computed_with_sha256`` where a bundle converted the checkpoint after extraction, else
    ``sha256``), family and its splits."""
    return {
        "name": meta["name"], "sha256": meta.get("computed_with_sha256", meta.get("sha256")),
        "family": str(meta.get("family")),
        "splits": {s: stored_split_fingerprint(store_dir, meta["name"], s) for s in splits},
    }


def stored_split_fingerprint(store_dir, model: str, split: str) -> dict:
    """:func:`split_fingerprint` of a store's split, or of the rows of its view (:mod:`kernel.views`): a view
    that leaves nothing out and adds nothing fingerprints as its shipped file, so shipped artefacts still
    match; any other view differs in its count and ids, and what depends on it is recomputed."""
    from kernel.views import read_view

    view = read_view(store_dir, model, split)
    if view is None:
        return split_fingerprint(store.split_path(store_dir, model, split))
    parts = [(split_fingerprint(p), store.read_ids(p), exclude) for p, exclude in view.sources()]
    ids = np.concatenate([i[~np.isin(i, np.asarray(sorted(x), dtype=str))] if x else i for _, i, x in parts])
    dtypes = {fp["dtype"] for fp, _, _ in parts}
    return {"n": len(ids), "dim": parts[0][0]["dim"], "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "ids": ids_digest(ids)}


def labels_digest(labels: pd.Series) -> str:
    """sha256 of the (id, landmark_id) pairs of the train labels, in id order."""
    s = labels.sort_index()
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(pd.DataFrame({"id": s.index, "lm": s.to_numpy()}), index=False)
             .to_numpy().tobytes())
    return h.hexdigest()


def fingerprint(kind: str, models: list[dict], params: dict, labels: str | None = None) -> dict:
    fp = {"format": FORMAT, "kind": kind, "models": models, "params": params}
    if labels is not None:
        fp["train_labels"] = labels
    return json.loads(json.dumps(fp, sort_keys=True, default=str))  # canonical (tuples -> lists)


def read_fingerprint(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["fingerprint"])) if "fingerprint" in z else None
    except Exception:  # unreadable file: treated as absent
        return None


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def find(dirs, name: str, fp: dict) -> Path | None:
    """The first ``<dir>/<name>`` whose fingerprint equals ``fp``; logs why others were not used."""
    for d in dirs or []:
        path = Path(d) / name
        if not path.is_file():
            continue
        have = read_fingerprint(path)
        if have == fp:
            logger.info("using prepared %s", path)
            return path
        why = "no fingerprint" if have is None else "differs in " + ", ".join(_differences(have, fp)[:6])
        logger.warning("prepared %s does not match the current inputs (%s): recomputing", path, why)
    return None


def write(path: Path, fp: dict, ids, dim: int | None = None, dtype=np.float32, blocks=None, **arrays) -> Path:
    """Write an artefact: ``ids``, optional streamed ``embeddings`` (``blocks``), small ``arrays``, and the
    fingerprint. Refuses to replace a file that is not a prepared artefact."""
    path = Path(path)
    if path.exists() and read_fingerprint(path) is None:
        raise KernelError(f"{path}: exists and is not a prepared artefact; not overwriting it")
    extra = {k: np.asarray(v) for k, v in arrays.items()}
    extra["fingerprint"] = np.asarray(json.dumps(fp, sort_keys=True))
    if blocks is None:
        ids_arr = np.asarray([str(i) for i in ids], dtype=str)
        atomic_write(path, lambda fh: np.savez(fh, ids=ids_arr, **extra))
    else:
        store.save_npz_streamed(path, ids, dim, dtype, blocks, **extra)
    logger.info("wrote prepared %s", path)
    return path


def load_arrays(path: Path, *names: str) -> tuple[np.ndarray, ...]:
    with np.load(path, allow_pickle=False) as z:
        return tuple(z[n] for n in names)
