"""One setting of the C allocator for a long-running relay on glibc.

asyncio reads a socket with ``sock.recv(256 KiB)``: every read allocates a 256 KiB bytes object
and shrinks it to what arrived. glibc serves blocks above its mmap threshold (128 KiB at first)
with ``mmap``, and raises that threshold only when such a block is freed at its full size, which a
shrunk one never is. Whether a process ever takes the cheap path is then down to what it happened
to free early: measured on paced streams (one chunk per read, as from a real engine), a sidecar on
the mmap path spent twice the system time per chunk (mmap, mremap and munmap on most reads: 58
against 42 us of CPU per chunk). Setting the thresholds at start makes the cheap path the only
one: blocks under 1 MiB come from the heap, and the heap keeps up to 2 MiB free at its top instead
of giving it back to the kernel after every large read (glibc's own dynamic rule would settle on
the same pair once it had seen one such block).
"""

from __future__ import annotations

import ctypes
import os
import sys

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 2 << 20


def is_glibc() -> bool:
    if sys.platform != "linux":
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def tune_for_relaying() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module's text); False where the C library
    is not glibc (nothing is changed there)."""
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
