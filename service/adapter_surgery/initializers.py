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
  scale 1e-9. Seeded; for a bias, N(mean, 1e-5 * variance). For n new rows of width d with n <= d / 4 (the usual
  case: a few tokens) no d x d matrix is built: with X_c the N trained rows minus mu and z ~ N(0, I_N),
  mu + sqrt(1e-5 / N) X_c^T z has exactly the covariance 1e-5 X_c^T X_c / N = 1e-5 Sigma, at a cost of n N d
  (one more pass over the rows) instead of N d^2. Otherwise Sigma is accumulated from float32 GEMMs of bounded
  blocks of rows, centred on the first block's mean, summed in float64, and factored (Cholesky).
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

#: Hewitt (2021) samples new rows from N(mu, 1e-5 * Sigma).
HEWITT_COVARIANCE_SCALE = 1e-5
#: float32 bytes of one block of rows in the statistics passes: bounded memory, cache-sized pieces for torch ops.
STATS_BLOCK_BYTES = 16 << 20
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
        hewitt_draws: with ``row_stats(draws=(n, generator))``, ``sum_i z_i (x_i - mean)`` over the trained rows
            (float64, ``(n, row numel)``), the ``z`` drawn block by block exactly as ``hewitt``'s second pass over
            the rows draws them: ``hewitt`` then needs no second pass. ``None`` otherwise.
    """

    mean: torch.Tensor
    covariance: torch.Tensor | None
    count: int
    zero_rows: list[int] = field(default_factory=list)
    hewitt_draws: torch.Tensor | None = None


def row_generator(seed: int, name: str, salt: str, device: torch.device) -> torch.Generator:
    """The generator of tensor ``name``'s draws for ``salt`` (a strategy), seeded from (request seed, name, salt)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}:{salt}".encode())) % (2**63))
    return gen


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
        trained_rows: yields the trained rows (those counted in ``stats``) as float32 ``(k, row numel)`` blocks on
            ``device``, in row order, reading the tensor again (``hewitt`` without a covariance); ``None``: not
            available.
    """

    name: str
    stats: RowStats
    row_shape: tuple[int, ...]
    read_rows: Callable[[list[int]], torch.Tensor]
    initializer_range: float
    seed: int
    device: torch.device
    source_ids: list[list[int]] = field(default_factory=list)
    trained_rows: Callable[[], Iterator[torch.Tensor]] | None = None

    def generator(self, salt: str) -> torch.Generator:
        return row_generator(self.seed, self.name, salt, self.device)


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


def hewitt_needs_covariance(new_rows: int, row_shape: tuple[int, ...]) -> bool:
    """Whether ``hewitt`` for ``new_rows`` rows of ``row_shape`` samples through the d x d covariance (many rows,
    or a bias) rather than straight from the centred rows (``new_rows <= d / 4``: cheaper than building it)."""
    d = math.prod(row_shape)
    return not row_shape or new_rows > d // 4


def _rows_hewitt(ctx: RowContext, n: int) -> torch.Tensor:
    cov = ctx.stats.covariance
    mean = ctx.stats.mean.to(ctx.device, torch.float32).reshape(-1)
    draws = ctx.stats.hewitt_draws
    if cov is None and draws is not None and draws.shape[0] == n and n > 0:  # drawn in the statistics pass
        scale = math.sqrt(HEWITT_COVARIANCE_SCALE / ctx.stats.count)
        return (mean.double() + draws.to(ctx.device) * scale).float().reshape(n, *ctx.row_shape)
    if cov is None and ctx.trained_rows is not None and n > 0:
        return _hewitt_from_rows(ctx, mean, n)
    if cov is None:
        raise ValueError("hewitt needs the covariance of the trained rows")
    factor = _psd_factor(cov.to(ctx.device, torch.float64) * HEWITT_COVARIANCE_SCALE)
    z = torch.randn(n, mean.numel(), device=ctx.device, dtype=torch.float64, generator=ctx.generator("hewitt"))
    return (mean.double() + z @ factor.T).float().reshape(n, *ctx.row_shape)


def _hewitt_from_rows(ctx: RowContext, mean: torch.Tensor, n: int) -> torch.Tensor:
    """N(mu, 1e-5 Sigma) without Sigma: mu + sqrt(1e-5 / N) sum_i z_i (x_i - mu), z_i ~ N(0, I_n) per trained row
    (float32 GEMMs per block of rows, summed in float64)."""
    assert ctx.trained_rows is not None
    gen = ctx.generator("hewitt")
    acc = torch.zeros(n, mean.numel(), device=ctx.device, dtype=torch.float64)
    count = 0
    for block in ctx.trained_rows():
        z = torch.randn(n, block.shape[0], device=ctx.device, dtype=torch.float32, generator=gen)
        acc += (z @ (block - mean)).double()
        count += block.shape[0]
    if count != ctx.stats.count:
        raise ValueError(f"hewitt read {count} trained rows, the statistics counted {ctx.stats.count}")
    scale = math.sqrt(HEWITT_COVARIANCE_SCALE / count)
    return (mean.double() + acc * scale).float().reshape(n, *ctx.row_shape)


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


#: Stored dtypes whose float32 conversion is exact: a row is all zero (or holds a NaN) in the stored dtype exactly when
#: it is in float32, so the zero test reads the stored rows (half the bytes of the float32 copy for fp16).
_EXACT_IN_FLOAT32 = (torch.float16, torch.float32)


def _bf16_block(part: torch.Tensor, out: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU bfloat16 block as ``(part.float(), row is not all zero)`` from its bits, with numpy's vectorized integer
    kernels (about 5x faster here than torch's bfloat16 conversion and reductions, same values): bfloat16 is the top
    half of a float32, so the float32 bits are the 16 bits shifted left by 16 (exactly what ``Tensor.float`` computes,
    NaN payloads and subnormals included); a row is all zero when every value is +0 or -0, i.e. its bits without the
    sign bit (``& 0x7fff``) are all 0 (NaN and inf are not zero, as with ``abs().amax().ne(0)``). The float32
    block is written into ``out`` (flat uint32, at least ``part.numel()``: a buffer reused from block to block, so
    that memory is touched once, not once per block), and is valid until the next call with that buffer."""
    bits = part.contiguous().view(torch.int16).numpy().view(np.uint16)
    wide = out[: bits.size].reshape(bits.shape)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    x = torch.from_numpy(wide.view(np.float32))
    nonzero = np.bitwise_and(bits.reshape(bits.shape[0], -1), 0x7FFF).max(axis=1) != 0
    return x, torch.from_numpy(nonzero)


def trained_blocks(chunks: Iterable[tuple[int, torch.Tensor]], trained: Callable[[int, int], torch.Tensor],
                   device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split ``(first_row, rows)`` chunks into blocks of at most :data:`STATS_BLOCK_BYTES` in float32 and yield
    ``(first_row, x, has_entry, keep)``: ``x`` the block in float32 on ``device`` (its stored shape), ``has_entry``
    from ``trained``, ``keep`` = has an entry and is not all zero (the rows the statistics use; a row is all zero
    when its largest absolute value is 0, one reduction over the block instead of a boolean copy of it, taken in the
    stored dtype when its float32 conversion is exact; NaN rows count as not zero, as with ``ne(0).any()``).
    ``chunks`` may reuse one buffer (:meth:`Checkpoint.scan_rows`), and a bfloat16 block's ``x`` is one reused
    buffer: a consumer is done with a block (or copies it) before it asks for the next."""
    scratch: np.ndarray | None = None  # the float32 block of a bfloat16 tensor, reused (see _bf16_block)
    for first, rows in chunks:
        n = rows.shape[0]
        if n == 0:
            continue
        step = max(1, STATS_BLOCK_BYTES // (4 * max(1, rows[0].numel())))
        mask = trained(first, n)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            part = rows[lo:hi].to(device)
            has_entry = mask[lo:hi].to(device)
            if part.dtype == torch.bfloat16 and part.device.type == "cpu" and part[0].numel():
                if scratch is None or scratch.size < part.numel():
                    scratch = np.empty(step * rows[0].numel(), dtype=np.uint32)
                x, nonzero = _bf16_block(part, scratch)
            else:
                x = part.float()
                exact = part if part.dtype in _EXACT_IN_FLOAT32 else x  # half the bytes to scan for fp16
                nonzero = exact.reshape(hi - lo, -1).abs().amax(dim=1).ne(0)
            keep = has_entry & nonzero
            yield first + lo, x, has_entry, keep


def row_stats(chunks: Iterable[tuple[int, torch.Tensor]], trained: Callable[[int, int], torch.Tensor],
              device: torch.device, covariance: bool,
              draws: tuple[int, torch.Generator] | None = None) -> RowStats:
    """Mean (and covariance) of the trained rows of a tensor read in row chunks, in float32.

    ``chunks`` yields ``(first_row, rows)``; ``trained(first, count)`` gives the boolean mask of rows that have
    a tokenizer entry. Rows that are all zero are excluded (and reported in ``zero_rows`` when they have an
    entry). Work goes block by block (:func:`trained_blocks`): memory is one float32 block, never a float32 or
    float64 copy of the tensor. A tensor that fits in one block gets exactly ``rows[mask].float().mean(0)``;
    over several blocks the float32 block sums are accumulated in float64. The covariance sums float32 GEMMs of
    the blocks centred on the first block's mean (no cancellation when the mean is large) in float64.

    ``draws=(n, generator)`` also accumulates ``hewitt``'s sum without its second pass over the rows: per block of
    trained rows ``z ~ N(0, I)`` of shape ``(n, rows)`` from ``generator`` (the same draws, in the same order, as
    :func:`_hewitt_from_rows`), ``sum z (x - s)`` with ``s`` the first block's mean, and ``sum z``; at the end
    ``sum_i z_i (x_i - mean) = sum z (x - s) - (sum z) (mean - s)`` (exact in real arithmetic; float32 GEMMs per
    block, float64 across blocks, as there).
    """
    total: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    count, zero_rows = 0, []
    single: torch.Tensor | None = None
    zx: torch.Tensor | None = None  # sum z (x - shift), for draws
    zsum: torch.Tensor | None = None  # sum z
    for blocks, (first, x, has_entry, keep) in enumerate(trained_blocks(chunks, trained, device), start=1):
        zero_rows += (torch.nonzero(has_entry & ~keep).flatten() + first).tolist()
        sel = x if bool(keep.all()) else x[keep]
        single = sel if blocks == 1 else None
        s = sel.sum(dim=0).double()  # float32 within a block, float64 across blocks
        total = s if total is None else total + s
        if (covariance or draws is not None) and sel.shape[0]:
            f = sel.reshape(sel.shape[0], -1)
            if shift is None:
                shift = f.mean(dim=0)
            c = f - shift
            if covariance:
                g = (c.T @ c).double()
                gram = g if gram is None else gram + g
            if draws is not None:
                z = torch.randn(draws[0], sel.shape[0], device=device, dtype=torch.float32, generator=draws[1])
                zc, zs = (z @ c).double(), z.double().sum(dim=1)
                zx, zsum = (zc, zs) if zx is None or zsum is None else (zx + zc, zsum + zs)
        count += sel.shape[0]
    if total is None or count == 0:
        raise ValueError("no trained rows")
    mean = single.mean(dim=0) if single is not None else (total / count).float()
    cov = None
    if covariance and gram is not None and shift is not None:
        mu = (total / count).reshape(-1, 1) - shift.double().reshape(-1, 1)
        cov = gram / count - mu @ mu.T
    hewitt = None
    if zx is not None and zsum is not None and shift is not None:
        hewitt = zx - zsum.reshape(-1, 1) * (mean.double().reshape(1, -1) - shift.double().reshape(1, -1))
    return RowStats(mean=mean, covariance=cov, count=count, zero_rows=zero_rows, hewitt_draws=hewitt)


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
