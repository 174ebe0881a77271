"""The initializer registry: how new rows of vocabulary tensors and new weight matrices get their values.

Two families, one registry each, looked up by the names requests use:

``ROW_INITS`` — values for new rows of a vocabulary-indexed tensor (input embedding ``(V, d)``, untied output
head ``(V, d)``, MLM output bias ``(V,)``). Every function takes a :class:`RowContext` and the number of rows,
and returns float32 rows of shape ``(n, *row_shape)`` on ``ctx.device``; the caller casts to the stored dtype.

- ``mean``: the mean of the trained rows, computed in float32. Hewitt, "Initializing New Word Embeddings for
  Pretrained Language Models" (2021, nlp.stanford.edu/~johnhew/vocab-expansion.html): mean-initialized output
  rows bound the change of every old token's probability, KL(p_base || p_new) <= log(1 + n / V) for n new
  tokens, where random rows can take all the mass.
- ``hewitt``: samples from N(mu, 1e-5 * Sigma), mu and Sigma the mean and full covariance of the trained
  rows, as in Hewitt (2021); ``transformers``' ``resize_token_embeddings(mean_resizing=True)`` does the same with
  scale 1e-9. Seeded; for a bias, N(mean, 1e-5 * variance).
- ``subword_mean``: the mean of the rows of the pieces the base tokenizer splits the token (or its
  description) into (e.g. Gee et al. 2022, "Fast Vocabulary Transfer"); rows with no pieces fall back to ``mean``.
- ``copy``: the row of an existing token, named in the request.
- ``normal``: N(0, initializer_range^2), the ``transformers`` ``_init_weights`` default for embeddings and
  heads (``config.initializer_range``, 0.02 when absent); biases get zeros, as there.
- ``zeros``: all zeros.

``WEIGHT_INITS`` — fresh matrices ``(fan_out, fan_in)`` for new layers (classification heads, LoRA A), with
``fan_in``/``fan_out`` as in ``torch.nn.init``:

- ``kaiming_normal``: N(0, 2 / fan_in), He et al. 2015 ("Delving Deep into Rectifiers"), ``kaiming_normal_``
  with the ReLU gain. Keeps the output variance equal to the input's through ReLU-like layers; for a
  classification head it gives initial logits of std ~ sqrt(2) * RMS of the pooled hidden state: clearly
  non-uniform initial predictions, fast early learning.
- ``kaiming_uniform``: U(-b, b), b = sqrt(6 / ((1 + a^2) fan_in)), a = sqrt(5): PyTorch's ``nn.Linear``
  default (``reset_parameters``), i.e. b = 1 / sqrt(fan_in), std b / sqrt(3) = 1 / sqrt(3 fan_in); also PEFT's
  LoRA A init. Choose it to match what a freshly built PyTorch ``nn.Linear`` would hold.
- ``xavier_uniform``: U(-b, b), b = sqrt(6 / (fan_in + fan_out)), Glorot & Bengio 2010 ("Understanding the
  difficulty of training deep feedforward neural networks"); variance 2 / (fan_in + fan_out), std b / sqrt(3).
  Balances forward and backward variance; for heads with many labels (fan_out large) it is the smaller scale.
- ``xavier_normal``: N(0, 2 / (fan_in + fan_out)), Glorot & Bengio 2010.
- ``normal``: N(0, initializer_range^2), what ``transformers`` ``_init_weights`` does for new Linear layers
  (heads it creates when a checkpoint lacks them); small initial logits (near-uniform predictions). Choose it to
  reproduce ``from_pretrained(num_labels=...)``'s head distribution, seeded.
- ``zeros``: every initial logit 0 (uniform predictions); no gradient reaches the backbone through the head at the
  first step (it is W^T times the logits' gradient), but the head itself learns, its gradient not depending on W.
- ``scaled_normal``: N(0, (initializer_range / sqrt(2 * num_layers))^2) for residual output projections,
  GPT-2 (Radford et al. 2019) / Megatron-LM (Shoeybi et al. 2019).
"""

from __future__ import annotations

import contextlib
import math
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

#: Hewitt (2021) samples new rows from N(mu, 1e-5 * Sigma).
HEWITT_COVARIANCE_SCALE = 1e-5
#: torch's global RNG is one per process: code that must draw from it (peft's and transformers' own init
#: functions) holds this lock, so that concurrent requests cannot reseed it in the middle of another's draws.
_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Hold the global-RNG lock, seed torch's global RNG (``torch.manual_seed``, CUDA too when ``device`` is
    CUDA), and restore the previous state afterwards. For library init code that only draws from the global RNG
    (peft's LoRA init, transformers' ``_init_weights``): the same seed then gives the same values, even with
    concurrent requests."""
    devices = [torch.cuda.current_device()] if device is not None and device.type == "cuda" else []
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class RowStats:
    """Statistics of the trained rows of one vocabulary tensor, in float32 on ``device``.

    Attributes:
        mean: the mean row, shape ``row_shape``.
        covariance: ``(d, d)`` covariance of the trained rows (``(1, 1)`` variance for a bias); ``None``
            unless requested.
        count: how many rows were trained (had a tokenizer entry and a non-zero norm).
        zero_rows: ids of rows with a tokenizer entry whose values are all zero.
    """

    mean: torch.Tensor
    covariance: torch.Tensor | None
    count: int
    zero_rows: list[int] = field(default_factory=list)


@dataclass
class RowContext:
    """What a row initializer may use for one tensor.

    Attributes:
        name: the tensor's checkpoint key (seeds its random stream).
        stats: trained-row statistics of this tensor.
        row_shape: ``()`` for a bias, ``(d,)`` for a matrix.
        read_rows: returns float32 rows of this tensor for the given ids, on ``device``.
        initializer_range: ``config.initializer_range`` (0.02 without config).
        seed: request seed; each tensor draws from its own generator seeded from (seed, name).
        device: where the arithmetic runs.
        source_ids: per new row, the ids it derives from (``copy``: one id; ``subword_mean``: the pieces).
    """

    name: str
    stats: RowStats
    row_shape: tuple[int, ...]
    read_rows: Callable[[list[int]], torch.Tensor]
    initializer_range: float
    seed: int
    device: torch.device
    source_ids: list[list[int]] = field(default_factory=list)

    def generator(self, salt: str) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(f"{self.name}:{salt}".encode())) % (2**63))
        return gen


RowInit = Callable[[RowContext, int], torch.Tensor]


def _rows_mean(ctx: RowContext, n: int) -> torch.Tensor:
    return ctx.stats.mean.to(ctx.device, torch.float32).expand(n, *ctx.row_shape).clone()


def _rows_zeros(ctx: RowContext, n: int) -> torch.Tensor:
    return torch.zeros(n, *ctx.row_shape, device=ctx.device)


def _rows_normal(ctx: RowContext, n: int) -> torch.Tensor:
    if not ctx.row_shape:
        return _rows_zeros(ctx, n)
    out = torch.empty(n, *ctx.row_shape, device=ctx.device)
    return out.normal_(0.0, ctx.initializer_range, generator=ctx.generator("normal"))


def _rows_hewitt(ctx: RowContext, n: int) -> torch.Tensor:
    cov = ctx.stats.covariance
    if cov is None:
        raise ValueError("hewitt needs the covariance of the trained rows")
    mean = ctx.stats.mean.to(ctx.device, torch.float32).reshape(-1)
    factor = _psd_factor(cov.to(ctx.device, torch.float64) * HEWITT_COVARIANCE_SCALE)
    z = torch.randn(n, mean.numel(), device=ctx.device, dtype=torch.float64, generator=ctx.generator("hewitt"))
    return (mean.double() + z @ factor.T).float().reshape(n, *ctx.row_shape)


def _psd_factor(cov: torch.Tensor) -> torch.Tensor:
    """L with L L^T = cov: Cholesky, or the eigen-decomposition with negative eigenvalues clamped to 0."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return chol
    vals, vecs = torch.linalg.eigh(cov)
    return vecs * vals.clamp(min=0).sqrt()


def _rows_from_sources(ctx: RowContext, n: int) -> torch.Tensor:
    rows = []
    for ids in ctx.source_ids[:n]:
        rows.append(ctx.read_rows(ids).float().mean(dim=0) if ids else ctx.stats.mean.to(ctx.device))
    return torch.stack(rows) if rows else _rows_zeros(ctx, 0)


#: Row initializers by request name (see the module docstring for formulas and sources).
ROW_INITS: dict[str, RowInit] = {
    "mean": _rows_mean,
    "hewitt": _rows_hewitt,
    "subword_mean": _rows_from_sources,
    "copy": _rows_from_sources,
    "normal": _rows_normal,
    "zeros": _rows_zeros,
}


def row_stats(chunks: list[tuple[int, torch.Tensor]] | object, trained: Callable[[int, int], torch.Tensor],
              device: torch.device, covariance: bool) -> RowStats:
    """Mean (and covariance) of the trained rows of a tensor read in row chunks, in float32.

    ``chunks`` yields ``(first_row, rows)``; ``trained(first, count)`` gives the boolean mask of rows that have
    a tokenizer entry. Rows that are all zero are excluded (and reported in ``zero_rows`` when they have an
    entry). A tensor read in one chunk gets exactly ``rows[mask].float().mean(0)``; over several chunks the
    sums are accumulated in float64.
    """
    total: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    count, zero_rows = 0, []
    single: torch.Tensor | None = None
    for pieces, (first, rows) in enumerate(chunks, start=1):  # type: ignore[call-overload]
        x = rows.to(device).float()
        flat = x.reshape(x.shape[0], -1)
        has_entry = trained(first, x.shape[0]).to(device)
        keep = has_entry & flat.ne(0).any(dim=1)
        zero_rows += (torch.nonzero(has_entry & ~keep).flatten() + first).tolist()
        sel = x if bool(keep.all()) else x[keep]
        single = sel if pieces == 1 else None
        s = sel.sum(dim=0).double()  # float32 within a chunk, float64 across chunks
        total = s if total is None else total + s
        if covariance:
            f = sel.reshape(sel.shape[0], -1).double()
            g = f.T @ f
            gram = g if gram is None else gram + g
        count += sel.shape[0]
    if total is None or count == 0:
        raise ValueError("no trained rows")
    mean = single.mean(dim=0) if single is not None else (total / count).float()
    cov = None
    if covariance and gram is not None:
        mu = (total / count).reshape(-1, 1)
        cov = gram / count - mu @ mu.T
    return RowStats(mean=mean, covariance=cov, count=count, zero_rows=zero_rows)


# -- weight matrices ------------------------------------------------------------------------------------------
WeightInit = Callable[[torch.Tensor, "WeightInitArgs"], torch.Tensor]


@dataclass(frozen=True)
class WeightInitArgs:
    """Parameters some weight initializers need (``initializer_range``, ``num_layers``) and the generator."""

    generator: torch.Generator
    initializer_range: float = 0.02
    num_layers: int = 1


def _fans(w: torch.Tensor) -> tuple[int, int]:
    fan_out, fan_in = w.shape[0], w[0].numel()
    return fan_in, fan_out


def _kaiming_normal(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    fan_in, _ = _fans(w)
    return w.normal_(0.0, math.sqrt(2.0 / fan_in), generator=a.generator)


def _kaiming_uniform(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    fan_in, _ = _fans(w)
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # a = sqrt(5): bound = 1 / sqrt(fan_in)
    return w.uniform_(-bound, bound, generator=a.generator)


def _xavier_uniform(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    fan_in, fan_out = _fans(w)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return w.uniform_(-bound, bound, generator=a.generator)


def _xavier_normal(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    fan_in, fan_out = _fans(w)
    return w.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=a.generator)


def _normal(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    return w.normal_(0.0, a.initializer_range, generator=a.generator)


def _scaled_normal(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    return w.normal_(0.0, a.initializer_range / math.sqrt(2.0 * a.num_layers), generator=a.generator)


def _zeros(w: torch.Tensor, a: WeightInitArgs) -> torch.Tensor:
    return w.zero_()


#: Weight initializers by request name (see the module docstring for formulas and sources).
WEIGHT_INITS: dict[str, WeightInit] = {
    "kaiming_normal": _kaiming_normal,
    "kaiming_uniform": _kaiming_uniform,
    "xavier_uniform": _xavier_uniform,
    "xavier_normal": _xavier_normal,
    "normal": _normal,
    "scaled_normal": _scaled_normal,
    "zeros": _zeros,
}


def expected_std(name: str, fan_in: int, fan_out: int, initializer_range: float = 0.02,
                 num_layers: int = 1) -> float:
    """The standard deviation each ``WEIGHT_INITS`` entry targets (for tests and the preservation report).

    Uniform inits U(-b, b) have std b / sqrt(3): kaiming_uniform 1 / sqrt(3 fan_in), xavier_uniform
    sqrt(2 / (fan_in + fan_out)), the same as xavier_normal. ``fan_in`` is ``w[0].numel()``, ``fan_out``
    ``w.shape[0]`` (``torch.nn.init._calculate_fan_in_and_fan_out``).
    """
    return {
        "kaiming_normal": math.sqrt(2.0 / fan_in),
        "kaiming_uniform": 1.0 / math.sqrt(fan_in) / math.sqrt(3.0),
        "xavier_uniform": math.sqrt(2.0 / (fan_in + fan_out)),
        "xavier_normal": math.sqrt(2.0 / (fan_in + fan_out)),
        "normal": initializer_range,
        "scaled_normal": initializer_range / math.sqrt(2.0 * num_layers),
        "zeros": 0.0,
    }[name]
