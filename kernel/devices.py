"""Which torch device a command runs on: the one place a ``--device`` value is resolved."""
from __future__ import annotations

import torch

from kernel.errors import KernelError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``, "" or "auto": CUDA when it is available, else the CPU; otherwise the device named.

    Raises :class:`KernelError` for a name torch does not know, or a CUDA device on a machine without CUDA.
    """
    if device is None or (isinstance(device, str) and device in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise KernelError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KernelError(f"--device {device}: CUDA is not available on this machine")
    return dev
