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
BIG = 128 * 1024  # glibc's default threshold


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
    """Allocations of 128 KiB or more get mappings of their own, returned to the kernel
    when freed; but glibc raises that threshold after the first such buffer is freed,
    and then keeps them in its heap. asyncio gives each TLS connection a 256 KiB buffer,
    scrypt takes 16 MiB per login, a message its size: a fixed threshold keeps the
    process from growing for good after a burst of them."""
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
    gc.collect() if full else gc.collect(1)
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
