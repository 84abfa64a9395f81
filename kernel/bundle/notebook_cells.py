"""The Kaggle notebook's cells, as source text (:mod:`kernel.bundle.notebook` fills them in and writes them).

The cells are plain Python (no shell magics), so the same code runs in Jupyter, on Kaggle, as a script kernel
(``--headless``) and in the tests. In order, they:

1. *configure*: the Kaggle root (``$KAGGLE_ROOT``, default ``/kaggle``), the competition folder, this build's
   id and the sha256 of every checkpoint it was built with (pinned in the notebook itself), the accelerator it
   was built for;
   *which run*: the public folder or the scored rerun, from the competition folder's sizes at run time against
   the public ones (:mod:`kernel.sizes`), printed first;
   *the machine*: which torch (version, CUDA build, compiled GPU architectures), which GPUs (name, compute
   capability, memory), each checked with a real operation. A GPU this torch cannot run (a Pascal P100, sm_60,
   under a torch built for sm_75 and newer) is left out; when none is usable a loud banner says so and the job
   runs on the CPU, where the budget keeps the most valuable models and the submission stays valid;
2. *find the dataset* at ``<root>/input/<slug>`` (or any folder under ``input/`` holding this build's
   ``BUILD.json``) and check its build id;
3. *verify* every file of the dataset against ``BUILD.json`` and every checkpoint against the manifest and the
   notebook's own pins (sha256), refusing to run on anything else;
4. *install offline* each pinned wheel whose version the image lacks, with ``pip install --no-index
   --no-deps --target <root>/working/pylib`` from the dataset's ``wheels/``;
5. *check the environment* in a subprocess with the same ``PYTHONPATH`` as the job: the ``kernel`` package must
   come from the dataset, the pinned versions must be the ones imported;
6. *predict*: ``python -m kernel predict`` on the competition data, writing ``<root>/working/submission.csv``
   within the time left of Kaggle's 12 hours, its working files in ``<root>/temp`` (not the saved output), with
   the competition's own ``train.csv`` when it has one;
7. *check the submission*: header, one row per test image, well-formed predictions. A job that failed late
   (a full disk, say) but left a checked submission with predictions does not fail the notebook: that
   submission is scored.

Every failure ends the run with ``SystemExit("error: ...")`` naming the file and the problem.
"""
from __future__ import annotations

from kernel.bundle.which_run import which_run_cell

CONFIG = '''\
# Configuration, written by build_kernel.py. Plain Python: runs in Jupyter, on Kaggle and as a script.
import os
import sys
import time
from pathlib import Path

START = time.time()
KAGGLE_ROOT = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # point it at a local copy to test the notebook
INPUT = KAGGLE_ROOT / "input"
WORKING = KAGGLE_ROOT / "working"
TRACK = {track!r}
COMPETITION = INPUT / {competition!r}
DATASET_SLUG = {slug!r}
BUILD_ID = {build_id!r}
# sha256 of every checkpoint this notebook was built and tested with: nothing else is run
CHECKPOINTS = {checkpoints}
STORE = {store!r}  # precomputed train/non-landmark descriptors inside the dataset (None: extracted here)
INDEX_STORE = {index_store!r}  # precomputed index descriptors inside the dataset (retrieval)
TRAIN_LABELS = {train_labels!r}  # train.csv inside the dataset (None: the competition's own)
# Kaggle stops a run at 12 h; this notebook's own steps are counted against the budget as well
DEADLINE_HOURS = float(os.environ.get("KERNEL_DEADLINE_HOURS", {deadline_hours!r}))
DEVICE = os.environ.get("KERNEL_DEVICE")  # None: every usable GPU (see the next cell), else the CPU
ACCELERATOR = {accelerator!r}  # what build_kernel.py --accelerator asked Kaggle for
VERIFY = os.environ.get("KERNEL_VERIFY", "all")  # "all": sha256 of every file; "weights": checkpoints only
PREDICT_ARGS = {predict_args!r}  # extra arguments for `python -m kernel predict`
SUBMISSION = WORKING / "submission.csv"
# Working files (descriptors of the test and added reference images, the run's caches) go to scratch space that
# is not the notebook's saved output: Kaggle's /kaggle/temp (its notebook template: "temporary files ... won't be
# saved outside of the current session"); /kaggle/working (20 GB, saved) keeps the submission, its log, the wheels
SCRATCH = Path(os.environ.get("KERNEL_SCRATCH") or (KAGGLE_ROOT / "temp"))
'''

MACHINE = '''\
# The machine: which torch, which GPUs, which compute capability; loud when no GPU can run this torch.
import json
import subprocess

MACHINE_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "archs": torch.cuda.get_arch_list() if torch.cuda.is_available() else [], "gpus": []}
for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
    p = torch.cuda.get_device_properties(i)
    gpu = {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
           "memory_gb": round(p.total_memory / 2**30, 1)}
    try:  # a real operation: "no kernel image is available" shows here, not 11 hours later
        gpu["works"] = float((torch.ones(2, device=f"cuda:{i}") * 2).sum()) == 4.0
    except Exception as exc:
        gpu["works"], gpu["error"] = False, f"{type(exc).__name__}: {exc}"[:300]
    info["gpus"].append(gpu)
print(json.dumps(info))
"""
EXPECTED_GPUS = {"t4x2": (2, "7.5"), "p100": (1, "6.0"), "cpu": (0, None)}  # Kaggle's cards (kernel/budget.py)


def compiled_for(capability, archs):
    """Whether a torch compiled for ``archs`` (sm_XY cubins, compute_XY PTX) runs on a GPU of ``capability``:
    a cubin of the same major version and no higher minor one, or PTX of a lower or equal version."""
    major, minor = (int(x) for x in capability.split("."))
    for arch in archs:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def usable_gpus(info):
    """The GPUs the job can use, and one line per GPU it cannot."""
    usable, problems = [], []
    for g in info["gpus"]:
        if not compiled_for(g["capability"], info["archs"]):
            problems.append(f"GPU {g['index']} {g['name']} (sm_{g['capability'].replace('.', '')}) is not among the "
                            f"architectures torch {info['torch']} was compiled for ({' '.join(info['archs'])})")
        elif not g.get("works"):
            problems.append(f"GPU {g['index']} {g['name']} fails a test operation: {g.get('error')}")
        else:
            usable.append(g)
    return usable, problems


def log_machine(info):
    print(f"torch {info['torch']} (CUDA build {info['cuda_build']}); compiled for: {' '.join(info['archs']) or '-'}")
    for g in info["gpus"]:
        print(f"GPU {g['index']}: {g['name']}, compute capability {g['capability']}, {g['memory_gb']} GB")
    usable, problems = usable_gpus(info)
    want, want_cc = EXPECTED_GPUS[ACCELERATOR]
    if usable and (len(usable) != want or any(g["capability"] != want_cc for g in usable)):
        print(f"note: built for {ACCELERATOR} ({want} GPU(s), sm {want_cc}); this session has "
              f"{len(usable)} usable GPU(s): the job uses what it finds")
    if not usable:
        banner = "!" * 100
        print(f"{banner}\\n!!! NO USABLE GPU: the job runs on the CPU, many times slower; the budget keeps only the "
              f"most valuable models\\n!!! and the submission stays valid.")
        for line in problems or ["torch sees no CUDA device (accelerator off, or a CPU-only torch)"]:
            print(f"!!! {line}")
        if any(g["capability"].startswith("6.") for g in info["gpus"]):
            print("!!! A Pascal GPU (sm_60, the P100) needs torch 2.7.1 or older (see the README).")
        print(banner, flush=True)
    else:
        for line in problems:
            print(f"warning: {line}: left out")
    return usable


def probe_machine():
    res = subprocess.run([sys.executable, "-c", MACHINE_PROBE], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: torch does not import: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


MACHINE_INFO = probe_machine()
USABLE_GPUS = log_machine(MACHINE_INFO)
if DEVICE is None and MACHINE_INFO["gpus"] and len(USABLE_GPUS) < len(MACHINE_INFO["gpus"]):
    # hide the GPUs this torch cannot use from the job (none usable: the CPU)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g["index"]) for g in USABLE_GPUS)
    DEVICE = None if USABLE_GPUS else "cpu"
'''

FIND_DATASET = '''\
# Find the dataset: mounted at input/<slug>, or anywhere under input/ with this build's BUILD.json.
import json


def dataset_candidates():
    yield INPUT / DATASET_SLUG
    for depth in ("*", "*/*", "*/*/*"):  # searched only when the usual place does not hold this build
        yield from sorted(p.parent for p in INPUT.glob(depth + "/BUILD.json"))


def find_dataset():
    builds, seen = [], set()
    for folder in dataset_candidates():
        if folder in seen:
            continue
        seen.add(folder)
        try:
            info = json.loads((folder / "BUILD.json").read_text())
        except (OSError, ValueError):
            continue
        if info.get("build_id") == BUILD_ID:
            return folder
        builds.append(f"{folder} (build {info.get('build_id')})")
    if builds:
        raise SystemExit(f"error: the attached dataset is another build: {', '.join(builds)}; this notebook was "
                         f"built for build {BUILD_ID}: upload the dataset and the notebook of the same build")
    raise SystemExit(f"error: dataset '{DATASET_SLUG}' (build {BUILD_ID}) not found under {INPUT}: "
                     "attach it to the notebook (Add data)")


DATASET = find_dataset()
if not (COMPETITION / "test").is_dir():
    found = ", ".join(sorted(p.name for p in INPUT.iterdir())) if INPUT.is_dir() else "nothing"
    raise SystemExit(f"error: competition folder {COMPETITION / 'test'} not found (input holds: {found})")
print(f"dataset: {DATASET} (build {BUILD_ID})")
print(f"competition: {COMPETITION}")
'''

VERIFY_CELL = '''\
# Verify the dataset: every checkpoint against the manifest and this notebook's pins, every other file
# against BUILD.json. A modified or truncated file stops the run here.
import hashlib


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_dataset():
    build = json.loads((DATASET / "BUILD.json").read_text())
    manifest = json.loads((DATASET / "weights_manifest.json").read_text())
    problems = []
    listed = {entry["checkpoint"]: entry for entry in manifest["models"]}
    for checkpoint, expected in CHECKPOINTS.items():
        entry = listed.get(checkpoint)
        path = DATASET / "weights" / checkpoint
        if entry is None:
            problems.append(f"weights_manifest.json: no model uses {checkpoint}")
        elif entry.get("sha256") != expected:
            problems.append(f"weights_manifest.json: model '{entry['name']}' pins sha256 "
                            f"{str(entry.get('sha256'))[:16]}..., this notebook {expected[:16]}...")
        if not path.is_file():
            problems.append(f"{path}: checkpoint missing")
            continue
        digest = sha256_file(path)
        if digest != expected:
            problems.append(f"{path}: checkpoint has sha256 {digest[:16]}..., expected {expected[:16]}... "
                            "(corrupt or modified file)")
        else:
            print(f"ok  {checkpoint}  {path.stat().st_size / 1e6:.1f} MB  sha256 {digest[:16]}...")
    extra = sorted(set(listed) - set(CHECKPOINTS))
    if extra:
        problems.append(f"weights_manifest.json: checkpoints this notebook was not built with: {', '.join(extra)}")
    for rel, info in build["files"].items():
        path = DATASET / rel
        if rel.startswith("weights/"):
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {info['size']} (truncated upload?)")
        elif VERIFY == "all" and sha256_file(path) != info["sha256"]:
            problems.append(f"{path}: sha256 differs from BUILD.json (modified file)")
    if problems:
        raise SystemExit("error: the dataset is not the one this notebook was built with:\\n  " + "\\n  ".join(problems))
    print(f"verified {len(CHECKPOINTS)} checkpoints and {len(build['files']) - len(CHECKPOINTS)} other files")


verify_dataset()
'''

INSTALL = '''\
# Offline install of the pinned wheels the image lacks (never the network: --no-index, the dataset's wheels/).
import importlib
import importlib.metadata
import subprocess

PYLIB = WORKING / "pylib"  # installed here; Kaggle's own site-packages stay untouched


def installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels():
    wheels = DATASET / "wheels"
    pins = [line.strip().split("==") for line in (wheels / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    for name, version in pins:
        have = installed_version(name)
        if have == version:
            print(f"{name} {version}: already installed")
            continue
        print(f"{name}: image has {have or 'none'}, installing {version} offline from {wheels}")
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--find-links",
               str(wheels), "--target", str(PYLIB), f"{name}=={version}"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: offline install of {name}=={version} from {wheels} failed:\\n"
                             f"{(result.stdout + result.stderr)[-3000:]}")
        if str(PYLIB) not in sys.path:
            sys.path.insert(0, str(PYLIB))
        importlib.invalidate_caches()
        if installed_version(name) != version:
            raise SystemExit(f"error: after installing {name}=={version} into {PYLIB} Python still sees "
                             f"{installed_version(name)}")


install_wheels()
PYTHONPATH = [str(PYLIB)] if PYLIB.is_dir() else []
PYTHONPATH += [str(DATASET)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
JOB_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(PYTHONPATH), PYTHONDONTWRITEBYTECODE="1")
'''

ENVIRONMENT = '''\
# What the job will import: the kernel package from the dataset, the pinned wheels, torch and the device.
PROBE = """
import json, importlib.metadata, kernel, timm, torch
print(json.dumps({"kernel": kernel.__file__, "timm": timm.__version__, "timm_file": timm.__file__,
                  "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
"""
probe = subprocess.run([sys.executable, "-c", PROBE], env=JOB_ENV, capture_output=True, text=True, cwd=WORKING)
if probe.returncode != 0:
    raise SystemExit(f"error: the job's environment does not import: {probe.stderr[-3000:]}")
ENVIRONMENT = json.loads(probe.stdout.strip().splitlines()[-1])
for key, value in ENVIRONMENT.items():
    print(f"{key}: {value}")
if not Path(ENVIRONMENT["kernel"]).resolve().is_relative_to(DATASET.resolve()):
    raise SystemExit(f"error: the kernel package is imported from {ENVIRONMENT['kernel']}, not from {DATASET}")
for line in (DATASET / "wheels" / "requirements.txt").read_text().splitlines():
    if line.startswith("timm==") and ENVIRONMENT["timm"] != line.split("==")[1]:
        raise SystemExit(f"error: the job imports timm {ENVIRONMENT['timm']}, the build pins {line}")
'''

PREDICT = '''\
# The job: python -m kernel predict, within what is left of the deadline (it writes a valid submission first
# and improves it chunk by chunk, so even a run cut short leaves a valid file).
hours_left = DEADLINE_HOURS - (time.time() - START) / 3600
cmd = [sys.executable, "-m", "kernel", "predict", "--track", TRACK, "--data", str(COMPETITION),
       "--manifest", str(DATASET / "weights_manifest.json"), "--weights", str(DATASET / "weights"),
       "--out", str(SUBMISSION), "--work", str(SCRATCH / f"kernel-work-{TRACK}"), "--deadline-hours",
       f"{hours_left:.4f}"]
if STORE:
    cmd += ["--store", str(DATASET / STORE)]
if INDEX_STORE:
    cmd += ["--index-store", str(DATASET / INDEX_STORE)]
# the competition's own train.csv at run time is the truth (the scored rerun's may differ from the public one);
# the shipped copy serves only where the competition has none (retrieval)
if (COMPETITION / "train.csv").is_file():
    print(f"train labels: {COMPETITION / 'train.csv'} (the competition's own)")
elif TRAIN_LABELS:
    cmd += ["--train-labels", str(DATASET / TRAIN_LABELS)]
    print(f"train labels: {DATASET / TRAIN_LABELS} (shipped: the competition has no train.csv)")
if DEVICE:
    cmd += ["--device", DEVICE]
cmd += list(PREDICT_ARGS)
print(" ".join(cmd), flush=True)
job = subprocess.Popen(cmd, env=JOB_ENV, cwd=WORKING, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
while chunk := os.read(job.stdout.fileno(), 1 << 16):  # raw chunks: progress bars keep their carriage returns
    sys.stdout.write(chunk.decode("utf-8", "replace"))
    sys.stdout.flush()
PREDICT_STATUS = job.wait()  # the next cell decides: a checked submission stands even when the job failed late
if PREDICT_STATUS != 0:
    print(f"!!! python -m kernel predict exited with status {PREDICT_STATUS}: checking the submission it left")
'''

CHECK_SUBMISSION = '''\
# Check the submission: the competition's header, one row per test image, well-formed predictions.
import csv
import re

HEADERS = {"recognition": ["id", "landmarks"], "retrieval": ["id", "images"]}
ROW = {"recognition": re.compile(r"^(\\d+ [-+0-9.eE]+)?$"), "retrieval": re.compile(r"^([0-9a-f]+( [0-9a-f]+){0,99})?$")}


def check_submission():
    images = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
    test_ids = {p.stem for p in (COMPETITION / "test").rglob("*")
                if p.suffix.lower() in images and not p.name.startswith(".")}
    sample = COMPETITION / "sample_submission.csv"
    if sample.is_file():
        with open(sample, newline="") as fh:
            test_ids |= {row[0] for row in list(csv.reader(fh))[1:] if row}
    if not SUBMISSION.is_file():
        raise SystemExit(f"error: {SUBMISSION} was not written")
    with open(SUBMISSION, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != HEADERS[TRACK]:
        raise SystemExit(f"error: {SUBMISSION}: header {rows[:1]}, expected {HEADERS[TRACK]}")
    ids = [row[0] for row in rows[1:]]
    missing, extra = test_ids - set(ids), set(ids) - test_ids
    if missing or extra or len(ids) != len(set(ids)):
        raise SystemExit(f"error: {SUBMISSION}: {len(missing)} test images without a row, {len(extra)} unknown ids, "
                         f"{len(ids) - len(set(ids))} repeated ids")
    bad = [row for row in rows[1:] if len(row) != 2 or not ROW[TRACK].match(row[1])]
    if bad:
        raise SystemExit(f"error: {SUBMISSION}: {len(bad)} malformed rows, first: {bad[0]}")
    predicted = sum(1 for row in rows[1:] if row[1])
    print(f"{SUBMISSION}: {len(ids)} rows, {predicted} with a prediction, "
          f"{(time.time() - START) / 3600:.2f} h since the notebook started")
    if PREDICT_STATUS != 0 and not predicted:  # only the empty fallback: nothing worth scoring, fail loudly
        raise SystemExit(f"error: python -m kernel predict exited with status {PREDICT_STATUS} before any "
                         "prediction (its last line above says why)")
    if PREDICT_STATUS != 0:  # the job's last valid submission stands: it is what Kaggle scores
        print(f"!!! predict failed (status {PREDICT_STATUS}, its last line above says why); the checked "
              f"submission it left ({predicted} predictions) stands")
    for row in rows[1:6]:
        print(",".join(row)[:120])


check_submission()
'''


CODE_CELLS = ("which_run", "machine", "find_dataset", "verify", "install", "environment", "predict", "check_submission")
CELL_SOURCE = {"which_run": which_run_cell(), "machine": MACHINE, "find_dataset": FIND_DATASET, "verify": VERIFY_CELL, "install": INSTALL,
               "environment": ENVIRONMENT, "predict": PREDICT, "check_submission": CHECK_SUBMISSION}

