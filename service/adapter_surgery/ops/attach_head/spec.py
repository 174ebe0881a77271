"""attach-head's request and result models, and the checks of a request that need no checkpoint (labels,
problem type)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StringConstraints

from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.common import ChangedTensor, FileInfo, PathFields, Seed, StrictModel
from adapter_surgery.report import PreservationReport
from adapter_surgery.spec import DeviceName, TokenText

Task = Literal["sequence_classification", "token_classification"]
HeadInit = Literal["kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "normal", "zeros"]
PadPolicy = Literal["auto", "eos", "add"]
ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]

#: Labels per head at most; a label name's length at most.
MAX_LABELS = 1_000_000
Label = Annotated[str, StringConstraints(max_length=1000)]


class AttachHeadOptions(StrictModel):
    """The head to attach and how to initialize it (everything but the paths).

    ``init`` (formulas and sources in :mod:`adapter_surgery.initializers`): ``kaiming_normal`` (default,
    N(0, 2/fan_in), He et al. 2015), ``kaiming_uniform`` (PyTorch's ``nn.Linear`` default, a = √5, std
    1/√(3 fan_in)), ``xavier_uniform`` / ``xavier_normal`` (variance 2/(fan_in + fan_out), Glorot & Bengio 2010),
    ``normal`` (N(0, initializer_range²): what ``transformers`` does), ``zeros`` (every initial logit 0: uniform
    predictions; training still moves the head since its gradient does not depend on its own value).

    ``pad_token`` (decoders need ``pad_token_id`` to pool the last non-pad token, and to batch):
    ``auto``: the tokenizer's pad token, else the config's ``pad_token_id``, else eos with a warning (case B16:
    an input that ends in eos is then pooled one token earlier); ``eos``: eos even when the tokenizer has a pad
    token; ``add``: a dedicated ``pad_token_content`` token, added as extend-vocab adds tokens (new input row = the
    mean of the trained rows, id = the next free id).
    """

    task: Task = Field("sequence_classification", description="Which transformers head class to target.")
    num_labels: StrictInt | None = Field(None, ge=1, le=MAX_LABELS, description="Number of labels (or give id2label); "
                                                                          "at most 1,000,000.")
    id2label: Annotated[dict[int, Label], Field(max_length=MAX_LABELS)] | Annotated[
        list[Label], Field(max_length=MAX_LABELS)] | None = Field(
        None, description="Label names by id 0..n-1 (a list is taken in order); at most 1,000,000.")
    problem_type: ProblemType | None = Field(None, description="Written to the config when given; otherwise "
                                                               "transformers infers it from the labels.")
    init: HeadInit = Field("kaiming_normal", description="Init of the head's weight matrix; biases are zero.")
    pad_token: PadPolicy = Field("auto", description="Where pad_token_id comes from: auto, eos, add.")
    pad_token_content: TokenText = Field("<pad>", description="The token 'add' adds (not whitespace-only, no "
                                                              "control characters).")
    seed: Seed = Field(0, description="Seeds the head; the same seed gives byte-identical output.")
    device: DeviceName = Field("auto", description="Where the arithmetic runs: auto (GPU when present), cpu, cuda.")
    verify: StrictBool = Field(False, description="Add the preservation report (base vs output) to the result.")


class AttachHeadSpec(PathFields, AttachHeadOptions):
    """The full ``POST /attach-head`` request."""


class CreatedTensor(BaseModel):
    name: str
    shape: list[int]
    dtype: str
    init: str = Field(description="The request's init, 'zeros' for biases, 'transformers' for modules the target "
                                  "initializes itself (a pooler).")
    std: float
    expected_std: float | None = Field(description="The init's formula (None for 'transformers' non-Linear "
                                                   "modules).")


class DroppedTensor(BaseModel):
    name: str
    shape: list[int]
    reason: Literal["lm_head", "replaced_head", "unused"] = Field(
        description="lm_head: the language-model head; replaced_head: an old classification head; unused: not a "
                    "tensor of the target class.")


class RenamedTensor(BaseModel):
    source: str
    target: str


class PadToken(BaseModel):
    token: str | None = Field(description="The pad token's text; None without a tokenizer.")
    id: int
    source: Literal["tokenizer", "config", "eos", "added", "existing"]


class AttachHeadResult(BaseModel):
    output: str
    task: Task
    model_class: str = Field(description="The transformers class the output loads as.")
    base_model_class: str | None
    num_labels: int
    id2label: dict[int, str]
    problem_type: ProblemType | None
    pad_token: PadToken | None
    created: list[CreatedTensor]
    dropped: list[DroppedTensor]
    renamed: list[RenamedTensor]
    changed_tensors: list[ChangedTensor]
    vocab_size_before: int
    vocab_size_after: int
    files: list[FileInfo]
    warnings: list[str]
    seconds: float
    report: PreservationReport | None = None


def check_labels(spec: AttachHeadOptions) -> dict[int, str]:
    """``id2label`` from ``num_labels`` / ``id2label``: ids exactly 0..n-1, names unique."""
    given = spec.id2label
    if given is None:
        if spec.num_labels is None:
            raise InvalidSpec("the request gives neither num_labels nor id2label", field="num_labels",
                              fix='Send "num_labels": 2 (labels LABEL_0, LABEL_1) or "id2label": {"0": "neg", ...}.')
        return {i: f"LABEL_{i}" for i in range(spec.num_labels)}
    labels = dict(enumerate(given)) if isinstance(given, list) else dict(sorted(given.items()))
    if not labels:
        raise InvalidSpec("id2label is empty", field="id2label", fix="Name at least one label.")
    if sorted(labels) != list(range(len(labels))):
        raise InvalidSpec(f"id2label ids must be 0..{len(labels) - 1}, got {sorted(labels)}", field="id2label",
                          fix="Number the labels from 0 without gaps.")
    if len(set(labels.values())) != len(labels):
        dup = next(v for v in labels.values() if list(labels.values()).count(v) > 1)
        raise InvalidSpec(f"id2label names label {dup!r} more than once, so label2id cannot invert it",
                          field="id2label", fix="Give every label a distinct name.")
    if spec.num_labels is not None and spec.num_labels != len(labels):
        raise InvalidSpec(f"num_labels is {spec.num_labels} but id2label has {len(labels)} labels",
                          field="num_labels", fix="Drop num_labels or make it match id2label.")
    return labels


def check_problem_type(spec: AttachHeadOptions, n: int) -> ProblemType | None:
    pt = spec.problem_type
    if spec.task == "token_classification" and pt not in (None, "single_label_classification"):
        raise InvalidSpec(f"problem_type {pt!r} is not supported by transformers' token classifiers (they always "
                          "use cross-entropy)", field="problem_type",
                          fix='Drop problem_type or send "single_label_classification".')
    if pt == "single_label_classification" and n == 1:
        raise InvalidSpec("single_label_classification needs at least 2 labels", field="problem_type",
                          fix='Use num_labels 2 for binary classification, or problem_type "regression".')
    return pt
