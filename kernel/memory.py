"""Peak resident memory of this process, the number a memory budget is checked against."""
from __future__ import annotations

import resource

#: the memory budget of a post-processing, GiB: the smallest Kaggle machine's RAM with room for the notebook
#: (docs/scale.md); every command with ``--memory-gb`` defaults to it
DEFAULT_MEMORY_GB = 10.0


def peak_rss_gib() -> float:
    """Peak resident set size of this process since it started its program, in GiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own memory.
    ``getrusage``'s ``ru_maxrss`` is the fallback (other systems); on Linux it also counts, for a process
    started by fork + exec, the memory of the parent it was forked from (the kernel keeps the maximum
    across exec), so a small command started by a large process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
