"""Memory the process no longer uses goes back to the kernel, which glibc does not do by
itself for everything (issue 16, rows 2 and 20: after a flood of connections the process
stayed at 1.3 GiB). Elsewhere than with glibc (musl, macOS) these do nothing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc

M_MMAP_THRESHOLD = -3  # malloc.h
# Above what asyncio reads into per recv (256 KiB, then shrunk to what came): at 128 KiB,
# glibc's starting value, every read was an mmap and munmap, 30 % more CPU per message
# in bench/ (scenario a: 1.92x chasquid's, 1.34x at 1 MiB).
BIG = 1024 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def give_back_big_buffers() -> None:
    """Allocations of BIG or more get mappings of their own, returned to the kernel
    when freed; but glibc raises its threshold after the first such buffer is freed,
    and then keeps them in its heap. scrypt takes 16 MiB per login, a message its size:
    a fixed threshold keeps the process from growing for good after a burst of them.
    Smaller buffers (asyncio's 256 KiB per TLS connection) stay in the heap, which
    ``trim`` hands back after a crowd of connections or a burst of messages."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.mallopt(M_MMAP_THRESHOLD, BIG)


def trim(full: bool = False) -> None:
    """Hand the free pages of the heap back (after many small objects are gone, such as
    a flood of connections'). The young generations hold what reference cycles left,
    and are quick to collect; a full collection walks every object, so it is only done
    when ``full`` (after a burst of messages: a failed attempt's traceback cycle can keep
    its message alive in the oldest generation)."""
    if full:
        gc.collect()
    else:
        gc.collect(1)
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
