"""Test helpers for jobs: a gate that holds a job at its first copied tensor, and a scan for temporary files."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter_surgery.jobs import FINISHED, JobService
from adapter_surgery.jobs.service import TEMP_NAME


class Gate:
    """While closed, every copied tensor write waits (a job holds at a tensor boundary, deterministically)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.reached = threading.Event()
        self.calls = 0  # calls of the step :func:`hold_call` holds

    def release(self) -> None:
        self.open.set()


def until(check: Callable[[], object], timeout: float = 120.0) -> object:
    """Poll ``check`` until it returns a truthy value (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


def release_when_cancelled(jobs: JobService, job_id: str, gate: Gate) -> threading.Thread:
    """Open ``gate`` once the job's cancel flag is set (so the job reaches its next boundary after the cancel)."""
    def run() -> None:
        until(lambda: jobs.store.cancel_requested(job_id))
        gate.release()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def hold_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, nth: int = 1) -> Gate:
    """Patch ``owner.name`` so that its ``nth`` call sets ``gate.reached`` and waits for the gate to open before it
    runs (a slow step of a job — a large SVD, a model run, a long loop — held deterministically)."""
    gate, real = Gate(), getattr(owner, name)

    def held(*args: object, **kwargs: object) -> object:
        gate.calls += 1
        if gate.calls == nth:
            gate.reached.set()
            assert gate.open.wait(60), "the test never let the job go on"
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, held)
    return gate


def temporaries(root: Path) -> list[Path]:
    """Every temporary output, work directory or owner record under ``root`` (the service's scratch included)."""
    found = [p for p in root.rglob("*") if TEMP_NAME.match(p.name)]
    scratch = root / ".adapter-surgery" / "scratch"
    return found + (list(scratch.iterdir()) if scratch.is_dir() else [])


def finished(jobs: JobService, job_id: str) -> bool:
    return jobs.get(job_id).state in FINISHED


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away ``redis-server`` on a free localhost port (no persistence); yields its URL, stopped after."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)

    def up() -> bool:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return True
        return False

    try:
        until(up, 60)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
