"""Files: the one home of the atomic write (descriptor stores, submissions, run logs, split views, prepared
artefacts and training checkpoints use it), of the free-space checks, of the sha256 of a file (checkpoints, the
bundle), and of reading a user's CSV as UTF-8 text with one clear error."""
from __future__ import annotations

import csv
import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from kernel.errors import KernelError


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _no_space(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, NEW_FILE_MODE)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise _no_space(exc, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class NoSpaceError(KernelError):
    """A write failed because the device is full (its message names the folder and the free bytes)."""


def free_bytes(folder) -> int | None:
    """Free bytes on the file system of ``folder`` (its nearest existing ancestor); None when unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _no_space(exc: OSError, path: Path) -> OSError | NoSpaceError:
    """A full disk as one line naming the folder and its free bytes (the previous file, if any, is kept);
    any other error as it was."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    return NoSpaceError(f"{path.parent}: no space left on the device ({free_bytes(path.parent)} bytes free) while "
                       f"writing {path.name}; the previous {path.name}, if any, is unchanged")


def has_room(folder, needed: int, margin: float = 1.25) -> bool:
    """Whether ``folder`` has ``needed`` bytes (times ``margin``) free; True when the free space is unknown."""
    free = free_bytes(folder)
    return free is None or free >= needed * margin


def sha256_file(path, chunk: int = 1 << 22, on_block=None) -> str:
    """sha256 of a file, read ``chunk`` bytes at a time; ``on_block(n)`` after each (a progress bar's update)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


def not_utf8(path, exc: UnicodeDecodeError) -> KernelError:
    return KernelError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})")


@contextmanager
def csv_text(path):
    """``path`` open as UTF-8 text for the csv module; undecodable bytes or an unreadable CSV (a field past the
    module's limit) end in one :class:`KernelError` naming the file."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            yield fh
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    except csv.Error as exc:
        raise KernelError(f"{path}: not a readable CSV ({exc})") from None
