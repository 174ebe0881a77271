"""Fixtures of the job tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapter_surgery.io import writer
from tests.jobs.helpers import Gate


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate()
    original = writer.CopiedTensor.write

    def write(self: writer.CopiedTensor, fd: int) -> None:
        g.reached.set()
        assert g.open.wait(30), "the test never opened the gate"
        original(self, fd)

    monkeypatch.setattr(writer.CopiedTensor, "write", write)
    yield g
    g.release()
