"""A safetensors file written from its :class:`~adapter_surgery.io.layout.Layout` while its tensors are computed,
in whatever order they come, and hashed while it is written.

Why: attach-lora's fast path draws each ``lora_A`` in peft's order (the global RNG's, which must not change), not
the file's (names sorted), and writing then hashing its ~160 MB adapter at the 7B shape took as long as the draws,
one after the other. Here the header is written first and the file extended to its size, so that a tensor known to
be zero (``lora_B`` at init) is a hole, which reads as zeros and is never written; each tensor the caller hands over
(:meth:`PlannedFile.put`) is written at its offset on a worker thread while the caller computes the next one
(``os.pwrite``, ``hashlib`` on large buffers and ``os.preadv`` release the GIL), and the file is hashed on that
thread in file order as far as its bytes are final: a zero tensor from a reused zero buffer, the tensor just written
from memory when it is the next in file order, an earlier one read back from the page cache. The bytes handed over
and not yet written are bounded (:data:`IN_FLIGHT`; one larger tensor goes alone), so that the caller runs ahead
while the worker hashes a stretch an out-of-order tensor has just made final, and memory does not grow with the
file. Any failure (the write's, such as ENOSPC, or the caller's, such as a cancel) stops and joins the worker and
removes the file: nothing half-written, no thread left.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from pathlib import Path
from types import TracebackType

import torch

from adapter_surgery.io.layout import Layout
from adapter_surgery.io.writer import WrittenFile, tensor_bytes

#: Bytes per zero-buffer hash and per read-back.
CHUNK = 4 * 1024 * 1024
#: Bytes handed over and not yet written (one tensor larger than this is handed over alone). attach-lora's
#: ``write_adapter`` alone at the 7B shape (lora_A up to 0.7 MB at r=16): 0.275 s with 32 MiB against 0.366 s with
#: one tensor at a time (median of 15, load average 4 on 2 cores; 8 and 64 MiB alike, 0.288 and 0.282 s).
IN_FLIGHT = 32 * 1024 * 1024


class PlannedFile:
    """Write ``plan`` at ``path`` (created; it must not exist), the tensors named in ``zeros`` left as holes.

    Use as a context manager: :meth:`put` each other tensor once, in any order, then :meth:`finish`; leaving the
    block without :meth:`finish` (an exception) aborts (:meth:`abort`).
    """

    def __init__(self, path: Path, plan: Layout, zeros: set[str]) -> None:
        self.path, self.plan = path, plan
        self._index = {t.name: i for i, t in enumerate(plan.tensors)}
        if not zeros <= set(self._index):
            raise ValueError(f"zero tensors not in the plan: {sorted(zeros - set(self._index))}")
        self._zero = [t.name in zeros for t in plan.tensors]
        self._written = [False] * len(plan.tensors)
        self._hashed = 0  # tensors hashed, in file order
        self._digest = hashlib.sha256(plan.header)
        self._zeros = bytes(CHUNK)
        self._buf = bytearray(CHUNK)
        self._cond = threading.Condition()
        self._pending: deque[tuple[int, memoryview]] = deque()
        self._in_flight = 0  # bytes in self._pending and being written
        self._stopping = False
        self._error: BaseException | None = None
        self._closed = False
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            _pwrite_all(self._fd, memoryview(plan.header), 0)
            os.ftruncate(self._fd, plan.size)
        except BaseException:
            self._remove()
            raise
        self._worker = threading.Thread(target=self._run, name=f"write {path.name}", daemon=True)
        self._worker.start()

    def __enter__(self) -> PlannedFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._closed:
            self.abort()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Hand ``tensor`` over to be written as ``name`` (its bytes in its own dtype, the plan's size); blocks while
        it would take the bytes in flight over :data:`IN_FLIGHT`. ``tensor`` must not change afterwards. Raises the
        worker's error, if any."""
        if self._error is not None:
            raise self._error
        i = self._index.get(name)
        if i is None or self._zero[i]:
            raise ValueError(f"{name} is not a tensor to write in {self.path.name}")
        view = tensor_bytes(tensor)
        if len(view) != self.plan.tensors[i].nbytes:
            raise ValueError(f"{name} has {len(view)} bytes; the plan gives it {self.plan.tensors[i].nbytes}")
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or not self._in_flight
                                or self._in_flight + len(view) <= IN_FLIGHT)
            if self._error is not None:
                raise self._error
            self._pending.append((i, view))
            self._in_flight += len(view)
            self._cond.notify_all()

    def finish(self) -> WrittenFile:
        """Wait for the last write, hash what remains and close the file; its size and sha256. On an error
        (a write's, or a planned tensor never handed over) the file is removed and the error raised."""
        try:
            self._stop()
            if self._error is not None:
                raise self._error
            missing = [t.name for t, z, w in zip(self.plan.tensors, self._zero, self._written, strict=True)
                       if not (z or w)]
            if missing:
                raise RuntimeError(f"{len(missing)} planned tensor(s) of {self.path.name} never written: {missing[0]}")
            self._hash_forward(None)
        except BaseException:
            self._remove()
            raise
        os.close(self._fd)
        self._closed = True
        return WrittenFile(self.path.name, self.plan.size, self._digest.hexdigest())

    def abort(self) -> None:
        """Stop the worker (once its current write returns), close and remove the file."""
        self._stop()
        self._remove()

    def _stop(self) -> None:
        """Tell the worker there is nothing more and wait for it to end: after what is pending is written, or at
        once after an error (what is pending is dropped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join()

    def _remove(self) -> None:
        if not self._closed:
            os.close(self._fd)
            self._closed = True
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                if not self._pending:
                    return
                i, view = self._pending[0]
            try:
                _pwrite_all(self._fd, view, self.plan.tensors[i].begin)
                self._written[i] = True
                self._hash_forward((i, view))
            except BaseException as exc:  # the caller hears it at its next put, or at finish
                with self._cond:
                    self._error = exc
                    self._pending.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending.popleft()
                self._in_flight -= len(view)
                self._cond.notify_all()

    def _hash_forward(self, fresh: tuple[int, memoryview] | None) -> None:
        """Hash the tensors whose bytes are final, in file order, from the first not hashed yet; ``fresh``: the
        tensor just written, hashed from memory if it comes next."""
        while self._hashed < len(self.plan.tensors):
            i = self._hashed
            t = self.plan.tensors[i]
            if self._zero[i]:
                for done in range(0, t.nbytes, CHUNK):
                    self._digest.update(memoryview(self._zeros)[: min(CHUNK, t.nbytes - done)])
            elif fresh is not None and fresh[0] == i:
                self._digest.update(fresh[1])
            elif self._written[i]:
                self._hash_range(t.begin, t.nbytes)
            else:
                return
            self._hashed += 1

    def _hash_range(self, begin: int, length: int) -> None:
        """Hash ``length`` bytes of the file at ``begin``, read back (from the page cache: just written)."""
        view, done = memoryview(self._buf), 0
        while done < length:
            n = os.preadv(self._fd, [view[: min(CHUNK, length - done)]], begin + done)
            if n <= 0:
                raise OSError(f"{self.path.name} ended at {begin + done} bytes while hashing")
            self._digest.update(view[:n])
            done += n


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)
