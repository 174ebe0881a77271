"""Memory available to this process, and what each operation needs, checked before any work.

:func:`available_memory` is what the process may still allocate: ``Settings.memory_limit_bytes``
(``ADAPTER_SURGERY_MEMORY_LIMIT_BYTES``) when set; else the tightest headroom of the process's memory cgroups (v2:
``memory.max`` - ``memory.current`` of each level up to the root; v1: ``memory.limit_in_bytes`` -
``memory.usage_in_bytes``; reclaimable page cache, ``inactive_file``, counted as free) and ``MemAvailable`` of
``/proc/meminfo``. In a container that is the container's limit, not the host's free memory.

The estimates (bytes, from the request and the safetensors headers) are upper bounds of what an operation holds at
once; :func:`require` turns one over the available memory into :class:`NotEnoughMemory` (503) naming the request
field that drives it, before anything is read or written.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapter_surgery.errors import NotEnoughMemory

#: Memory the process needs besides an operation's estimate (interpreter, torch, transformers, buffers).
BASELINE_BYTES = 256 << 20
#: cgroup v1 reports "no limit" as a page-rounded 2^63 - 1.
UNLIMITED = 1 << 60
CGROUP_ROOT = Path("/sys/fs/cgroup")


def memory_limit_override() -> int | None:
    """``Settings.memory_limit_bytes`` (``ADAPTER_SURGERY_MEMORY_LIMIT_BYTES``), or ``None``."""
    from pydantic import ValidationError

    from adapter_surgery.settings import Settings

    try:
        return Settings().memory_limit_bytes
    except ValidationError:  # another setting is malformed: the service refuses to start on it anyway
        return None


def available_memory(override: int | None = None) -> int:
    """Bytes this process may still allocate (see the module docstring); ``override`` wins when given."""
    if override is None:
        override = memory_limit_override()
    if override is not None:
        return override
    candidates = [m for m in (meminfo_available(), cgroup_headroom()) if m is not None]
    return min(candidates) if candidates else 0


def meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _inactive_file(stat: Path, key: str) -> int:
    try:
        for line in stat.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """The smallest ``limit - (usage - inactive_file)`` over this process's memory cgroup and its ancestors;
    ``None`` without a limit."""
    try:
        lines = proc_cgroup.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 (unified)
            base, limit_f, usage_f, stat_key = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # cgroup v1
            base = root / "memory"
            limit_f, usage_f, stat_key = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            continue
        directory = base / rel.lstrip("/")
        for level in [directory, *directory.parents]:
            if not str(level).startswith(str(base)):
                break
            limit = _read_int(level / limit_f)
            usage = _read_int(level / usage_f)
            if limit is not None and limit < UNLIMITED and usage is not None:
                used = max(0, usage - _inactive_file(level / "memory.stat", stat_key))
                room = max(0, limit - used)
                best = room if best is None else min(best, room)
            if level == base:
                break
    return best


def require(needed: int, *, field: str, what: str, fix: str, available: int | None = None) -> None:
    """Refuse the request (``NotEnoughMemory``, 503) when ``needed`` (+ the baseline) exceeds what is available.

    Args:
        needed: the operation's estimate in bytes.
        field: the request field that drives the estimate.
        what: what the memory is for ("2^20 new rows of 576 values").
        fix: how to make the request fit.
        available: the memory available (default :func:`available_memory`).
    """
    free = available_memory() if available is None else available
    if needed + BASELINE_BYTES > free:
        raise NotEnoughMemory(
            f"{what} needs about {size(needed)} of memory but only {size(free)} is available to the service "
            f"(its memory limit, not the host's)", field=field, fix=fix)



def size(n: int) -> str:
    """``n`` bytes with a unit that shows them: GiB (2 decimals) from 1 GiB, else MiB or KiB (1 decimal), else
    bytes (``0.00 GiB`` said nothing about a small estimate)."""
    for shift, unit, digits in ((30, "GiB", 2), (20, "MiB", 1), (10, "KiB", 1)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{digits}f} {unit}"
    return f"{n} bytes"


# -- estimates -------------------------------------------------------------------------------------------------
def extend_vocab_bytes(new_rows: int, row_values: int, vocab_tensors: int, dtype_bytes: int, *,
                       covariance_of: int = 0, read_chunk: int = 64 << 20, tokens: int = 0) -> int:
    """extend-vocab: the new rows of every vocabulary tensor kept in their dtype until written, one tensor's rows
    in float32 (plus its cast), a covariance ``covariance_of``^2 in float64 with its Cholesky factor (hewitt), a
    read chunk, and the tokenizer's added tokens (~1 KiB each in the tokenizer and the result)."""
    kept = vocab_tensors * new_rows * row_values * dtype_bytes
    working = new_rows * row_values * (4 + dtype_bytes)
    covariance = 3 * 8 * covariance_of * covariance_of
    return kept + working + covariance + read_chunk + 1024 * tokens


def decomposition_bytes(out_features: int, in_features: int, r: int, init: str) -> int:
    """attach-lora, per target (one at a time): the weight in float32 and its factorization.

    Exact SVD (``pissa``): W, U, S, V^T and LAPACK's workspace (~4 W). ``pissa_niter_N``
    (``torch.svd_lowrank``): W, a residual copy and (out + in) x (r + 10) sketches. ``olora`` (QR): W, Q, R, the
    residual. DoRA and data-free inits hold W (or nothing) and the norms.
    """
    w = 4 * out_features * in_features
    small = min(out_features, in_features)
    if init == "pissa":
        return 4 * w + 4 * small * small + 4 * (out_features + in_features) * small
    if init.startswith("pissa_niter_"):
        return 2 * w + 4 * 4 * (out_features + in_features) * (r + 10)
    if init == "olora":
        return 4 * w
    return 2 * w


def verify_bytes(model_float32_bytes: int, tokens: int, hidden: int, layers: int, vocab: int) -> int:
    """verify: the larger model in float32 (+25 %), and for both models every probe's logits and hidden states
    (kept for the comparison), plus one probe's transient logits."""
    activations = 4 * tokens * (hidden * (layers + 1) * 2 + vocab * 3)
    return int(1.25 * model_float32_bytes) + activations + (64 << 20)
