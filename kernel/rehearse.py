"""``python -m kernel rehearse``: the post-processing at the real scale, before spending a submission.

Writes a synthetic descriptor store of the competition's size (defaults: 1,580,470 train images as in
GLDv2-clean, 76,176 index images as in the 2021 retrieval index, 10,000 test images, the eight models of
the 2021 ensemble, a non-landmark bank of 2,000) in the store's real format (float16 ``.npz``, 512-d, one
model at a time, never the whole set in memory), then runs ``postprocess`` for each track in a child
process and reports its wall time and peak resident memory (the child's own ``VmHWM``) against the
budget, and a projection of the time on Kaggle.

The descriptors are clustered like landmark descriptors (every image is its landmark's centre plus
noise, each model with its own noise), so the searches do real work; the answers themselves mean nothing.
The store is kept (``--out``) and reused by a later rehearsal of the same sizes.

Kaggle projection (our model, stated): the post-processing time is its similarity products on the GPU at
``GPU_TFLOPS`` x ``GPU_EFFICIENCY`` plus reading the stored descriptors at ``READ_MBS``; the constants
are assumptions (the T4's float32 peak, 8.1 TFLOPS, since the search multiplies in float32 on a GPU too,
half of it reached by the blocked products with their selections; 200 MB/s from a Kaggle dataset mount),
not measurements.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kernel.memory import DEFAULT_MEMORY_GB
from kernel import store
from kernel.errors import KernelError
from kernel.models.manifest import ENSEMBLE

logger = logging.getLogger(__name__)

HELP = "write a synthetic store at the real scale and run both tracks' post-processing under the memory budget"

#: the 2021 recognition ensemble (the first eight of the nine; the retrieval run uses those of them serving it)
MODELS = tuple(m for m in ENSEMBLE if "recognition" in m[2])
GPU_TFLOPS = 8.1  # T4 float32 peak (NVIDIA T4 datasheet): the search's products are float32
GPU_EFFICIENCY = 0.5  # assumed reachable fraction of it
READ_MBS = 200.0  # stored descriptors read from the dataset mount, MB/s (assumed)
BLOCK = 1 << 16  # rows generated and written at a time


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _descriptor_blocks(n: int, landmark: np.ndarray, centres: np.ndarray, noise: float, seed: int):
    """Rows ``normalise(centre[landmark] + noise * gaussian / sqrt(dim))`` in float16, BLOCK at a time."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        x = centres[landmark[s:e]] + (noise / np.sqrt(dim)) * rng.standard_normal((e - s, dim), dtype=np.float32)
        yield _unit(x).astype(np.float16)


def write_store(out: Path, n_train: int, n_index: int, n_test: int, n_bank: int, n_models: int,
                n_landmarks: int = 81313, dim: int = 512, seed: int = 0) -> dict:
    """The synthetic competition store in ``out/store`` plus ``out/train.csv``; returns its description."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_landmarks + 1, dim), dtype=np.float32))  # last: non-landmarks
    sizes = {"train": n_train, "index": n_index, "test": n_test, "nonlandmark": n_bank}
    landmarks = {k: rng.integers(0, n_landmarks, v) for k, v in sizes.items()}
    landmarks["nonlandmark"][:] = n_landmarks
    ids = {k: np.char.add(f"{k[:2]}", np.char.zfill(np.arange(v).astype(str), 9)) for k, v in sizes.items()}
    root = out / "store"
    models = MODELS[:n_models] if n_models <= len(MODELS) else [
        (f"model_{j}", ("dolg", "hybrid", "effnet")[j % 3], ("recognition", "retrieval")) for j in range(n_models)]
    for j, (name, family, tracks) in enumerate(models):
        for split, n in sizes.items():
            if split == "index" and "retrieval" not in tracks:
                continue
            blocks = _descriptor_blocks(n, landmarks[split], centres, 1.2, seed=1000 * j + len(split))
            store.save_npz_streamed(store.split_path(root, name, split), ids[split], dim, np.float16, blocks)
        store.write_meta(root, name, {"name": name, "family": family, "tracks": list(tracks), "dim": dim,
                                      "image_size": None, "sha256": None, "synthetic": True})
        logger.info("rehearsal store: %s written (%d/%d)", name, j + 1, len(models))
    labels = out / "train.csv"
    with open(labels, "w") as fh:
        fh.write("id,landmark_id\n")
        for s in range(0, n_train, BLOCK):
            fh.writelines(f"{i},{lm}\n" for i, lm in zip(ids["train"][s : s + BLOCK], landmarks["train"][s : s + BLOCK]))
    return {"sizes": sizes, "models": [m[0] for m in models], "dim": dim, "seed": seed, "landmarks": n_landmarks}


def run_child(args: list[str], log_path: Path, module: str = "kernel") -> dict:
    """Run ``python -m kernel postprocess ...`` (``python -m MODULE ARGS``); its wall time and peak resident memory.

    The peak is the one the child reports for its own program (``peak_rss_gib`` in its last JSON line:
    :func:`kernel.memory.peak_rss_gib`); ``getrusage`` of the child through ``wait4`` is kept beside it as
    ``child_maxrss_gib`` (on Linux it includes this process's size at the fork, see that function).
    """
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    reported = None
    for line in reversed(Path(log_path).read_text(errors="replace").splitlines()):
        if line.startswith("{") and "peak_rss_gib" in line:
            reported = json.loads(line)["peak_rss_gib"]
            break
    maxrss = usage.ru_maxrss / 2**20
    return {"seconds": time.monotonic() - t0, "peak_rss_gib": reported if reported is not None else maxrss,
            "child_maxrss_gib": maxrss, "returncode": code, "log": str(log_path)}


def products_tflop(track: str, sizes: dict, n_retrieval: int, dim: int) -> float:
    """TFLOP of the similarity products of one post-processing (2 per multiply-add)."""
    t, i, q, b = sizes["train"], sizes["index"], sizes["test"], sizes["nonlandmark"]
    if track == "recognition":
        fam = 3 * dim
        return 2 * fam * (q * t + t * b + q * b) / 1e12
    return 2 * dim * n_retrieval * ((q + i) * t + q * i) / 1e12


def projected_kaggle_s(tflop: float, bytes_read: float) -> float:
    return tflop / (GPU_TFLOPS * GPU_EFFICIENCY) + bytes_read / (READ_MBS * 1e6)


def retrieval_models_of(store_dir: Path, limit: int | None = None) -> list[str]:
    """The first ``limit`` models of a rehearsal store that serve retrieval (its meta.json ``tracks``)."""
    names = [m for m in store.list_models(store_dir) if "retrieval" in store.read_meta(store_dir, m).get("tracks", ())]
    order = {n: j for j, (n, _, _) in enumerate(MODELS)}
    return sorted(names, key=lambda n: order.get(n, len(order)))[:limit]


def add_arguments(p) -> None:
    from kernel.cli import number

    p.add_argument("--out", default="rehearsal", help="folder for the synthetic store, logs and results (kept)")
    p.add_argument("--train", type=number(int, 1), default=1_580_470, help="train images (GLDv2-clean: 1,580,470)")
    p.add_argument("--index", type=number(int, 1), default=76_176, help="retrieval index images (2021: 76,176)")
    p.add_argument("--test", type=number(int, 1), default=10_000, help="test images")
    p.add_argument("--bank", type=number(int, 0), default=2_000, help="non-landmark bank images")
    p.add_argument("--models", type=number(int, 1), default=8, help="models in the store (the 2021 ensemble: 8)")
    p.add_argument("--retrieval-models", type=number(int, 1), default=None, help="models the retrieval run uses (default all)")
    p.add_argument("--tracks", default="recognition,retrieval", help="comma-separated tracks to run")
    p.add_argument("--memory-gb", type=number(float, 0, exclusive_min=True), default=DEFAULT_MEMORY_GB, help="the budget every run must stay under")
    p.add_argument("--device", default=None)


def _ensure_store(out: Path, args) -> dict:
    marker = out / "rehearsal.json"
    want = {"sizes": {"train": args.train, "index": args.index, "test": args.test, "nonlandmark": args.bank},
            "n_models": args.models}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have.get("want") == want:
            logger.info("reusing the rehearsal store in %s", out)
            return have["store"]
        raise KernelError(f"--out {out}: holds a rehearsal of other sizes ({have.get('want')}); "
                          "choose another folder (or remove that one)")
    if out.exists() and any(out.iterdir()):
        raise KernelError(f"--out {out}: exists, is not empty and holds no rehearsal: choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    desc = write_store(out, args.train, args.index, args.test, args.bank, args.models)
    desc["write_seconds"] = time.monotonic() - t0
    marker.write_text(json.dumps({"want": want, "store": desc}, indent=2))
    return desc


def run(args) -> int:
    out = Path(args.out)
    desc = _ensure_store(out, args)
    retrieval_models = retrieval_models_of(out / "store", args.retrieval_models)
    results = []
    for track in [t.strip() for t in args.tracks.split(",") if t.strip()]:
        cmd = ["postprocess", "--track", track, "--store", str(out / "store"), "--train-labels",
               str(out / "train.csv"), "--out", str(out / f"{track}_submission.csv"), "--memory-gb",
               str(args.memory_gb), "--no-progress", "--prepared", str(out / "no-prepared")]
        if track == "retrieval":
            cmd += ["--models", ",".join(retrieval_models)]
        if args.device:
            cmd += ["--device", args.device]
        r = run_child(cmd, out / f"{track}.log")
        n_models = len(retrieval_models) if track == "retrieval" else len(desc["models"])
        tflop = products_tflop(track, desc["sizes"], len(retrieval_models), desc["dim"])
        s = desc["sizes"]
        read = 2 * desc["dim"] * n_models * (s["train"] + s["test"] + (s["index"] if track == "retrieval" else s["nonlandmark"]))
        r.update(track=track, models=n_models, tflop=tflop, projected_kaggle_s=projected_kaggle_s(tflop, read),
                 within_budget=r["peak_rss_gib"] <= args.memory_gb and r["returncode"] == 0)
        results.append(r)
        print(f"{track:12s} {n_models} models: {r['seconds']:8.1f} s here, peak {r['peak_rss_gib']:.2f} GiB "
              f"(budget {args.memory_gb:g}) {'OK' if r['within_budget'] else 'OVER / FAILED'}; "
              f"{tflop:.1f} TFLOP of products, projected on Kaggle ~{r['projected_kaggle_s'] / 60:.1f} min"
              + ("" if r["returncode"] == 0 else f"; exit {r['returncode']}, see {r['log']}"))
    summary = {"store": desc, "memory_gb": args.memory_gb, "results": results,
               "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    (out / "rehearsal_result.json").write_text(json.dumps(summary, indent=2))
    print(f"everything: {out / 'rehearsal_result.json'}")
    return 0 if all(r["within_budget"] for r in results) else 1
