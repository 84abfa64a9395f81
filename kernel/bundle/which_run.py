"""The notebook's *which run* cell (:mod:`kernel.bundle.notebook_cells`, printed first): the public folder or the
scored rerun, told at run time from the competition folder's sizes against the public ones of :mod:`kernel.sizes`
(``test/`` images, and ``train.csv`` rows or ``index/`` images). The sizes and the comparison are put into the cell's
text when the notebook is built: the cell runs before the kernel package can be imported."""
from __future__ import annotations

WHICH_RUN_TEMPLATE = '''\
# Which run is this: the public folder (while developing) or the scored rerun on the hidden sets? Told from what
# the competition folder holds against the public sizes (kernel/sizes.py); only printed, the job reads the folder.
PUBLIC_SIZES = None  # kernel.sizes.PUBLIC, filled in by build_kernel.py
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def count_images(folder):
    if not folder.is_dir():
        return None
    return sum(1 for _, _, files in os.walk(folder) for f in files
               if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))


def count_rows(csv_path):
    if not csv_path.is_file():
        return None
    with open(csv_path, "rb") as fh:
        return max(0, sum(1 for _ in fh) - 1)  # the header aside


# which_run: kernel.sizes.which_run, filled in by build_kernel.py


def report_run():
    found = {"test": count_images(COMPETITION / "test")}
    if TRACK == "recognition":
        found["train_rows"] = count_rows(COMPETITION / "train.csv")
    else:
        found["index"] = count_images(COMPETITION / "index")
    print(which_run(TRACK, found, PUBLIC_SIZES[TRACK]), flush=True)
    return found


RUN_FOUND = report_run()
'''


def which_run_cell() -> str:
    """The *which run* cell: :data:`WHICH_RUN_TEMPLATE` with the public sizes and the comparison of
    :mod:`kernel.sizes` put in (the notebook runs before the kernel package can be imported)."""
    import inspect

    from kernel import sizes

    return (WHICH_RUN_TEMPLATE.replace("PUBLIC_SIZES = None  # kernel.sizes.PUBLIC, filled in by build_kernel.py",
                                       f"PUBLIC_SIZES = {sizes.PUBLIC!r}  # kernel.sizes.PUBLIC")
            .replace("# which_run: kernel.sizes.which_run, filled in by build_kernel.py\n",
                     inspect.getsource(sizes.which_run)))
