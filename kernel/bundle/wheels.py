"""The wheels the Kaggle image may lack, obtained at build time for an offline ``pip install --no-index``.

A requirement is ``name==version`` (default: ``timm`` at the version pinned in the repository's
``requirements.txt``) or the path of a ``.whl`` file. A wheel is taken, in this order, from the folders given
with ``--wheel-dir``, from the builder's wheel cache (``$KERNEL_WHEEL_CACHE``, default
``~/.cache/kernel-bundle/wheels``), and otherwise fetched into that cache with ``pip download --no-deps
--only-binary=:all:`` (which itself reuses pip's HTTP cache). Nothing is ever fetched by the notebook.

Only the pinned package itself is shipped (``--no-deps``): timm's own dependencies (torch, torchvision,
huggingface_hub, safetensors, pyyaml) are part of Kaggle's image; add them as extra ``--wheel`` requirements
if an image lacks one. A wheel that is not pure Python (``py3-none-any``) is shipped with a warning: it only
installs on a Kaggle image with the same Python and platform.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import KernelError

log = logging.getLogger(__name__)

DEFAULT_PACKAGES = ("timm",)
REPO_REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"
_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


@dataclass(frozen=True)
class Wheel:
    name: str  # canonical project name
    version: str
    path: Path
    source: str  # "wheel-dir", "cache", "download", "file"

    @property
    def pure(self) -> bool:
        m = _WHEEL_RE.match(self.path.name)
        return bool(m) and m["abi"] == "none" and m["plat"] == "any"


def canonical(name: str) -> str:
    """PEP 503 project name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def cache_dir() -> Path:
    return Path(os.environ.get("KERNEL_WHEEL_CACHE") or Path.home() / ".cache" / "kernel-bundle" / "wheels")


def pinned_version(package: str, requirements: Path = REPO_REQUIREMENTS) -> str | None:
    """The ``package==X`` pin of a requirements file, or ``None``."""
    if not requirements.is_file():
        return None
    for line in requirements.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if m and canonical(m[1]) == canonical(package):
            return m[2]
    return None


def default_requirements() -> list[str]:
    """``timm==<pin of requirements.txt>`` (or the installed version when the file has no pin)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in DEFAULT_PACKAGES:
        v = pinned_version(pkg)
        if v is None:
            try:
                v = version(pkg)
            except PackageNotFoundError:
                raise KernelError(f"{REPO_REQUIREMENTS}: no '{pkg}==' pin and {pkg} is not installed: "
                                  f"pass --wheel {pkg}==VERSION") from None
        out.append(f"{pkg}=={v}")
    return out


def parse_wheel_name(path: Path) -> tuple[str, str]:
    m = _WHEEL_RE.match(Path(path).name)
    if not m:
        raise KernelError(f"{path}: not a wheel file name (name-version-python-abi-platform.whl)")
    return canonical(m["name"]), m["version"]


def check_wheel(path: Path) -> None:
    """A readable zip whose ``*.dist-info/METADATA`` names the project and version of its file name."""
    name, version = parse_wheel_name(path)
    try:
        with zipfile.ZipFile(path) as z:
            metas = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if not metas:
                raise KernelError(f"{path}: wheel has no .dist-info/METADATA")
            text = z.read(metas[0]).decode("utf-8", "replace")
    except zipfile.BadZipFile as exc:
        raise KernelError(f"{path}: not a readable wheel ({exc})") from None
    meta_name = re.search(r"^Name:\s*(\S+)", text, re.M)
    meta_version = re.search(r"^Version:\s*(\S+)", text, re.M)
    if not meta_name or canonical(meta_name[1]) != name or not meta_version or meta_version[1] != version:
        raise KernelError(f"{path}: METADATA says {meta_name and meta_name[1]} {meta_version and meta_version[1]}, "
                          f"the file name {name} {version}")


def parse_requirement(spec: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+!-]+)\s*", spec)
    if not m:
        raise KernelError(f"--wheel {spec!r}: expected NAME==VERSION or the path of a .whl file")
    return canonical(m[1]), m[2]


def find_wheel(name: str, version: str, folders) -> Path | None:
    """A wheel of ``name==version`` in the folders (pure-Python wheels first)."""
    hits = []
    for folder in folders:
        folder = Path(folder)
        for p in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
            m = _WHEEL_RE.match(p.name)
            if m and canonical(m["name"]) == name and m["version"] == version:
                hits.append(p)
    hits.sort(key=lambda p: (not p.name.endswith("-none-any.whl"), p.name))
    return hits[0] if hits else None


def download(name: str, version: str, dest: Path, timeout: float = 300) -> Path:
    """``pip download --no-deps --only-binary=:all: name==version -d dest``; returns the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{name}=={version}"]
    log.info("downloading %s==%s: %s", name, version, " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"cannot obtain a wheel for {name}=={version}: pip download failed ({exc}); "
                          "put the wheel in a folder and pass --wheel-dir DIR") from None
    found = find_wheel(name, version, [dest])
    if res.returncode != 0 or found is None:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise KernelError(f"cannot obtain a wheel for {name}=={version}: pip download failed ({tail[0]}); "
                          "put the wheel in a folder and pass --wheel-dir DIR")
    return found


def resolve(requirements, wheel_dirs=(), allow_download: bool = True) -> list[Wheel]:
    """One checked :class:`Wheel` per requirement (see the module docstring for where they come from)."""
    wheels, seen = [], set()
    for spec in requirements:
        if str(spec).endswith(".whl"):
            path = Path(spec)
            if not path.is_file():
                raise KernelError(f"--wheel {path}: file not found")
            name, version = parse_wheel_name(path)
            wheel = Wheel(name, version, path, "file")
        else:
            name, version = parse_requirement(spec)
            path = find_wheel(name, version, wheel_dirs)
            source = "wheel-dir"
            if path is None:
                path, source = find_wheel(name, version, [cache_dir()]), "cache"
            if path is None:
                if not allow_download:
                    raise KernelError(f"no wheel for {name}=={version} in {', '.join(map(str, wheel_dirs)) or '-'} "
                                      f"or {cache_dir()}, and downloading is off (--no-download)")
                path, source = download(name, version, cache_dir()), "download"
            wheel = Wheel(name, version, path, source)
        if wheel.name in seen:
            raise KernelError(f"--wheel: {wheel.name} requested twice")
        seen.add(wheel.name)
        check_wheel(wheel.path)
        if not wheel.pure:
            log.warning("%s is not a pure-Python wheel: it only installs on a matching Python/platform",
                        wheel.path.name)
        log.info("wheel %s==%s: %s (%s)", wheel.name, wheel.version, wheel.path, wheel.source)
        wheels.append(wheel)
    return wheels
