"""``python -m kernel dry-run``: the whole Kaggle job, locally, from nothing but the installed project.

1. builds a sample competition (both tracks) from the real Google-Landmarks photos bundled in the package,
   with derived views, non-landmark distractors and one broken image (:mod:`kernel.demo.competition`);
2. writes demo weights (``--preset tiny``: tiny backbones, about a minute on 2 CPU cores; ``full``: the nine
   real architectures, for a GPU machine);
3. precomputes the train / index / non-landmark descriptors into a store, as one does offline before
   uploading (``python -m kernel extract``);
4. runs ``predict`` for both tracks through exactly the code a Kaggle run uses;
5. validates both submissions against the generated solutions, and draws a contact sheet (PNG) of a few
   queries with their top retrieved images (green frame: same landmark, red: not).

Demo weights are random, so the scores only show that the pipeline runs end to end and is scored the way
Kaggle scores it; they say nothing about the real models' accuracy.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

HELP = "build a sample competition from bundled photos and run the full kernel on it (both tracks)"

# the file that marks a folder as a dry-run's own, and what a dry-run writes there (and removes on a rerun);
# anything else in the folder is never touched
MARKER = ".kernel-dry-run.json"
OWNED = ("competition", "weights", "store", "recognition", "retrieval", "contact_sheet.png", "dry_run.json")


def contact_sheet(predictions: dict, solution: dict, query_path, index_path, out: Path, n_queries: int = 4,
                  top: int = 5, thumb: int = 120) -> Path:
    """PNG: one row per query (the query, then its ``top`` retrieved images), frames green when relevant."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    queries = [q for q in sorted(solution) if solution[q] and predictions.get(q)][:n_queries]
    pad, label_h = 8, 14
    w = pad + (top + 1) * (thumb + pad) + pad
    h = pad + 20 + max(1, len(queries)) * (thumb + label_h + pad)
    sheet = Image.new("RGB", (w, h), (245, 245, 245))
    d = ImageDraw.Draw(sheet)
    d.text((pad, pad), "query | top retrieved (green = same landmark, red = other)", fill="black", font=font)

    def paste(path, x, y, colour, caption):
        try:
            im = Image.open(path).convert("RGB")
            im.thumbnail((thumb - 6, thumb - 6))
        except Exception:  # an unreadable file still gets its frame
            im = Image.new("RGB", (thumb - 6, thumb - 6), (200, 200, 200))
        d.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=colour, width=3)
        sheet.paste(im, (x + 3 + (thumb - 6 - im.width) // 2, y + 3 + (thumb - 6 - im.height) // 2))
        d.text((x, y + thumb + 1), caption, fill="black", font=font)

    for row, q in enumerate(queries):
        y = pad + 20 + row * (thumb + label_h + pad)
        paste(query_path(q), pad, y, (60, 60, 60), f"query {q[:8]}")
        for k, idx in enumerate(predictions[q][:top]):
            hit = idx in solution[q]
            paste(index_path(idx), pad + (k + 1) * (thumb + pad), y, (30, 160, 60) if hit else (200, 40, 40),
                  f"#{k + 1} {idx[:8]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def dry_run(out="dry-run", preset: str = "tiny", device=None, seed: int = 0, progress: bool = False) -> dict:
    from kernel.data.sources import folder_source, kaggle_path, kaggle_split
    from kernel.extract import extract
    from kernel.models import load_manifest, select
    from kernel.demo.competition import make_competition
    from kernel.demo.weights import write_demo_weights
    from kernel.predict import PredictOptions, predict
    from kernel.validate import validate

    from kernel.cli import claim_dir

    t0 = time.monotonic()
    out = claim_dir(out, MARKER, OWNED)  # new, empty, or an earlier dry-run's: nothing else is ever deleted
    comp = make_competition(out / "competition", seed=seed)
    log.info("sample competition: %s", comp.root)
    weights = out / "weights"
    manifest = write_demo_weights(weights, preset)
    entries = load_manifest(manifest)

    # offline step: reference descriptors, as shipped with the kernel
    store = out / "store"
    kw = dict(device=device, progress=progress)
    extract(entries, weights, kaggle_split(comp.recognition, "train"), "train", store, **kw)
    extract(select(entries, track="recognition"), weights, folder_source(comp.nonlandmark), "nonlandmark", store, **kw)
    extract(select(entries, track="retrieval"), weights, kaggle_split(comp.retrieval, "index"), "index", store, **kw)

    results = {}
    for track, data in (("recognition", comp.recognition), ("retrieval", comp.retrieval)):
        sub = out / track / "submission.csv"
        report = predict(PredictOptions(track, data, manifest, weights, sub, store=store,
                                        train_labels=comp.recognition / "train.csv", work=out / track / "descriptors",
                                        device=device, progress=progress))
        summary = validate(track, sub, data / "solution.csv")
        results[track] = {"submission": str(sub), "report": report.line(), "score": summary["score"],
                          "summary": summary}
        log.info("%s: %s", track, report.line())

    # contact sheet of retrieval results
    import pandas as pd

    sub = pd.read_csv(results["retrieval"]["submission"], dtype=str, keep_default_na=False)
    preds = {r.id: r.images.split() for r in sub.itertuples()}
    sol = pd.read_csv(comp.retrieval / "solution.csv", dtype=str, keep_default_na=False)
    solution = {r.id: set(r.images.split()) for r in sol.itertuples()}
    sheet = contact_sheet(preds, solution, lambda i: kaggle_path(comp.retrieval, "test", i),
                          lambda i: kaggle_path(comp.retrieval, "index", i), out / "contact_sheet.png")
    results.update(out=str(out), competition=str(comp.root), weights=str(weights), store=str(store),
                   contact_sheet=str(sheet), preset=preset, seconds=round(time.monotonic() - t0, 1))
    (out / "dry_run.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def add_arguments(p) -> None:
    p.add_argument("--out", default="dry-run", help="output folder: new, empty, or an earlier dry-run's "
                   "(whose outputs are replaced; any other folder is refused) (default ./dry-run)")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny",
                   help="tiny: small backbones, about a minute on 2 CPU cores (default); full: the nine real models")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show extraction progress bars")


def run(args) -> int:
    r = dry_run(args.out, args.preset, args.device, args.seed, args.progress)
    print(f"\ndry-run ({r['preset']} preset) finished in {r['seconds']} s")
    print(f"  sample competition : {r['competition']}")
    print(f"  demo weights       : {r['weights']}")
    print(f"  descriptor store   : {r['store']}")
    for track in ("recognition", "retrieval"):
        t = r[track]
        metric = "GAP" if track == "recognition" else "mAP@100"
        print(f"  {track:<11} : {t['submission']}  ({metric} {t['score']:.4f} with random demo weights)")
        print(f"                {t['report']}")
    print(f"  contact sheet      : {r['contact_sheet']}")
    print(f"  everything         : {r['out']}/dry_run.json")
    return 0
