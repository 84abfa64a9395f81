"""Writing files so that a crash never leaves half of one: the one home of the atomic write that descriptor
stores, submissions, run logs, split views, prepared artefacts and training checkpoints use."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import, then restored
    os.umask(mask)
    return mask


#: mode of a new file, as ``open()`` would create it (``mkstemp`` alone would leave 0600)
NEW_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write, check=None) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it, give it the mode of any new file,
    run ``check(tmp_path)`` when given, then rename it over ``path``. A candidate whose check raises never
    replaces the previous file, and a crash leaves the previous file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, NEW_FILE_MODE)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
