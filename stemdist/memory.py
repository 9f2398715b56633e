"""The process's memory policy: what the C library does with freed blocks (set before anything large)."""

from __future__ import annotations

MMAP_THRESHOLD = 1 << 20  # bytes: blocks at least this large are mapped on their own, and returned when freed


def return_freed_memory() -> None:
    """Make the C library map blocks of >= 1 MiB (chunks, blocks, batches) on their own and unmap them when
    freed. By default glibc raises that threshold as large blocks are freed (up to 32 MiB) and keeps what is
    freed below it in its heap: a run's peak then grew with the cube (``bench memory``: the main process held
    ~200 MiB more after a 16x larger cube). No effect where the C library has no ``mallopt``."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (a fixed value also stops the dynamic raising)
