"""The report's memory estimate, from the safetensors headers: a float32 copy of the larger model plus the probes'
activations (:func:`adapter_surgery.resources.verify_bytes`), against the memory available to the process or, on
CUDA, the free device memory."""

from __future__ import annotations

import math

import torch

from adapter_surgery import resources
from adapter_surgery.io import Checkpoint
from adapter_surgery.report.models import VerifyOptions

#: Memory estimate: :func:`adapter_surgery.resources.verify_bytes` (1.25 x float32 model + activations + 64 MiB).
SAFETY = 1.25
FIXED_OVERHEAD = 64 * 1024 * 1024


def available_memory(device: torch.device, limit: int | None = None) -> int:
    """Bytes available for new allocations: free CUDA memory, else what the process may still allocate
    (:func:`adapter_surgery.resources.available_memory`: the cgroup limit, ``MemAvailable``, or the setting)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return resources.available_memory(limit)


def float32_bytes(ckpt: Checkpoint) -> int:
    return sum(4 * math.prod(shape) for shape in ckpt.shapes().values())


def estimate(base: Checkpoint, patched: Checkpoint, opts: VerifyOptions, dev: torch.device,
            limit: int | None = None) -> tuple[int, int]:
    cfg = patched.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 1024)  # type: ignore[union-attr]
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 1)  # type: ignore[union-attr]
    vocab = int(text.get("vocab_size") or 0)  # type: ignore[union-attr]
    tokens = opts.num_probes * opts.probe_length + (4 * len(opts.text) if opts.text else 0)
    needed = resources.verify_bytes(max(float32_bytes(base), float32_bytes(patched)), tokens, hidden, layers, vocab)
    available = available_memory(dev, limit)
    if dev.type != "cpu":  # the weights pass through host memory on the way to the device
        available = min(available, available_memory(torch.device("cpu"), limit))
    return needed, available

