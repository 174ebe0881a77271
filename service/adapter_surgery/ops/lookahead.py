"""Compute the next tensor of a write while the writer writes the current one: one worker thread, two in flight.

Why: the streaming writer asks a computed tensor for its values only when it reaches it
(:class:`adapter_surgery.io.writer.ComputedTensor`), so merge-lora's fold and the write of its result took turns on
one thread (at 1B, ~2 s of folding during which nothing was written, and ~7 s of writing during which nothing was
folded). With :class:`Lookahead` the worker folds tensor i+1 while the writer writes tensor i; memory stays at two
results (each result goes to one of two slots, alternating, and a slot is reused only once the tensor in it was
written: the writer writes a result before it asks for the next).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch

from adapter_surgery.ops.compute import intra_op_threads

#: ``compute(name, slot)``: the tensor's values, in buffers of ``slot`` (0 or 1) if it reuses any.
Compute = Callable[[str, int], torch.Tensor]


class Lookahead:
    """Values of the tensors ``order`` names, asked for one by one (:meth:`get`), each computed on the worker while
    the one before it is written. Use as a context manager: leaving it waits for the worker (nothing keeps running
    after a failure) and shuts it down.

    ``threads``: torch's intra-op threads on the worker (set around each computation, restored after it).
    """

    def __init__(self, order: list[str], compute: Compute, threads: int) -> None:
        self._following = dict(itertools.pairwise(order))
        self._first = order[0] if order else None
        self._compute = compute
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._submitted = 0
        self._next: tuple[str, Future[torch.Tensor]] | None = None

    def __enter__(self) -> Lookahead:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookahead")
        if self._first is not None:
            self._next = (self._first, self._submit(self._first))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._drop_next()
        assert self._pool is not None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def get(self, name: str) -> torch.Tensor:
        """The values of ``name`` (raises what its computation raised); starts computing the one after it. The result
        may alias a slot: write it before asking for the next."""
        if self._next is not None and self._next[0] == name:
            future = self._next[1]
            self._next = None
        else:  # asked out of the order given: what was computed ahead is not wanted
            self._drop_next()
            future = self._submit(name)
        value = future.result()
        following = self._following.get(name)
        if following is not None:
            self._next = (following, self._submit(following))
        return value

    def _submit(self, name: str) -> Future[torch.Tensor]:
        if self._pool is None:
            raise RuntimeError("Lookahead used outside its with block")
        slot = self._submitted % 2
        self._submitted += 1
        return self._pool.submit(self._run, name, slot)

    def _run(self, name: str, slot: int) -> torch.Tensor:
        with intra_op_threads(self._threads):
            return self._compute(name, slot)

    def _drop_next(self) -> None:
        """Wait for the computation started ahead (its slot must be free before another one is used) and forget it."""
        if self._next is not None:
            _, future = self._next
            self._next = None
            future.cancel()
            with contextlib.suppress(Exception):  # its error belongs to a tensor no one asked for
                future.result()
