"""The scored rerun's folders, made from the public ones: what a notebook meets when Kaggle scores it.

Kaggle scores a code-competition notebook by running it again on hidden data (docs/kaggle.md#the-scored-rerun):
a larger test set, and reference folders that differ from the public ones (the 2021 recognition rerun's
``train.csv`` held new landmarks and lacked some public ids; retrieval's hidden index is larger). A rehearsal on the
public folder alone cannot show how a notebook meets that. :func:`make_rerun` writes such a variant of a public
competition folder, without any label of the hidden data:

* recognition: ``new_landmarks`` landmarks of ``train.csv`` become new ones (their train images get new ids and a
  new landmark id: present, never shipped), ``gone`` other train images are removed, and the test set is
  ``test_factor`` times the public one (its images again under new ids) plus, for each new landmark, copies of
  its train images as test images whose answer is known (the new landmark);
* retrieval: ``added`` index images appear under new ids (present, never shipped), ``gone`` index images are
  removed, and the test set grows as above, plus queries that copy each added index image (their best answer is
  known: that image).

Unchanged images are symbolic links to the public files (hard links or copies where links fail), so a variant of a
full-size folder costs little disk. ``rerun.json`` beside the folder says what was changed and the known answers.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from kernel.errors import KernelError

IMAGE_SUFFIX = ".jpg"


def _new_id(seed: int, *parts) -> str:
    return hashlib.sha256("/".join(map(str, ("rerun", seed, *parts))).encode()).hexdigest()[:16]


def _place(src: Path, root: Path, split: str, image_id: str, link: bool = True) -> None:
    """``root/<split>/a/b/c/<id>.jpg`` (Kaggle's layout) as a link to ``src`` (a copy where links fail)."""
    from kernel.data.sources import kaggle_path

    dst = Path(kaggle_path(root, split, image_id))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.symlink(Path(src).resolve(), dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _grow_test(public: Path, out: Path, factor: int, seed: int) -> list[str]:
    """The public test images, plus ``factor - 1`` more copies of each under new ids; returns every test id."""
    from kernel.data.sources import kaggle_split

    ids = []
    for r in kaggle_split(public, "test"):
        if not Path(r.path).is_file():
            continue
        _place(Path(r.path), out, "test", r.id)
        ids.append(r.id)
        for k in range(1, factor):
            copy = _new_id(seed, "test", r.id, k)
            _place(Path(r.path), out, "test", copy, link=False)  # a file of its own: a new image to the kernel
            ids.append(copy)
    return ids


def make_rerun(public, out, track: str, test_factor: int = 3, new_landmarks: int = 1, added: int = 3,
               gone: int = 2, seed: int = 0) -> dict:
    """Write the rerun variant of the public competition folder ``public`` into the new folder ``out``; returns
    (and writes as ``out/rerun.json``) what changed and the answers known by construction."""
    public, out = Path(public), Path(out)
    if out.exists() and any(out.iterdir()):
        raise KernelError(f"{out}: exists and is not empty: the rerun variant needs a new folder")
    if test_factor < 1:
        raise KernelError(f"test_factor must be at least 1 (got {test_factor})")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    test_ids = _grow_test(public, out, test_factor, seed)
    info = (_recognition(public, out, rng, new_landmarks, gone, seed) if track == "recognition"
            else _retrieval(public, out, rng, added, gone, seed))
    test_ids += sorted(info["known_answers"])
    header = ["id", "landmarks"] if track == "recognition" else ["id", "images"]
    _write_csv(out / "sample_submission.csv", header, [(i, "") for i in sorted(test_ids)])
    info.update(track=track, public=str(public), test_images=len(test_ids), test_factor=test_factor, seed=seed)
    (out / "rerun.json").write_text(json.dumps(info, indent=2))
    return info


def _recognition(public: Path, out: Path, rng: random.Random, n_new: int, n_gone: int, seed: int) -> dict:
    from kernel.data.sources import kaggle_split
    from kernel.labels import read_train_labels

    labels = read_train_labels(public / "train.csv")
    records = {r.id: r for r in kaggle_split(public, "train") if Path(r.path).is_file()}
    counts = labels[labels.index.isin(list(records))].value_counts()
    candidates = sorted(counts[counts >= 2].index, key=int)
    if len(candidates) < n_new:
        raise KernelError(f"{public / 'train.csv'}: fewer than {n_new} landmarks with two train images")
    chosen = rng.sample(candidates, n_new)
    top = max(int(x) for x in labels.unique())
    renamed, known, rows, new_landmarks = {}, {}, [], {}
    for k, lm in enumerate(chosen):
        new_lm = str(top + 1 + k)
        new_landmarks[new_lm] = str(lm)
        for old in sorted(labels.index[labels == lm]):
            if old in records:
                renamed[old] = (_new_id(seed, "train", old), new_lm)
        first = sorted(o for o in renamed if renamed[o][1] == new_lm)[0]
        known[_new_id(seed, "test-of", first)] = (first, new_lm)
    others = sorted(i for i in records if i not in renamed)
    gone = set(rng.sample(others, min(n_gone, len(others))))
    for image_id, lm in labels.items():
        if image_id in gone or image_id not in records:
            continue
        new_id, lm = renamed.get(image_id, (image_id, lm))
        _place(Path(records[image_id].path), out, "train", new_id, link=image_id not in renamed)
        rows.append((new_id, lm))
    for test_id, (src, _) in known.items():
        _place(Path(records[src].path), out, "test", test_id, link=False)
    _write_csv(out / "train.csv", ["id", "landmark_id"], sorted(rows))
    return {"new_landmarks": new_landmarks,  # new landmark id -> the public one whose images it took
            "added_train": sorted(v[0] for v in renamed.values()), "gone_train": sorted(gone | set(renamed)),
            "known_answers": {t: lm for t, (_, lm) in known.items()}}


def _retrieval(public: Path, out: Path, rng: random.Random, n_added: int, n_gone: int, seed: int) -> dict:
    from kernel.data.sources import kaggle_split

    records = [r for r in kaggle_split(public, "index") if Path(r.path).is_file()]
    if len(records) < n_added + n_gone:
        raise KernelError(f"{public / 'index'}: too few index images for {n_added} added and {n_gone} gone")
    picked = rng.sample(records, n_added + n_gone)
    sources, gone = picked[:n_added], {r.id for r in picked[n_added:]}
    for r in records:
        if r.id not in gone:
            _place(Path(r.path), out, "index", r.id)
    known = {}
    for r in sources:
        new_id = _new_id(seed, "index", r.id)
        _place(Path(r.path), out, "index", new_id, link=False)
        query = _new_id(seed, "query-of", r.id)
        _place(Path(r.path), out, "test", query, link=False)
        known[query] = new_id
    return {"added_index": sorted(known.values()), "gone_index": sorted(gone), "known_answers": known}


# ------------------------------------------------------------------------------- python -m kernel rerun

HELP = "rehearse the scored rerun: a built bundle's notebook on the rerun variant of a public competition folder"

#: what the notebook runs its cells with: one namespace, in order, like Jupyter's "Run all"
CELL_RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for i, source in enumerate(json.load(open(sys.argv[1]))):
    print(f"---- cell {i}", flush=True)
    exec(compile(source, f"<cell {i}>", "exec"), namespace)
"""


def add_arguments(p) -> None:
    from kernel.cli import number

    p.add_argument("--bundle", required=True, help="a build_kernel.py output folder (dataset/ and notebook/)")
    p.add_argument("--data", required=True, help="the public competition folder (test/, train/ or index/, ...)")
    p.add_argument("--track", choices=["recognition", "retrieval"], required=True)
    p.add_argument("--out", required=True, help="a new folder: the variant, a Kaggle-like root, the report")
    p.add_argument("--test-factor", type=number(int, 1), default=3, help="hidden test set / public (default 3)")
    p.add_argument("--new-landmarks", type=number(int, 1), default=1, help="recognition: landmarks made new")
    p.add_argument("--added", type=number(int, 1), default=3, help="retrieval: index images added")
    p.add_argument("--gone", type=number(int, 0), default=2, help="shipped reference images removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", choices=["all", "weights"], default="weights",
                   help="the notebook's dataset check: every file's sha256, or the checkpoints' only (default)")


def _notebook_cells(bundle: Path, track: str) -> tuple[list[str], dict]:
    """The built notebook's code cells and its configuration (slug, competition folder name)."""
    import re

    from kernel.bundle.notebook import code_cells_of

    found = sorted((bundle / "notebook" / track).glob("*.ipynb"))
    if not found:
        raise KernelError(f"{bundle / 'notebook' / track}: no notebook of the {track} track in this build")
    cells = code_cells_of(found[0].read_text())
    config = dict(re.findall(r"^(DATASET_SLUG|COMPETITION) = (?:INPUT / )?'([^']+)'", cells[0], re.M))
    if len(config) != 2:
        raise KernelError(f"{found[0]}: not a notebook written by build_kernel.py (no DATASET_SLUG/COMPETITION)")
    return cells, config


def _kaggle_root(out: Path, bundle: Path, variant: Path, config: dict) -> Path:
    """``out/kaggle``: ``input/<slug>`` and ``input/<competition>`` as links, an empty ``working/``."""
    root = out / "kaggle"
    (root / "input").mkdir(parents=True)
    (root / "working").mkdir()
    os.symlink((bundle / "dataset").resolve(), root / "input" / config["DATASET_SLUG"])
    os.symlink(variant.resolve(), root / "input" / config["COMPETITION"])
    return root


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def run(args) -> int:
    import subprocess
    import sys
    import time

    from kernel.submission import check_submission

    bundle, out = Path(args.bundle), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KernelError(f"--out {out}: exists and is not an empty folder: the rehearsal needs a new one")
    cells, config = _notebook_cells(bundle, args.track)
    info = make_rerun(args.data, out / "competition", args.track, test_factor=args.test_factor,
                      new_landmarks=args.new_landmarks, added=args.added, gone=args.gone, seed=args.seed)
    root = _kaggle_root(out, bundle, out / "competition", config)
    (out / "cells.json").write_text(json.dumps(cells))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(KAGGLE_ROOT=str(root), KERNEL_VERIFY=args.verify)
    t0 = time.monotonic()
    with open(out / "notebook.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CELL_RUNNER, str(out / "cells.json")], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=out)
        _, status, usage = os.wait4(proc.pid, 0)
    report = _report(root, info, args.track, os.waitstatus_to_exitcode(status), time.monotonic() - t0,
                     usage.ru_maxrss / 2**20, check_submission)
    report["log"] = str(out / "notebook.log")
    (out / "rerun_report.json").write_text(json.dumps(report, indent=2))
    for line in _summary(report):
        print(line)
    return 0 if report["notebook_exit"] == 0 and report["submission_valid"] else 1


def _report(root: Path, info: dict, track: str, code: int, seconds: float, peak_gib: float, check) -> dict:
    """What the scored run would do: coverage, plan, time, peak memory, saved output, validity, known answers."""
    import pandas as pd

    working = root / "working"
    sub, log = working / "submission.csv", working / "submission.log.json"
    run_log = json.loads(log.read_text()) if log.is_file() else {}
    valid, answers = False, {}
    if sub.is_file():
        frame = pd.read_csv(sub, dtype=str, keep_default_na=False)
        answers = dict(zip(frame["id"], frame.iloc[:, 1]))
        try:
            check(track, sub, list(pd.read_csv(_variant(root) / "sample_submission.csv", dtype=str)["id"]))
            valid = True
        except KernelError:
            valid = False
    right = sum(1 for t, want in info["known_answers"].items() if want in answers.get(t, "").split()[:1 if
                track == "recognition" else 100])
    saved = {str(p.relative_to(working)) for p in working.rglob("*") if p.is_file()
             and p.relative_to(working).parts[0] != "pylib"}
    return {"notebook_exit": code, "seconds": round(seconds, 1), "peak_rss_gib": round(peak_gib, 2),
            "submission_valid": valid, "test_images": info["test_images"],
            "predicted": sum(1 for v in answers.values() if v), "coverage": run_log.get("coverage", {}),
            "plan": [d for d in run_log.get("decisions", []) if d.startswith(("probe", "drop", "even"))],
            "models": run_log.get("models", []), "known_answers_right": right,
            "known_answers": len(info["known_answers"]), "saved_output_files": sorted(saved),
            "saved_output_bytes": _bytes_under(working), "variant": info}


def _variant(root: Path) -> Path:
    """The competition folder the Kaggle-like root links (the one holding rerun.json)."""
    return next(p for p in (root / "input").iterdir() if (p / "rerun.json").is_file())


def _summary(r: dict) -> list[str]:
    lines = [f"rerun rehearsal: notebook exit {r['notebook_exit']} in {r['seconds']:.0f} s, peak "
             f"{r['peak_rss_gib']:.2f} GiB; submission {'valid' if r['submission_valid'] else 'NOT VALID'}: "
             f"{r['predicted']}/{r['test_images']} test images predicted with {len(r['models'])} models"]
    for split, per_model in r["coverage"].items():
        c = next(iter(per_model.values()))
        lines.append(f"  {split}: {c['used']} shipped and used, {c['added']} new (extracted {c['extracted']}), "
                     f"{c['gone']} gone")
    lines += [f"  plan: {d}" for d in r["plan"]]
    lines.append(f"  known answers (new reference images): {r['known_answers_right']}/{r['known_answers']} right")
    lines.append(f"  saved output: {r['saved_output_bytes']} bytes ({', '.join(r['saved_output_files'])} "
                 "and the installed wheels)")
    return lines
