"""The report's options and models (what ``POST /verify`` and ``"verify": true`` return)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt

from adapter_surgery.spec import DeviceName, StrictModel

WeightInitName = Literal["kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "normal",
                         "zeros", "scaled_normal"]


class VerifyOptions(StrictModel):
    """How to probe (everything but the paths)."""

    num_probes: StrictInt = Field(4, ge=1, le=64, description="Random probe sequences drawn from the old vocabulary.")
    probe_length: StrictInt = Field(16, ge=2, le=1024, description="Tokens per probe (capped at the model's maximum "
                                                             "positions).")
    seed: StrictInt = Field(0, ge=0, le=2**63 - 1,
                      description="Seeds the probe draw; the same seed gives the same probes.")
    text: str | None = Field(None, max_length=20_000, description="An extra probe: this text, tokenized by the "
                                                                  "base tokenizer.")
    head_init: WeightInitName | None = Field(None, description="The init of a new head's weights, to compare their "
                                                               "std with its formula; without it only the std is "
                                                               "reported.")
    memory_limit_bytes: StrictInt | None = Field(None, ge=0, description="Skip the report when the estimate exceeds "
                                                                         "this (default: the memory available).")
    device: DeviceName = Field("auto", description="Where the models run: auto (GPU when present), cpu, cuda.")



class ProbeSummary(BaseModel):
    sequences: int = Field(description="Probe sequences run (random ones plus the text, if any).")
    length: int = Field(description="Tokens per random probe.")
    seed: int
    text_tokens: int | None = Field(description="Tokens of the text probe; None without text.")
    old_vocab_size: int = Field(description="Ids below this (special tokens excluded) were drawn.")


class AddedTokensCheck(BaseModel):
    added_tokens: int = Field(description="n: rows the patch created or re-initialized that have a token: new ids, "
                                          "first rows of ids the base's tokenizer had without a row, re-initialized "
                                          "all-zero rows (without tokenizers: output rows beyond the base's).")
    reinitialized_ids: list[int] = Field(default_factory=list, description="Old ids whose all-zero output row was "
                                         "re-initialized (counted in n, left out of max |Δ logits|).")
    existing_first_rows_ids: list[int] = Field(default_factory=list, description="Ids the base's tokenizer had "
                                               "without a row (a tokenizer longer than the embedding) that got "
                                               "their first rows (counted in n).")
    old_vocab_size: int = Field(description="V: the old vocabulary (ids below it, those with a tokenizer entry).")
    kl_max: float = Field(description="Largest KL(p_base || p_patched) over probe positions (nats), with every added "
                                      "token; for information (no bound holds for rows that are not the mean).")
    kl_mean: float
    mean_initialized_ids: list[int] = Field(
        description="Added ids whose output row (and bias) is the mean of the base's trained output rows: the rows "
                    "Hewitt's bound is a theorem for, and the only ones it is checked over.")
    mean_over_rows: int | None = Field(description="V of the bound: how many base rows that mean is taken over.")
    bound_kl_max: float | None = Field(description="Largest KL with only the mean-initialized tokens added; None "
                                                   "without such rows.")
    bound: float | None = Field(description="log(1 + m / V), Hewitt (2021), m = len(mean_initialized_ids); None "
                                            "without mean-initialized rows.")
    passed: bool | None = Field(description="bound_kl_max <= bound; None when no added row is mean-initialized "
                                            "(nothing to check).")


class TensorStd(BaseModel):
    name: str
    shape: list[int]
    init: str | None = Field(description="The init its values should follow; None when unknown.")
    std: float
    mean: float
    max_abs: float
    expected_std: float | None
    tolerance: float | None = Field(description="Allowed |std / expected - 1|.")
    passed: bool | None


class HeadCheck(BaseModel):
    tensors: list[TensorStd] = Field(description="Tensors of the patched model that the base checkpoint lacks.")
    logits_std: float | None = Field(description="Std of the patched model's logits on the probes.")
    logits_shape: list[int] | None = Field(description="Per probe: (num_labels,) or (length, num_labels).")
    passed: bool | None


class LayerRMS(BaseModel):
    layer: int = Field(description="Index into hidden_states: 0 is the embedding output.")
    base_layer: int | None = Field(None, description="The base's hidden state compared, when the patched model has "
                                                     "other layers (expand-blocks: the same number of base blocks "
                                                     "passed); None when it is the same index.")
    base: float
    patched: float
    ratio: float
    max_abs_delta: float


class PreservationReport(BaseModel):
    status: Literal["ok", "skipped"]
    reason: str | None = Field(None, description="Why the report was skipped.")
    passed: bool | None = Field(None, description="Every check that applies passed; None when skipped.")
    device: str | None = None
    memory_needed_bytes: int | None = None
    memory_available_bytes: int | None = None
    probes: ProbeSummary | None = None
    max_abs_logit_delta: float | None = Field(None, description="Over the old vocabulary; None when one model has "
                                                                "no LM head.")
    logits_preserved: bool | None = None
    added_tokens: AddedTokensCheck | None = None
    head: HeadCheck | None = None
    hidden_states: list[LayerRMS] = Field(default_factory=list)
    hidden_states_passed: bool | None = None
    warnings: list[str] = Field(default_factory=list)
    seconds: float = 0.0




@dataclass(frozen=True)
class StepFacts:
    """What one step of a surgery plan tells the report about its output (its own ``verify`` knows the same).

    ``head_init``: the init of the head it created (checked against its formula). ``layer_map``: for each hidden
    state of its output, the hidden state of its input at the same depth (``None``: none), when it changes the
    layer count. ``changes_output``: why its output's logits differ from its input's by design (no pass/fail on
    them).
    """

    head_init: str | None = None
    layer_map: tuple[int | None, ...] | None = None
    changes_output: str | None = None


class Skip(Exception):
    """Raised inside the report: it is skipped with this reason (and ``extra`` report fields)."""

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.extra = extra
