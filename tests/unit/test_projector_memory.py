"""The projector's process gives memory back: Arrow's buffers go to the system allocator, and the C
heap's free pages are returned after a flush (what keeps its peak RSS under the pipeline's 250 MB)."""

from __future__ import annotations

import sys

import pyarrow as pa
import pytest

from nexuscore.projections import use_system_allocator
from nexuscore.projections._projector import _give_back_free_heap


def test_the_projector_process_puts_arrow_buffers_on_the_system_allocator() -> None:
    previous = pa.default_memory_pool()
    try:
        use_system_allocator()
        assert pa.default_memory_pool().backend_name == "system"
        assert pa.array(range(1_000)).nbytes > 0  # the pool allocates
    finally:
        pa.set_memory_pool(previous)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_free_heap_pages_go_back_to_the_system_once_freed() -> None:
    # Objects above pymalloc's 512 bytes and below glibc's mmap threshold live on the C heap.
    held = [bytes(2_000) + i.to_bytes(4, "little") for i in range(10_000)]
    assert len(held) == 10_000
    del held
    assert _give_back_free_heap() is True
