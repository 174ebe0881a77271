"""The report's checks: derivation, max |Δ logits| and the KL against Hewitt's bound, which added rows are
mean-initialized, the new head's std against its init, and the hidden states' RMS per layer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from adapter_surgery.errors import SurgeryError
from adapter_surgery.initializers import WEIGHT_INITS, expected_std, row_stats
from adapter_surgery.io import Checkpoint
from adapter_surgery.model.roles import resolve_architecture
from adapter_surgery.report.models import AddedTokensCheck, HeadCheck, LayerRMS, PreservationReport, TensorStd
from adapter_surgery.report.run import ModelRun

#: max |Δ logits| allowed by ``logits_preserved``, relative to ``max(1, max |base logit|)``.
LOGIT_TOLERANCE = 1e-4
#: Slack on Hewitt's bound for float arithmetic.
KL_SLACK = 1e-6
#: Patched/base RMS ratio of every layer's hidden states must stay in this range.
HIDDEN_RATIO_MIN, HIDDEN_RATIO_MAX = 0.5, 2.0


def new_token_ids(tok_b, tok_p, old_vocab: int) -> list[int] | None:
    """Ids of the patched tokenizer at or above ``old_vocab`` (the base's rows that have a token): the tokens the
    base could not predict, whether the patched tokenizer added them or the base's already had them without a row
    (a tokenizer longer than the embedding); ``None`` (use the appended rows) without tokenizers."""
    if tok_b is None or tok_p is None:
        return None
    return sorted(i for i in set(tok_p.get_vocab().values()) if i >= old_vocab)


def _head(arch) -> str | None:
    return arch.output_head or (arch.input_embedding if arch.tied else None)


def reinitialized_rows(base: Checkpoint, patched: Checkpoint, tok_b, old: int) -> list[int]:
    """Old ids whose output row is all zero in the base and not in the patched checkpoint (extend-vocab's
    ``reinit_existing``): rows (re-)initialized by the patch, not preserved ones."""
    kb, kp = _head(resolve_architecture(base)), _head(resolve_architecture(patched))
    if kb is None or kp is None:
        return []
    entry = torch.zeros(old, dtype=torch.bool)
    if tok_b is None:
        entry[:] = True
    else:
        entry[torch.tensor([i for i in tok_b.get_vocab().values() if i < old], dtype=torch.long)] = True
    out: list[int] = []
    for first, rows in base.iter_rows(kb):
        if first >= old:
            break
        rows = rows[: old - first]
        zero = (rows.reshape(rows.shape[0], -1) == 0).all(dim=1) & entry[first:first + rows.shape[0]]
        out += (torch.nonzero(zero).flatten() + first).tolist()
    return [i for i in out if bool(patched.read_rows(kp, i, i + 1).any())]


def compare_logits(report: PreservationReport, b: ModelRun, p: ModelRun, old_vocab: int, new_ids: list[int] | None,
                    mean_rows: Callable[[int, list[int]], tuple[list[int], int | None]] | None = None,
                    reinit_rows: Callable[[int], list[int]] | None = None,
                    existing: list[int] | None = None) -> None:
    """max |Δ logits| over the old vocabulary; with new tokens, KL(base || patched), and over the mean-initialized
    ones (``mean_rows(old, added)``: those ids and the rows their mean is over) against Hewitt's bound.

    Every row the patch created or re-initialized counts as added (n): the rows of new ids, the first rows of ids
    the base's tokenizer had without a row, and old rows that were all zero and are not any more
    (``reinit_rows(old)``). Re-initialized rows are left out of the base's distribution and of max |Δ logits|
    (they changed on purpose): with them out, Hewitt's argument holds as for appended rows (their mean is over
    the trained rows, which the base's distribution still holds). ``existing``: the base tokenizer's ids at or
    above ``old_vocab`` (tokens without a base row), listed when they got their first rows.

    The next-token distributions are over tokens: the base's over its old vocabulary (ids below ``old_vocab``),
    the patched model's over the old vocabulary and the new ids. Rows without a token (spare rows of a padded
    vocabulary, ``pad_to_multiple_of`` rows) are left out of both, as serving masks them; without tokenizers every
    row counts and the new ids are the appended rows.
    """
    if b.kind == p.kind == "classifier" and all(
            x is not None and y is not None and x.shape == y.shape for x, y in zip(b.logits, p.logits, strict=True)):
        report.max_abs_logit_delta = max(float((x - y).abs().max())  # type: ignore[operator]
                                         for x, y in zip(b.logits, p.logits, strict=True))
        scale = max(1.0, *(float(x.abs().max()) for x in b.logits))  # type: ignore[union-attr]
        report.logits_preserved = report.max_abs_logit_delta <= LOGIT_TOLERANCE * scale
        return
    if b.kind != "lm" or p.kind != "lm":
        report.warnings.append(f"max |Δ logits| not computed: the base is {_KINDS[b.kind]} and the patched model "
                               f"{_KINDS[p.kind]}, so they share no output; the hidden states are compared instead")
        return
    base_rows = b.logits[0].shape[-1]  # type: ignore[union-attr]
    new_rows = p.logits[0].shape[-1]  # type: ignore[union-attr]
    old = min(old_vocab, base_rows, new_rows)
    if new_rows < base_rows:
        report.warnings.append(f"the patched model has fewer output rows ({new_rows}) than the base ({base_rows})")
    added = list(range(base_rows, new_rows)) if new_ids is None else [i for i in new_ids if old <= i < new_rows]
    reinit: list[int] = []
    if reinit_rows is not None:
        try:
            reinit = reinit_rows(old)
        except Exception as exc:  # the rows could not be read: compare as if none was re-initialized
            report.warnings.append(f"re-initialized rows could not be determined ({type(exc).__name__}: {exc})")
    if reinit:
        report.warnings.append(f"{len(reinit)} existing token(s) with all-zero output rows in the base were "
                               f"re-initialized (ids {reinit[:8]}{'...' if len(reinit) > 8 else ''}): counted as "
                               "added rows, left out of max |Δ logits|")
    reinit_set = set(reinit)  # built once: per id it made the comprehension O(old x reinit)
    kept = torch.tensor([i for i in range(old) if i not in reinit_set], dtype=torch.long) if reinit else None
    added = sorted(reinit) + added
    mean_ids: list[int] = []
    mean_over: int | None = None
    if added and mean_rows is not None:
        try:
            mean_ids, mean_over = mean_rows(old, added)
        except Exception as exc:  # the rows could not be read: report the KL without claiming the bound
            report.warnings.append(f"which added rows are mean-initialized could not be determined "
                                   f"({type(exc).__name__}: {exc}); Hewitt's bound is not checked")
    delta, scale = 0.0, 1.0
    kls: list[torch.Tensor] = []
    bound_kls: list[torch.Tensor] = []

    def olds(logits: torch.Tensor) -> torch.Tensor:
        return logits[..., :old] if kept is None else logits[..., kept]

    def kl_with(lb: torch.Tensor, lp: torch.Tensor, extra: list[int]) -> torch.Tensor:
        logp_b = torch.log_softmax(olds(lb).double(), dim=-1)
        support = torch.cat([olds(lp), lp[..., extra]], dim=-1).double()
        logp_p = torch.log_softmax(support, dim=-1)[..., :logp_b.shape[-1]]
        return (logp_b.exp() * (logp_b - logp_p)).sum(dim=-1).reshape(-1)

    for lb, lp in zip(b.logits, p.logits, strict=True):
        assert lb is not None and lp is not None
        delta = max(delta, float((olds(lb) - olds(lp)).abs().max()))
        scale = max(scale, float(olds(lb).abs().max()))
        if added:
            kls.append(kl_with(lb, lp, added))
            if mean_ids:
                bound_kls.append(kls[-1] if mean_ids == added else kl_with(lb, lp, mean_ids))
    report.max_abs_logit_delta = delta
    report.logits_preserved = delta <= LOGIT_TOLERANCE * scale
    if kls:
        kl = torch.cat(kls)
        bound = bound_kl = passed = None
        if bound_kls and mean_over:
            bound = math.log1p(len(mean_ids) / mean_over)
            bound_kl = float(torch.cat(bound_kls).max())
            passed = bound_kl <= bound + KL_SLACK
        others = len(added) - len(mean_ids)
        if others:
            report.warnings.append(
                f"{others} of the {len(added)} added token(s) have output rows that are not the mean of the old "
                "rows (e.g. subword_mean, copy or random rows): Hewitt's bound does not apply to them, so their KL "
                "is reported without a pass/fail" + ("" if mean_ids else "; no row is checked against the bound"))
        had = set(existing or ())
        first_rows = [i for i in added if i in had]
        report.added_tokens = AddedTokensCheck(added_tokens=len(added), old_vocab_size=old, kl_max=float(kl.max()),
                                               reinitialized_ids=sorted(reinit), existing_first_rows_ids=first_rows,
                                               kl_mean=float(kl.mean()), mean_initialized_ids=mean_ids,
                                               mean_over_rows=mean_over if mean_ids else None, bound_kl_max=bound_kl,
                                               bound=bound, passed=passed)


def mean_initialized(base: Checkpoint, patched: Checkpoint, tok_b, old: int,
                      added: list[int]) -> tuple[list[int], int | None]:
    """The ``added`` ids whose output row (and output bias) is the mean of the base's trained output rows, and how
    many rows that mean is over.

    The mean is extend-vocab's: float32, over the base rows below ``old`` that have a base-tokenizer entry and are
    not all zero (:func:`adapter_surgery.initializers.row_stats`), cast to the patched tensor's dtype; a row
    matches when every value is within one unit in the last place of it (a mean summed in another order, e.g. on
    a GPU, may differ there). A tied head's rows are the input embedding's.
    """

    arch_b, arch_p = resolve_architecture(base), resolve_architecture(patched)

    def head(arch) -> str | None:
        return arch.output_head or (arch.input_embedding if arch.tied else None)

    pairs = [(head(arch_b), head(arch_p)), (arch_b.output_bias, arch_p.output_bias)]
    if pairs[0][0] is None or pairs[0][1] is None or (pairs[1][0] is None) != (pairs[1][1] is None):
        return [], None
    entry = torch.zeros(old, dtype=torch.bool)
    if tok_b is None:
        entry[:] = True
    else:
        ids = [i for i in tok_b.get_vocab().values() if i < old]
        entry[torch.tensor(ids, dtype=torch.long)] = True

    def trained(first: int, count: int) -> torch.Tensor:
        mask = torch.zeros(count, dtype=torch.bool)
        hi = min(first + count, old)
        if hi > first:
            mask[: hi - first] = entry[first:hi]
        return mask

    keep = set(added)
    over: int | None = None
    zero_rows: list[int] | None = None
    for kb, kp in pairs:
        if kb is None or kp is None:
            continue
        try:
            stats = row_stats(base.iter_rows(kb), trained, torch.device("cpu"), covariance=False)
        except ValueError:  # no trained row
            return [], None
        if zero_rows is not None and stats.zero_rows != zero_rows:  # weight and bias averaged over other rows
            return [], None
        zero_rows = stats.zero_rows
        over = stats.count if over is None else over
        dtype = patched.info(kp).torch_dtype or torch.float32
        mean = stats.mean.to(dtype).float()
        tol = torch.finfo(dtype).eps * mean.abs() + torch.finfo(dtype).tiny
        rows = patched.info(kp).shape[0]
        for i in sorted(keep):
            if i >= rows or not bool(((patched.read_rows(kp, i, i + 1)[0].float() - mean).abs() <= tol).all()):
                keep.discard(i)
    return [i for i in added if i in keep], over


def not_derived(base: Checkpoint, patched: Checkpoint, tok_b, tok_p, patched_layers: int | None = None) -> str | None:
    """Why ``patched`` cannot have been made from ``base`` by this service, or ``None``.

    Derived checkpoints keep the model type, hidden size and layer count, every tensor's shape but for a grown
    vocabulary (dimension 0, or the last one of a ``(1, vocab)`` buffer: BART's ``final_logits_bias``), the base
    tokenizer's ids, and at least the base's vocabulary rows. Anything else
    (e.g. SmolLM2 against MiniLM) cannot be compared probe by probe. ``patched_layers``: the layer count the
    patched checkpoint must have instead of the base's (expand-blocks).
    """
    cb, cp = base.config or {}, patched.config or {}

    def text(cfg: dict[str, Any]) -> dict[str, Any]:
        sub = next((cfg[k] for k in ("text_config", "llm_config", "language_config") if isinstance(cfg.get(k), dict)),
                   None)
        return sub if sub is not None else cfg

    def first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
        return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

    for what, keys in (("model_type", ("model_type",)), ("hidden size", ("hidden_size", "n_embd", "d_model")),
                       ("layer count", ("num_hidden_layers", "n_layer", "num_layers"))):
        vb, vp = first(text(cb), keys), first(text(cp), keys)
        if vb is None:
            vb, vp = first(cb, keys), first(cp, keys)
        if what == "layer count" and patched_layers is not None and vp is not None:
            if vp != patched_layers:
                return f"the patched checkpoint has {what} {vp!r}, not the {patched_layers} expected"
            continue
        if vb is not None and vp is not None and vb != vp:
            return f"the base has {what} {vb!r}, the patched checkpoint {vp!r}"
    shapes_b = base.shapes()
    for key, shape in patched.shapes().items():
        src = next((c for c in (key, key.split(".", 1)[-1]) if c in shapes_b), None)
        if src is None:
            continue
        sb = shapes_b[src]
        if shape != sb and not _grown(shape, sb):
            return f"tensor {key!r} has shape {list(shape)} in the patched checkpoint but {list(sb)} in the base"
    if tok_b is not None and tok_p is not None:
        vb, vp = tok_b.get_vocab(), tok_p.get_vocab()
        moved = [(t, i, vp.get(t)) for t, i in vb.items() if vp.get(t) != i]
        if len(moved) > max(1, len(vb) // 100):
            t, i, j = moved[0]
            return (f"{len(moved)} of the base tokenizer's {len(vb)} tokens have another id (or none) in the "
                    f"patched tokenizer, e.g. {t!r}: {i} in the base, {j} in the patched one")
    try:
        rows_b, rows_p = resolve_architecture(base).vocab_rows, resolve_architecture(patched).vocab_rows
    except SurgeryError:
        return None
    if rows_p < min(rows_b, len(tok_b) if tok_b is not None else rows_b):
        return f"the patched input embedding has {rows_p} rows, fewer than the base's {rows_b}"
    return None


def _grown(shape: tuple[int, ...], base: tuple[int, ...]) -> bool:
    """``shape`` is ``base`` with a grown vocabulary: more rows (dimension 0), or a longer last dimension after
    dimensions of 1 (``(1, vocab)``, as extend-vocab pads it)."""
    if len(shape) != len(base):
        return False
    rows = shape[1:] == base[1:] and shape[0] >= base[0]
    last = len(base) >= 2 and shape[:-1] == base[:-1] and set(base[:-1]) == {1} and shape[-1] >= base[-1]
    return rows or last


_KINDS = {"lm": "a language model", "classifier": "a classifier", "backbone": "a bare backbone (no head)"}


def strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name


def head_check(p: ModelRun, head_init: str | None) -> HeadCheck | None:
    """Std of every tensor of the patched model absent from the base checkpoint, against its init's formula."""
    new = [n for n in p.state_names if n in p.params]
    if p.kind != "classifier" or not new:
        return None
    tensors = []
    for name in new:
        t = p.params[name]
        in_base_model = bool(p.prefix) and name.startswith(p.prefix + ".")
        init: str | None
        if name.endswith("bias") or t.dim() < 2:
            init = "zeros" if name.endswith("bias") else None
        else:
            init = "normal" if in_base_model else head_init  # transformers' _init_weights vs the request
        std = float(t.std()) if t.numel() > 1 else 0.0
        expected = tolerance = None
        passed: bool | None = None
        if init == "zeros":
            expected, tolerance, passed = 0.0, 0.0, bool(t.abs().max() == 0)
        elif init in WEIGHT_INITS and t.dim() >= 2:
            fan_out, fan_in = t.shape[0], t[0].numel()
            expected = expected_std(init, fan_in, fan_out, p.initializer_range, p.num_layers)
            tolerance = max(0.02, 3.0 / math.sqrt(2.0 * t.numel()))
            passed = abs(std / expected - 1.0) <= tolerance if expected > 0 else std == 0.0
        tensors.append(TensorStd(name=name, shape=list(t.shape), init=init, std=std, mean=float(t.mean()),
                                 max_abs=float(t.abs().max()), expected_std=expected, tolerance=tolerance,
                                 passed=passed))
    logits = [lg for lg in p.logits if lg is not None]
    logits_std = float(torch.cat([lg.reshape(-1) for lg in logits]).std()) if logits else None
    verdicts = [t.passed for t in tensors if t.passed is not None]
    return HeadCheck(tensors=tensors, logits_std=logits_std, logits_shape=list(logits[0].shape) if logits else None,
                     passed=all(verdicts) if verdicts else None)


def _rms(xs: list[torch.Tensor]) -> float:
    flat = torch.cat([x.reshape(-1) for x in xs]).double()
    return float(flat.pow(2).mean().sqrt())


def compare_hidden(report: PreservationReport, b: ModelRun, p: ModelRun,
                   layer_map: list[int | None] | None = None) -> None:
    nb, np_ = len(b.hidden[0]), len(p.hidden[0])
    if not nb or not np_:
        report.warnings.append("hidden states not compared: a model returned none")
        return
    if layer_map is not None and len(layer_map) == np_ and all(j is None or j < nb for j in layer_map):
        _compare_mapped(report, b, p, layer_map)
        return
    if nb != np_:
        report.warnings.append(f"the models have different depths ({nb - 1} vs {np_ - 1} layers); the first "
                               f"{min(nb, np_)} hidden states are compared")
    layers = []
    for i in range(min(nb, np_)):
        hb = [h[i] for h in b.hidden]
        hp = [h[i] for h in p.hidden]
        rb, rp = _rms(hb), _rms(hp)
        delta = max(float((x - y).abs().max()) for x, y in zip(hb, hp, strict=True))
        ratio = rp / rb if rb > 0 else (1.0 if rp == 0 else math.inf)
        layers.append(LayerRMS(layer=i, base=rb, patched=rp, ratio=ratio, max_abs_delta=delta))
    report.hidden_states = layers
    report.hidden_states_passed = all(HIDDEN_RATIO_MIN <= layer.ratio <= HIDDEN_RATIO_MAX for layer in layers)


def _compare_mapped(report: PreservationReport, b: ModelRun, p: ModelRun, layer_map: list[int | None]) -> None:
    """Every patched hidden state against the base's at index ``layer_map[i]`` (inserted layers; ``None``: no
    counterpart, not compared)."""
    layers = []
    for i, j in enumerate(layer_map):
        if j is None:
            continue
        hb = [h[j] for h in b.hidden]
        hp = [h[i] for h in p.hidden]
        rb, rp = _rms(hb), _rms(hp)
        delta = max(float((x - y).abs().max()) for x, y in zip(hb, hp, strict=True))
        ratio = rp / rb if rb > 0 else (1.0 if rp == 0 else math.inf)
        layers.append(LayerRMS(layer=i, base_layer=j, base=rb, patched=rp, ratio=ratio, max_abs_delta=delta))
    report.hidden_states = layers
    report.hidden_states_passed = all(HIDDEN_RATIO_MIN <= layer.ratio <= HIDDEN_RATIO_MAX for layer in layers)
