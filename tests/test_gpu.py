"""``device: "cuda"`` against the CPU path (issue 11): the same operations on the same fixtures, compared.

Marked ``gpu``: skipped where CUDA is unavailable (``tests/conftest.py``), so CI runs none of them; ``bench/gpu.sh``
runs them on a GPU machine. What is compared, and how closely:

- Bytes the arithmetic never touches (copied rows, untouched tensors, linked shards, config, tokenizer): equal.
- Deterministic float32 arithmetic (mean rows, row statistics, SVD products, DoRA norms): CUDA reduces in another
  order than the CPU, so float32 results differ by rounding: within ``rtol`` 1e-5 of the values' scale (float32
  fixtures), and within one bf16 ulp (2^-8 relative) where the result is stored in bf16.
- Random draws (hewitt's z, head inits): a CUDA generator is Philox, the CPU's a Mersenne twister, so the same seed
  gives other numbers by design; compared: the same seed gives the same bytes again on CUDA, and the draws follow
  the formula (hewitt: equal to its one-pass/two-pass counterpart and to the covariance; heads: std within the
  sampling error of :func:`expected_std`).
- PiSSA's singular vectors are defined up to a sign per component: compared sign-free (B A, the residual base).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adapter_surgery.initializers import (
    HEWITT_COVARIANCE_SCALE,
    ROW_INITS,
    RowContext,
    expected_std,
    row_generator,
    row_stats,
)
from adapter_surgery.ops.attach_head import AttachHeadSpec, attach_head
from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from tests.conftest import tensors

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
BF16_ULP = 2.0**-8  # relative spacing of bf16 values (8 significant bits)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.fixtures import make

    root = tmp_path_factory.mktemp("gpu-data")
    for name in ("FX-A", "FX-B"):  # gpt2-tied-tiny (float32), llama-untied-tiny (bf16, two shards)
        make(name, root)
    return root


def _same_except(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], changed: set[str]) -> None:
    assert set(a) == set(b)
    for k in set(a) - changed:
        assert torch.equal(a[k], b[k]), k


def _close(gpu: torch.Tensor, cpu: torch.Tensor, rtol: float) -> None:
    scale = float(cpu.float().abs().max()) or 1.0
    assert float((gpu.float() - cpu.float()).abs().max()) <= rtol * scale


def _within_bf16_ulp(gpu: torch.Tensor, cpu: torch.Tensor) -> None:
    """Stored in bf16: equal, or one rounding step apart (the float32 values differed in their last bits)."""
    g, c = gpu.float(), cpu.float()
    assert bool(((g - c).abs() <= BF16_ULP * c.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)).all())


# -- extend-vocab: mean rows, hewitt rows -------------------------------------------------------------------------
@pytest.mark.parametrize(("fixture", "emb", "heads"), [
    ("gpt2-tied-tiny", "transformer.wte.weight", []),
    ("llama-untied-tiny", "model.embed_tokens.weight", ["lm_head.weight"]),
])
def test_mean_rows_on_cuda_match_the_cpu(data: Path, fixture: str, emb: str, heads: list[str]) -> None:
    toks = [f"<gpu_{i}>" for i in range(5)]
    for dev in ("cpu", "cuda"):
        extend_vocab(ExtendVocabSpec(checkpoint=fixture, output=f"{fixture}-mean-{dev}", tokens=toks, init="mean",
                                     device=dev), RunContext(data))
    cpu, gpu = tensors(data / f"{fixture}-mean-cpu"), tensors(data / f"{fixture}-mean-cuda")
    changed = {emb, *heads}
    _same_except(cpu, gpu, changed)
    for k in changed:
        rows = tensors(data / fixture)[k].shape[0]
        assert torch.equal(cpu[k][:rows], gpu[k][:rows])  # copied rows: the same bytes
        if cpu[k].dtype == torch.float32:
            _close(gpu[k][rows:], cpu[k][rows:], rtol=1e-5)
        else:
            _within_bf16_ulp(gpu[k][rows:], cpu[k][rows:])
    for f in ("config.json", "tokenizer.json"):
        assert (data / f"{fixture}-mean-cpu" / f).read_bytes() == (data / f"{fixture}-mean-cuda" / f).read_bytes()


def test_row_statistics_on_cuda_match_the_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    x = 0.5 + 0.02 * torch.randn(5000, 48, generator=gen)
    x[[7, 4000]] = 0
    chunks = [(lo, x[lo:lo + 900]) for lo in range(0, 5000, 900)]
    entry = lambda first, n: torch.ones(n, dtype=torch.bool)  # noqa: E731
    cpu = row_stats(chunks, entry, CPU, covariance=True)
    gpu = row_stats(chunks, entry, CUDA, covariance=True)
    assert gpu.count == cpu.count == 4998 and gpu.zero_rows == cpu.zero_rows == [7, 4000]
    _close(gpu.mean.cpu(), cpu.mean, rtol=1e-6)
    _close(gpu.covariance.cpu(), cpu.covariance, rtol=1e-5)


def test_hewitt_on_cuda_follows_the_formula_and_is_seeded(data: Path) -> None:
    """Few rows (draws in the statistics pass) on CUDA: equal to the two-pass sum over the same CUDA draws;
    many rows (the covariance): sample covariance 1e-5 Sigma within sampling error; the op is seeded on CUDA."""
    gen = torch.Generator().manual_seed(4)
    x = (3.0 + 0.05 * torch.randn(4000, 16, generator=gen)).to(CUDA)
    chunks = [(lo, x[lo:lo + 1000]) for lo in range(0, 4000, 1000)]
    entry = lambda first, n: torch.ones(n, dtype=torch.bool)  # noqa: E731
    one = row_stats(chunks, entry, CUDA, covariance=False, draws=(4, row_generator(9, "w", "hewitt", CUDA)))
    two = row_stats(chunks, entry, CUDA, covariance=False)

    def ctx(stats, trained=None) -> RowContext:
        return RowContext(name="w", stats=stats, row_shape=(16,), read_rows=lambda ids: x[ids],
                          initializer_range=0.02, seed=9, device=CUDA, trained_rows=trained)

    fused = ROW_INITS["hewitt"](ctx(one), 4)
    passes = ROW_INITS["hewitt"](ctx(two, lambda: (rows for _, rows in chunks)), 4)
    assert float((fused - passes).abs().max()) < 1e-5 * float((passes - two.mean).abs().max())

    cov = row_stats(chunks, entry, CUDA, covariance=True)
    n = 40_000
    new = ROW_INITS["hewitt"](ctx(cov), n).double()
    xd = x.double()
    sigma = (xd - xd.mean(0)).T @ (xd - xd.mean(0)) / x.shape[0]
    sample = (new - new.mean(0)).T @ (new - new.mean(0)) / n
    target = HEWITT_COVARIANCE_SCALE * sigma
    assert float(torch.linalg.matrix_norm(sample - target) / torch.linalg.matrix_norm(target)) < 0.03

    toks = [f"<h_{i}>" for i in range(4)]
    for out in ("hw-1", "hw-2"):
        extend_vocab(ExtendVocabSpec(checkpoint="llama-untied-tiny", output=out, tokens=toks, init="hewitt",
                                     seed=5, device="cuda"), RunContext(data))
    extend_vocab(ExtendVocabSpec(checkpoint="llama-untied-tiny", output="hw-cpu", tokens=toks, init="hewitt",
                                 seed=5, device="cpu"), RunContext(data))
    a, b, c = tensors(data / "hw-1"), tensors(data / "hw-2"), tensors(data / "hw-cpu")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = tensors(data / "llama-untied-tiny")[k].shape[0]
        assert torch.equal(a[k][:rows], c[k][:rows])  # copied rows
        _close(a[k][rows:], b[k][rows:], rtol=1e-6)  # seeded on CUDA (float32 GEMMs may round differently)
        # the new rows sit at the mean, within a few hewitt standard deviations of it (Philox draws, not the CPU's)
        mean = c[k][:rows].float().mean(0)
        spread = math.sqrt(HEWITT_COVARIANCE_SCALE) * float(c[k][:rows].float().std(0).max())
        assert float((a[k][rows:].float() - mean).abs().max()) < 8 * spread + BF16_ULP * float(mean.abs().max())


# -- attach-lora: PiSSA (exact SVD), DoRA norms ----------------------------------------------------------------
def _adapters_on_both(data: Path, checkpoint: str, name: str, **opts: object) -> tuple[dict, dict]:
    """attach-lora with ``opts`` on the CPU and on CUDA (outputs ``<name>-cpu``, ``<name>-cuda``); the two adapters'
    tensors, which hold the same keys."""
    for dev in ("cpu", "cuda"):
        attach_lora(AttachLoraSpec(checkpoint=checkpoint, output=f"{name}-{dev}", device=dev, **opts),
                    RunContext(data))
    cpu = tensors(data / f"{name}-cpu" / "adapter_model.safetensors")
    gpu = tensors(data / f"{name}-cuda" / "adapter_model.safetensors")
    assert set(cpu) == set(gpu)
    return cpu, gpu


def test_pissa_on_cuda_matches_the_cpu_sign_free(data: Path) -> None:
    cpu, gpu = _adapters_on_both(data, "gpt2-tied-tiny", "pissa", r=4, lora_alpha=8,
                                 target_modules=["c_attn", "c_fc"], init_lora_weights="pissa")
    for key in (k for k in cpu if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        product_cpu, product_gpu = cpu[b_key] @ cpu[key], gpu[b_key] @ gpu[key]  # sign per component cancels
        _close(product_gpu, product_cpu, rtol=1e-4)
        # singular values: the row norms of A squared (A = sqrt(S/s) V^T), sign-free, in order
        _close(gpu[key].norm(dim=1), cpu[key].norm(dim=1), rtol=1e-5)
    base_cpu, base_gpu = tensors(data / "pissa-cpu" / "base"), tensors(data / "pissa-cuda" / "base")
    changed = {k for k in base_cpu if not torch.equal(base_cpu[k], tensors(data / "gpt2-tied-tiny")[k])}
    assert changed  # the residual W - s B A of each target
    _same_except(base_cpu, base_gpu, changed)
    for k in changed:
        _close(base_gpu[k], base_cpu[k], rtol=1e-4)


def test_dora_magnitudes_on_cuda_match_the_cpu(data: Path) -> None:
    cpu, gpu = _adapters_on_both(data, "llama-untied-tiny", "dora", r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"], use_dora=True)
    magnitudes = [k for k in cpu if "lora_magnitude_vector" in k]
    assert magnitudes
    for k in magnitudes:  # ||W + s B A||_row with B = 0: the row norms of W in float32
        _close(gpu[k], cpu[k], rtol=1e-5)
    for k in (k for k in cpu if k.endswith("lora_B.weight")):
        assert not gpu[k].any() and not cpu[k].any()


# -- attach-head: the head's init ------------------------------------------------------------------------------
def test_head_init_on_cuda(data: Path) -> None:
    """zeros: byte-identical outputs; a random init: every other byte identical, seeded on CUDA, and the std of
    :func:`expected_std` within sampling error (64 000 draws: 1% relative standard error, asserted at 5%)."""
    for init in ("zeros", "kaiming_normal"):
        for dev, out in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda", "cuda-again")):
            attach_head(AttachHeadSpec(checkpoint="llama-untied-tiny", output=f"head-{init}-{out}", num_labels=2000,
                                       init=init, seed=3, device=dev), RunContext(data))
        cpu, gpu = tensors(data / f"head-{init}-cpu"), tensors(data / f"head-{init}-cuda")
        again = tensors(data / f"head-{init}-cuda-again")
        if init == "zeros":
            _same_except(cpu, gpu, set())
            continue
        _same_except(cpu, gpu, {"score.weight"})
        assert torch.equal(gpu["score.weight"], again["score.weight"])
        w = gpu["score.weight"].float()
        target = expected_std(init, fan_in=w.shape[1], fan_out=w.shape[0])
        assert abs(float(w.std()) / target - 1) < 0.05 and abs(float(w.mean())) < 0.05 * target
