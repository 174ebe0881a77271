"""The initializer registry: weight-init statistics, and seeded global-RNG draws under concurrency."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from adapter_surgery import initializers
from adapter_surgery.initializers import (
    HEWITT_COVARIANCE_SCALE,
    ROW_INITS,
    WEIGHT_INITS,
    RowContext,
    RowStats,
    WeightInitArgs,
    expected_std,
    hewitt_needs_covariance,
    row_stats,
    seeded_global_rng,
)


@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "normal",
                                  "scaled_normal"])
def test_weight_init_std_matches_its_formula(name: str) -> None:
    w = torch.empty(256, 512)
    WEIGHT_INITS[name](w, WeightInitArgs(generator=torch.Generator().manual_seed(0), num_layers=12))
    target = expected_std(name, fan_in=512, fan_out=256, num_layers=12)
    assert abs(float(w.std()) / target - 1) < 0.02
    if name == "kaiming_uniform":
        assert float(w.abs().max()) <= 1 / math.sqrt(512)


def test_seeded_global_rng_is_deterministic_under_concurrency() -> None:
    def draw(seed: int) -> torch.Tensor:
        with seeded_global_rng(seed):
            parts = []
            for _ in range(200):
                parts.append(torch.rand(8))
            return torch.cat(parts)

    expected = {s: draw(s) for s in range(4)}
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, draw(s))) for s in range(4) for _ in (0,)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[s], expected[s]) for s in range(4))
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    with seeded_global_rng(7):
        torch.rand(5)
    assert torch.equal(torch.rand(3), a)  # the caller's RNG state is restored


# -- hewitt: N(mu, 1e-5 Sigma), through the covariance or straight from the centred rows -------------------------
def _trained_rows_of(x: torch.Tensor, block: int):
    def rows():
        for lo in range(0, x.shape[0], block):
            yield x[lo:lo + block]
    return rows


def _correlated_rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d) + torch.eye(d)
    return 3.0 + 0.05 * torch.randn(n, d, generator=gen) @ mix  # a mean far from 0, correlated columns


@pytest.mark.parametrize("through_covariance", [True, False])
def test_hewitt_sample_covariance_matches_1e_5_sigma(through_covariance: bool) -> None:
    x = _correlated_rows(3000, 8, seed=1)
    chunks = [(lo, x[lo:lo + 700]) for lo in range(0, 3000, 700)]  # several blocks: float64 accumulation
    stats = row_stats(chunks, lambda first, n: torch.ones(n, dtype=torch.bool), torch.device("cpu"),
                      covariance=through_covariance)
    xd = x.double()
    mu = xd.mean(0)
    sigma = (xd - mu).T @ (xd - mu) / x.shape[0]  # the population covariance of the trained rows
    assert stats.count == 3000 and torch.allclose(stats.mean.double(), mu, atol=1e-5)
    if through_covariance:
        assert torch.allclose(stats.covariance, sigma, rtol=1e-4, atol=1e-9)
    ctx = RowContext(name="w", stats=stats, row_shape=(8,), read_rows=lambda ids: x[ids], initializer_range=0.02,
                     seed=5, device=torch.device("cpu"),
                     trained_rows=None if through_covariance else _trained_rows_of(x, 512))
    n = 40_000
    new = ROW_INITS["hewitt"](ctx, n).double()
    assert new.shape == (n, 8)
    sample = (new - mu).T @ (new - mu) / n
    target = HEWITT_COVARIANCE_SCALE * sigma
    # sampling error of a covariance estimate from n draws: about sqrt(2 / n) relative, 0.7% here
    assert float(torch.linalg.matrix_norm(sample - target) / torch.linalg.matrix_norm(target)) < 0.03
    assert float((new.mean(0) - mu).abs().max()) < 5 * math.sqrt(float(target.diagonal().max()) / n)
    assert torch.equal(ROW_INITS["hewitt"](ctx, n), new.float())  # seeded: the same draws again


def test_hewitt_draws_summed_in_the_statistics_pass_equal_the_second_pass() -> None:
    """row_stats(draws=...) draws the same z as hewitt's pass over the trained rows, block by block (here with a
    mean far from 0 and zero rows skipped), so one pass gives the second pass's rows up to float rounding."""
    x = _correlated_rows(3000, 16, seed=2)
    x[[5, 700, 2999]] = 0  # all-zero rows: not trained, no draw
    chunks = [(lo, x[lo:lo + 700]) for lo in range(0, 3000, 700)]
    entry = lambda first, n: torch.ones(n, dtype=torch.bool)  # noqa: E731
    cpu, n = torch.device("cpu"), 4
    gen = initializers.row_generator(5, "w", "hewitt", cpu)
    one = row_stats(chunks, entry, cpu, covariance=False, draws=(n, gen))
    two = row_stats(chunks, entry, cpu, covariance=False)
    assert one.hewitt_draws is not None and two.hewitt_draws is None and one.zero_rows == [5, 700, 2999]
    assert torch.equal(one.mean, two.mean) and one.count == two.count == 2997

    def trained_rows():
        for _, rows in chunks:
            keep = rows.abs().amax(dim=1).ne(0)
            yield rows[keep]

    def ctx(stats: RowStats) -> RowContext:
        return RowContext(name="w", stats=stats, row_shape=(16,), read_rows=lambda ids: x[ids],
                          initializer_range=0.02, seed=5, device=cpu, trained_rows=trained_rows)

    fused, passes = ROW_INITS["hewitt"](ctx(one), n), ROW_INITS["hewitt"](ctx(two), n)
    spread = float((passes - two.mean).abs().max())
    assert float((fused - passes).abs().max()) < 1e-5 * spread  # the same sample: rounding apart
    # draws for another row count are not used: the second pass, exactly
    assert torch.equal(ROW_INITS["hewitt"](ctx(one), n + 1), ROW_INITS["hewitt"](ctx(two), n + 1))


def test_hewitt_without_covariance_or_rows_is_refused() -> None:
    stats = RowStats(mean=torch.zeros(4), covariance=None, count=10)
    ctx = RowContext(name="w", stats=stats, row_shape=(4,), read_rows=lambda ids: torch.zeros(len(ids), 4),
                     initializer_range=0.02, seed=0, device=torch.device("cpu"))
    with pytest.raises(ValueError):
        ROW_INITS["hewitt"](ctx, 2)


def test_hewitt_uses_the_covariance_only_for_many_rows_or_a_bias() -> None:
    assert not hewitt_needs_covariance(8, (576,))
    assert hewitt_needs_covariance(200, (576,))
    assert hewitt_needs_covariance(1, ())


def test_row_stats_in_blocks_matches_the_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _correlated_rows(1000, 16, seed=2).bfloat16()
    x[10] = 0  # an all-zero row with a tokenizer entry: left out, reported
    mask = torch.ones(1000, dtype=torch.bool)
    mask[20:30] = False  # rows without an entry: left out, not reported
    whole = row_stats([(0, x)], lambda f, n: mask[f:f + n], torch.device("cpu"), covariance=True)
    monkeypatch.setattr(initializers, "STATS_BLOCK_BYTES", 16 * 4 * 64)  # blocks of 64 rows
    blocks = row_stats([(0, x[:500]), (500, x[500:])], lambda f, n: mask[f:f + n], torch.device("cpu"),
                       covariance=True)
    kept = torch.cat([x[:10], x[11:20], x[30:]]).float()
    assert whole.count == blocks.count == 989 and whole.zero_rows == blocks.zero_rows == [10]
    assert torch.equal(whole.mean, kept.mean(0))  # one block: exactly torch's mean
    assert torch.allclose(blocks.mean, kept.mean(0), rtol=0, atol=1e-6)
    assert torch.allclose(blocks.covariance, whole.covariance, rtol=1e-4, atol=1e-10)


def test_bf16_blocks_convert_and_find_zero_rows_exactly_as_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy path for bfloat16 (bits shifted into float32; zero rows from the bits without the sign) gives the
    float32 values of ``Tensor.float`` bit for bit (NaN, inf, -0, subnormals) and the rows ``abs().amax().ne(0)``
    keeps; the statistics over several reused blocks are those of the torch path."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # every bfloat16 value
    every = bits.view(torch.bfloat16).reshape(-1, 8)
    x, nonzero = initializers._bf16_block(every, initializers.np.empty(every.numel() + 5, dtype="uint32"))
    assert torch.equal(x.view(torch.int32), every.float().view(torch.int32))
    assert torch.equal(nonzero, every.float().abs().amax(dim=1).ne(0))
    special = torch.tensor([[0.0, -0.0], [float("nan"), 0.0], [-0.0, float("-inf")], [1e-40, 0.0]]).bfloat16()
    _, nonzero = initializers._bf16_block(special, initializers.np.empty(8, dtype="uint32"))
    assert nonzero.tolist() == [False, True, True, True]

    rows = _correlated_rows(700, 16, seed=3).bfloat16()
    rows[[5, 300, 699]] = 0
    rows[301, 2] = -0.0
    mask = torch.ones(700, dtype=torch.bool)
    mask[40:50] = False
    monkeypatch.setattr(initializers, "STATS_BLOCK_BYTES", 16 * 4 * 64)  # blocks of 64 rows, one buffer

    def stats() -> initializers.RowStats:
        return row_stats([(0, rows[:350]), (350, rows[350:])], lambda f, n: mask[f:f + n], torch.device("cpu"),
                         covariance=True)

    fast = stats()
    monkeypatch.setattr(initializers, "_bf16_block", lambda part, out: (
        part.float(), part.float().reshape(part.shape[0], -1).abs().amax(dim=1).ne(0)))
    slow = stats()
    assert fast.zero_rows == slow.zero_rows == [5, 300, 699] and fast.count == slow.count == 687
    assert torch.equal(fast.mean, slow.mean) and torch.equal(fast.covariance, slow.covariance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_zero_rows_are_found_in_the_stored_dtype_only_where_float32_is_exact(dtype: torch.dtype) -> None:
    """fp16/fp32 rows are tested for zero as stored; float64 after the float32 conversion, as before (a float64
    value below float32's range is zero in float32: the row counts as zero, as the statistics see it)."""
    rows = torch.tensor([[0.0, -0.0], [float("nan"), 0.0], [-0.0, float("-inf")], [1e-300, 0.0], [3.0, 0.0]],
                        dtype=torch.float64).to(dtype)
    everyone = lambda f, n: torch.ones(n, dtype=torch.bool)  # noqa: E731
    (first, x, has_entry, keep), = initializers.trained_blocks([(0, rows)], everyone, torch.device("cpu"))
    assert first == 0 and x.dtype == torch.float32 and has_entry.all()
    assert keep.tolist() == [False, True, True, False, True]
