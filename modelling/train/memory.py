"""Process memory settings for training and evaluation runs."""

from __future__ import annotations


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation (glibc only; elsewhere a no-op returning False).

    A training step allocates activations of tens of MB (a batch of 64 volumes at 16 channels: 67 MB). glibc
    serves every allocation over 32 MB with a fresh ``mmap`` and hands it back with ``munmap`` when freed, so
    every step faults its activations in page by page again, and the kernel takes a large share of the CPU time.
    ``M_MMAP_MAX`` 0 serves them from the heap instead and a high ``M_TRIM_THRESHOLD`` keeps the heap
    (figures: ``bench/bench_train_step.py``, MODEL_CARD.md "Memory"). Process-wide, so only the command-line
    entry points of training and evaluation call it.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
