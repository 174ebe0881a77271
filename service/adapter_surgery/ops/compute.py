"""CPU compute shared by the operations that do arithmetic on weights (attach-lora's decompositions, merge-lora's
fold): buffers reused from one tensor to the next, and the intra-op thread count torch runs with."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops of this thread with ``n`` intra-op threads, restored afterwards.

    A data-free adapter is hundreds of small tensors (r x features each): on each of them an OpenMP parallel region
    costs more than the work, the more so on a loaded machine, where the second thread waits for a core (measured
    at 1B, 2 cores: 1.4 s of CPU with 2 threads, 0.35 s with 1). Weight-reading inits keep every thread.
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Workspace:
    """Tensors reused from one target to the next, by name: each is allocated once, for the largest target, and
    lent as a view of the shape asked for.

    A target's weight-sized temporaries allocated afresh cost page faults each time (glibc serves them with mmap and
    gives them back on free): at 1B, 2.2M faults and 9 s of system time per PiSSA run, more than peft's whole
    process spent. Reused, they are faulted in once; RSS stays at these buffers.
    """

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel = numel
        self.device = device
        self._slots: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
             device: torch.device | None = None) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` on ``device`` (default: the workspace's), aliasing what
        ``name`` lent before: its content is whatever was left there."""
        device = device or self.device
        need = math.prod(shape) * dtype.itemsize
        buf = self._slots.get(name)
        if buf is None or buf.numel() < need or buf.device != device:
            buf = torch.empty(max(need, self.numel * dtype.itemsize), dtype=torch.uint8, device=device)
            self._slots[name] = buf
        return buf[:need].view(dtype).view(shape)
