"""The build's size and content report: every file with its size and sha256, what was converted, warnings.

Written as ``OUT/report.json`` (everything) and ``OUT/report.txt`` (the same, readable); a summary is printed.
"""
from __future__ import annotations


import json
from pathlib import Path

from tqdm import tqdm

from kernel.files import sha256_file

_CHUNK = 1 << 22


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def hash_file(path: Path, bar: tqdm | None = None) -> str:
    return sha256_file(path, _CHUNK, on_block=bar.update if bar is not None else None)


def file_table(root: Path, exclude=(), progress: bool = True) -> dict:
    """``{relative posix path: {"size", "sha256"}}`` of every file under ``root``, sorted."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude)
    total = sum(p.stat().st_size for p in paths)
    out = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing dataset", disable=not progress,
              leave=False) as bar:
        for p in paths:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": hash_file(p, bar)}
    return out


def category(rel: str) -> str:
    top = rel.split("/", 1)[0]
    return {"kernel": "package", "weights": "checkpoints", "wheels": "wheels", "store": "descriptor stores",
            "index-store": "descriptor stores", "train.csv": "train labels"}.get(top, "metadata")


def totals(files: dict) -> dict:
    out = {}
    for rel, info in files.items():
        c = category(rel)
        n, size = out.get(c, (0, 0))
        out[c] = (n + 1, size + info["size"])
    return {c: {"files": n, "size": s} for c, (n, s) in sorted(out.items())}


def render(report: dict, full: bool = True) -> str:
    """The readable report; ``full=False`` leaves out the per-file listing (printed summary)."""
    lines = [f"build {report['build_id']}  ({report['created']}, kernel source {report['git']})",
             f"dataset {report['dataset']}  id {report['dataset_id']}  "
             f"{human(report['total_size'])} in {len(report['files'])} files"]
    if "upload" in report:
        u = report["upload"]
        lines.append(f"  upload with BUILD.json: {u['files']:,} files, {human(u['bytes'])} (Kaggle's limits per "
                     f"dataset: {u['max_files']:,} files, {human(u['max_bytes'])})")
    for c, t in report["totals"].items():
        lines.append(f"  {c:<18} {t['files']:>5} files  {human(t['size']):>10}")
    lines.append("checkpoints (shipped size, sha256, what was done):")
    for c in report["checkpoints"]:
        size = (f"{human(c['source_size'])} -> {human(c['size'])}" if c["size"] != c["source_size"]
                else human(c["size"]))
        lines.append(f"  {c['model']:<26} weights/{c['checkpoint']}  {size}  sha256 {c['sha256'][:16]}...")
        lines.append(f"  {'':<26} {c['conversion']}")
    if report["stores"]:
        lines.append("descriptor stores:")
        for s in report["stores"]:
            lines.append(f"  {s['path']:<52} {s['rows']:>9} x {s['dim']}  {human(s['size']):>10}")
    lines.append("wheels (offline install):")
    for w in report["wheels"]:
        lines.append(f"  wheels/{w['file']}  {human(w['size'])}  sha256 {w['sha256'][:16]}...  from {w['source']}")
    lines.append("notebooks:")
    for n in report["notebooks"]:
        lines.append(f"  {n['folder']}/{n['code_file']}  -> {n['id']}  ({n['kernel_type']}, competition "
                     f"{n['competition']}, GPU on, internet off)")
    if report["warnings"]:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in report["warnings"]]
    if full:
        lines.append("files (size, sha256):")
        for rel, info in report["files"].items():
            lines.append(f"  {rel:<64} {human(info['size']):>10}  {info['sha256']}")
    lines.append("upload:")
    lines.append(f"  kaggle datasets create -p {report['dataset']} --dir-mode zip")
    for n in report["notebooks"]:
        lines.append(f"  kaggle kernels push -p {n['folder']}")
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.txt").write_text(render(report, full=True))
