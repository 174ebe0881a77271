"""Choosing where the arithmetic runs."""

from __future__ import annotations

from typing import Literal

import torch

from adapter_surgery.errors import InvalidSpec

DeviceName = Literal["auto", "cpu", "cuda"]


def pick_device(name: DeviceName) -> torch.device:
    """``auto``: the first CUDA device when one is present, else the CPU.

    Raises:
        InvalidSpec: ``cuda`` was asked for and none is available.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidSpec("device 'cuda' was requested but no CUDA device is available", field="device",
                          fix='Send "device": "auto" or "cpu".')
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
