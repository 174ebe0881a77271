"""The initializer registry: weight-init statistics, and seeded global-RNG draws under concurrency."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from adapter_surgery.initializers import WEIGHT_INITS, WeightInitArgs, expected_std, seeded_global_rng


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
