"""What the backends share about CUDA memory: recognising out-of-memory (in an exception or in a child
program's output), the peak memory of a job per card, and giving cached memory back after a failure.

Imported by backends that already run torch; nothing here imports torch at module level.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..backend import OutOfMemory

OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation",
               "HIP out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in OOM_MARKERS)


def release_memory(cuda: bool) -> None:
    """After an out-of-memory: give the allocator's cache back so the card's other tenants fit."""
    import gc
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


@contextmanager
def job_memory(cuda: bool, facts: dict, what: str) -> Iterator[None]:
    """Around one job: reset the peak counters, translate out-of-memory into `OutOfMemory` (naming
    `what` ran out: the size of the video), and put each card's peak into `facts` for the sidecar."""
    import torch
    cards = torch.cuda.device_count() if cuda else 0
    if cards:
        # With model CPU offload nothing has touched the card before the first job, and the peak
        # counters of a device without a CUDA context cannot be reset ("Invalid device argument").
        torch.cuda.init()
    for index in range(cards):
        torch.cuda.reset_peak_memory_stats(index)
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc):
            release_memory(cuda)
            raise OutOfMemory(f"CUDA out of memory at {what}: {str(exc).splitlines()[0][:300]}") from None
        raise
    finally:
        if cards:
            per_card = [torch.cuda.max_memory_reserved(i) for i in range(cards)]
            facts["peak_memory_bytes"] = sum(per_card)
            facts["peak_memory_bytes_per_card"] = per_card
            facts["peak_memory_allocated_bytes"] = sum(torch.cuda.max_memory_allocated(i) for i in range(cards))
