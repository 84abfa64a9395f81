"""The sizes of the competitions' folders, in one place: what the public folders hold, and our reading of the
hidden ones the scored rerun uses (docs/kaggle.md#the-scored-rerun).

``profile`` plans for the hidden sizes (:func:`hidden_counts`); the notebook tells the public run from the scored
rerun by comparing what it finds at run time with :data:`PUBLIC` (:func:`which_run`, whose source the notebook
carries: it runs before the kernel package can be imported).
"""
from __future__ import annotations

#: What the public competition folders hold (docs/kaggle.md#data-sets-and-their-sizes): recognition, the images
#: of ``test/`` and the rows of ``train.csv`` (GLDv2c, 1,580,470 images: the count public notebooks of the 2020
#: and 2021 recognition competitions compare ``train.csv`` with to tell the two runs apart); retrieval, the
#: queries of ``test/`` and the images of ``index/``.
PUBLIC = {
    "recognition": {"test": 10_000, "train_rows": 1_580_470},
    "retrieval": {"test": 1_129, "index": 76_176},
}

#: **Our reading:** each hidden set (recognition's test set; retrieval's test queries and index) is this many times
#: the public one. Competitors report the 2021 recognition hidden test set as at least twice the public one; no
#: source found gives the hidden sizes, or anything for retrieval beyond "larger": 3 is the conservative choice,
#: the one ``rerun --test-factor`` rehearses by default.
HIDDEN_FACTOR = 3


def hidden_counts(track: str, factor: int = HIDDEN_FACTOR) -> dict:
    """The images a scored rerun of ``track`` extracts in the notebook, by our reading: ``test`` (the hidden test
    set) and, for retrieval, ``index``: the hidden index's images beyond the public ones (whose descriptors the
    dataset ships; the notebook extracts only the images it added)."""
    public = PUBLIC[track]
    counts = {"test": public["test"] * factor}
    if track == "retrieval":
        counts["index"] = public["index"] * (factor - 1)
    return counts


def sizes_line(track: str, counts: dict, factor: int = HIDDEN_FACTOR) -> str:
    """One line: the sizes a plan is for (the scored rerun's), against what the public folder holds."""
    public = PUBLIC[track]
    text = f"{track}: planned for the scored rerun's {counts['test']:,} test images (public test/: {public['test']:,})"
    if track == "retrieval":
        text += (f" and {counts['index']:,} index images extracted in the notebook (the hidden index beyond the public "
                 f"index/'s {public['index']:,}, whose descriptors ship)")
    return text + f"; our reading: hidden sets {factor}x the public ones (kernel/sizes.py)"


def which_run(track: str, found: dict, public: dict) -> str:
    """The public folder or the scored rerun, from what a run finds (``found``: the counts of :data:`PUBLIC`'s keys,
    None where a file or folder is missing) against the public sizes; one line that says which and why. Plain
    Python on purpose: the notebook carries this function's source (``inspect.getsource``)."""
    missing = [k for k in public if found.get(k) is None]
    if missing:
        return f"this run: cannot tell the public {track} folder from the scored rerun ({', '.join(missing)} not found)"
    differ = [f"{k} {found[k]} (public {v})" for k, v in public.items() if found[k] != v]
    if not differ:
        sizes = ", ".join(f"{k} {v}" for k, v in public.items())
        return f"this run: the public {track} folder ({sizes}: the public sizes)"
    return f"this run: the scored rerun, not the public {track} folder: {', '.join(differ)}"
