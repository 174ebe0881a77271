"""Expand blocks: insert new decoder blocks that start as identities (LLaMA Pro) or with GPT-2's scaled init.

``{"checkpoint", "output", "num_blocks": k, "positions": "interleave" | [i, ...], "init": "zero" |
"scaled_normal", "seed", "device", "overwrite", "verify"}``.

**Where.** ``"interleave"`` (the default) puts new block ``j`` (``j = 0 .. k-1``) after base block
``floor((j + 1) · L / k) - 1``: one after every ``L / k`` blocks when ``k`` divides ``L``, exactly as LLaMA Pro's
``block_expansion.py`` (Wu et al. 2024, "LLaMA Pro: Progressive LLaMA with Block Expansion"); otherwise the groups
differ in size by at most one, and the last new block always follows the last base block. A list puts one new
block after each named base block (base numbering, ``0 .. L-1``, no repeats, any order).

**What.** Each new block is a copy of the base block before it (every tensor byte-copied from the checkpoint),
except the projections that write into the residual stream (:mod:`adapter_surgery.model.layers`:
``self_attn.o_proj``, ``mlp.down_proj``, GPT-2 ``attn.c_proj``/``mlp.c_proj``, NeoX ``attention.dense``/
``mlp.dense_4h_to_h``, ...): their biases are 0 and their weights

- ``"zero"``: 0. The block adds nothing to the stream: ``h + 0 = h`` exactly, so the output's logits are bitwise
  those of the base (LLaMA Pro's zero-initialized output linear layers);
- ``"scaled_normal"``: N(0, σ²) with σ = ``initializer_range`` / sqrt(2 · num_layers_after) (GPT-2's scaled
  residual init, Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" §2.3: "we scale the
  weights of residual layers at initialization by a factor of 1/√N where N is the number of residual layers", two
  per block; the same rule as ``transformers``' ``GPT2PreTrainedModel._init_weights`` for ``c_proj``), drawn in
  float32 from a generator seeded by ``seed`` and the tensor's name (the same seed and device give byte-identical
  output, in any order of writing), cast to the tensor's dtype.

**Output.** Layer keys are renumbered; the config's layer count (``num_hidden_layers``, GPT-2's ``n_layer``, the
text config's for multimodal models) and every per-layer entry (``layer_types``, ...) follow, written explicitly;
index lists (``mlp_only_layers``) are remapped. Renamed tensors are byte-copied by the writer (never decoded),
new tensors go to the shard of the block they copy, shards whose keys do not change are hard-linked. Before
anything is written, the model the new config builds (meta device) must have, layer by layer, exactly the
parameters of the block each layer comes from, so the output loads in ``transformers`` with no missing or
unexpected keys (an architecture whose layers depend on their index, e.g. MoE every k-th layer, is refused).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, Field, StrictBool, StrictInt

from adapter_surgery import errors, resources
from adapter_surgery.config_check import MAX_LAYERS
from adapter_surgery.devices import DeviceName, pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.io import Changes, Checkpoint, CopiedTensor, describe_files
from adapter_surgery.io.header import DTYPES
from adapter_surgery.io.writer import tensor_bytes, write_checkpoint
from adapter_surgery.model.layers import (
    Layers,
    find_layer_list,
    layer_facts,
    meta_model_for,
    post_norm_writers,
    renumbered_config,
)
from adapter_surgery.model.roles import build_meta_model, quiet_transformers
from adapter_surgery.ops.common import ChangedTensor, FileInfo, PathFields, RunContext, Seed, StrictModel
from adapter_surgery.ops.runner import begin
from adapter_surgery.report import PreservationReport, StepFacts

#: New blocks per request at most (and never more than the base has layers).
MAX_NEW_BLOCKS = 1024
#: Floating dtypes a residual writer may be stored in (others, e.g. fp8 or quantized, are refused).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: Bytes of zeros written per call.
ZERO_CHUNK = 8 << 20
#: Disk headroom kept free besides the output's estimate.
DISK_MARGIN = 64 << 20

LayerIndex = Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS - 1)]


class ExpandBlocksOptions(StrictModel):
    """How many blocks, where, and how they start (everything but the paths)."""

    num_blocks: StrictInt | None = Field(
        None, ge=1, le=MAX_NEW_BLOCKS,
        description="k, the new blocks (1 .. the base's layer count, at most 1024). Required with \"interleave\"; "
                    "with a list of positions it may be left out (else it must equal the list's length).")
    positions: Literal["interleave"] | list[LayerIndex] = Field(
        "interleave", max_length=MAX_NEW_BLOCKS,
        description="\"interleave\": new block j after base block floor((j+1)·L/k)-1 (LLaMA Pro); or the base "
                    "blocks (0 .. L-1, base numbering, no repeats) after which one new block each goes.")
    init: Literal["zero", "scaled_normal"] = Field(
        "zero", description="The residual-writing projections of each new block: \"zero\" (the block is an "
                            "identity: logits bitwise equal to the base) or \"scaled_normal\" (N(0, "
                            "(initializer_range / sqrt(2·num_layers_after))^2), GPT-2). Their biases are 0.")
    seed: Seed = Field(0, description="Seeds scaled_normal; the same seed gives byte-identical output.")
    device: DeviceName = Field("auto", description="Where scaled_normal values are drawn: auto, cpu, cuda.")
    verify: StrictBool = Field(False, description="Add the preservation report (base vs output) to the result.")


class ExpandBlocksSpec(PathFields, ExpandBlocksOptions):
    """The full ``POST /expand-blocks`` request."""


class ExpandBlocksResult(BaseModel):
    output: str
    new_layers: list[int] = Field(description="Indices of the new blocks in the output's numbering (e.g. for "
                                              "attach-lora's layers_to_transform).")
    copied_from: list[int] = Field(description="For each new block, the base block (base numbering) it copies.")
    num_layers_before: int
    num_layers_after: int
    layer_prefix: str = Field(description="The checkpoint key prefix of the layers (model.layers, transformer.h).")
    residual_writers: list[str] = Field(description="Module paths within a block whose output feeds the residual "
                                                    "stream: initialized by init, biases 0.")
    init: str
    init_std: float = Field(description="The std of the residual writers' weights: 0 for zero init.")
    changed_tensors: list[ChangedTensor] = Field(description="The new blocks' tensors (renamed tensors of moved "
                                                             "blocks are not listed; their bytes are unchanged).")
    renamed_tensors: int = Field(description="Tensors of base blocks that moved to a new index (bytes copied).")
    files: list[FileInfo]
    warnings: list[str]
    seconds: float
    report: PreservationReport | None = Field(None, description="With verify: true, the preservation report.")


# -- planning ------------------------------------------------------------------------------------------------
def new_block_positions(spec: ExpandBlocksOptions, count: int) -> list[int]:
    """The base block after which each new block goes, in order (see the module docstring for interleave).

    Raises:
        InvalidSpec: ``num_blocks`` missing, above the layer count or the 1024-layer ceiling, or not the list's
            length; a position past the last block (field ``positions.<i>``) or repeated.
    """
    if spec.positions == "interleave":
        if spec.num_blocks is None:
            raise InvalidSpec("\"interleave\" needs num_blocks, the number of new blocks", field="num_blocks",
                              fix=f"Send num_blocks between 1 and {count} (the base's layer count).")
        k = spec.num_blocks
        after = [(j + 1) * count // k - 1 for j in range(k)]
    else:
        k = len(spec.positions)
        if k == 0:
            raise InvalidSpec("positions is an empty list: no block to insert", field="positions",
                              fix='Name at least one base block, or send "interleave" with num_blocks.')
        if spec.num_blocks is not None and spec.num_blocks != k:
            raise InvalidSpec(f"num_blocks is {spec.num_blocks} but positions names {k} blocks", field="num_blocks",
                              fix="Leave num_blocks out with a list of positions, or make it the list's length.")
        seen: dict[int, int] = {}
        for i, p in enumerate(spec.positions):
            if p >= count:
                raise InvalidSpec(f"positions.{i} is {p} but the base has {count} blocks (0 .. {count - 1})",
                                  field=f"positions.{i}",
                                  fix=f"Name base blocks 0 .. {count - 1}: a new block goes after each one named.")
            if p in seen:
                raise InvalidSpec(f"positions.{i} repeats block {p} (positions.{seen[p]})", field=f"positions.{i}",
                                  fix="Name each base block at most once.")
            seen[p] = i
        after = sorted(spec.positions)
    if k > count:
        raise InvalidSpec(f"num_blocks {k} is more than the base's {count} blocks", field="num_blocks",
                          fix=f"Insert at most {count} blocks per request (one after each base block); run the "
                              "operation again on its output for more.")
    if count + k > MAX_LAYERS:
        raise InvalidSpec(f"{count} + {k} blocks would exceed {MAX_LAYERS} layers", field="num_blocks",
                          fix=f"Insert at most {MAX_LAYERS - count} blocks.")
    return after


def layer_sequence(count: int, after: list[int]) -> list[tuple[int, bool]]:
    """The output's layers in order: ``(base block it comes from, is new)``."""
    extra: dict[int, int] = {}
    for p in after:
        extra[p] = extra.get(p, 0) + 1
    seq: list[tuple[int, bool]] = []
    for i in range(count):
        seq.append((i, False))
        seq += [(i, True)] * extra.get(i, 0)
    return seq


# -- the tensors of a new block ------------------------------------------------------------------------------
@dataclass
class InitTensor:
    """A tensor the writer draws when it writes it: zeros, or N(0, std²) in float32 cast to ``dtype``, from a
    generator seeded with ``seed`` on ``device``. Nothing is held before or after (memory: this one tensor)."""

    dtype: str
    shape: tuple[int, ...]
    std: float
    seed: int
    device: torch.device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].bits // 8

    def write(self, fd: int) -> None:
        if self.std == 0.0:
            zeros = bytes(min(ZERO_CHUNK, self.nbytes))
            left = self.nbytes
            while left:
                left -= _write(fd, memoryview(zeros)[: min(left, len(zeros))])
            return
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        values = torch.empty(self.shape, dtype=torch.float32, device=self.device).normal_(0.0, self.std,
                                                                                         generator=gen)
        _write(fd, tensor_bytes(values.to(DTYPES[self.dtype].torch_dtype)))


def _write(fd: int, data: memoryview) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``: independent of the order tensors are written in."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass
class _Plan:
    changes: Changes
    sequence: list[tuple[int, bool]]
    new_layers: list[int]
    copied_from: list[int]
    changed: list[ChangedTensor]
    renamed: int
    std: float


def plan_expansion(spec: ExpandBlocksOptions, ckpt: Checkpoint, layers: Layers, device: torch.device) -> _Plan:
    """What the output holds: renamed base tensors, and the new blocks' tensors (see the module docstring).

    Raises:
        InvalidSpec: bad positions or num_blocks; a residual writer stored in a non-float dtype.
    """
    after = new_block_positions(spec, layers.count)
    seq = layer_sequence(layers.count, after)
    std = 0.0 if spec.init == "zero" else layers.initializer_range / math.sqrt(2.0 * len(seq))
    out_of_base = {src: j for j, (src, new) in enumerate(seq) if not new}
    by_layer: dict[int, list[str]] = {}
    changes = Changes()
    renamed = 0
    for shard, header in ckpt.shards.items():  # in the checkpoint's own order
        for name in header.order:
            if ckpt.weight_map.get(name) != shard:
                continue
            split = layers.split_key(name)
            if split is None or split[0] >= layers.count:
                continue
            by_layer.setdefault(split[0], []).append(name)
            target = layers.key(out_of_base[split[0]], split[1])
            if target != name:
                changes.remove.add(name)
                changes.add[target] = (CopiedTensor(ckpt.info(name), ckpt.path_of(name)), name)
                renamed += 1
    new_layers, copied_from, changed = [], [], []
    for j, (src, new) in enumerate(seq):
        if not new:
            continue
        new_layers.append(j)
        copied_from.append(src)
        for name in by_layer.get(src, []):
            suffix = layers.split_key(name)[1]  # type: ignore[index]
            info = ckpt.info(name)
            target = layers.key(j, suffix)
            source: CopiedTensor | InitTensor
            if layers.residual_module(suffix) is None:
                source = CopiedTensor(info, ckpt.path_of(name))
            else:
                if info.dtype not in FLOAT_DTYPES:
                    raise InvalidSpec(f"{name}, a residual-writing projection, is stored as {info.dtype}: new values "
                                      "cannot be written in it", field="checkpoint",
                                      fix="Expand the unquantized (float) checkpoint.")
                is_bias = suffix.endswith("bias")
                source = InitTensor(info.dtype, info.shape, 0.0 if is_bias else std, tensor_seed(spec.seed, target),
                                    device)
            changes.add[target] = (source, name)
            changed.append(ChangedTensor(name=target, shape_before=None, shape=list(info.shape)))
    return _Plan(changes=changes, sequence=seq, new_layers=new_layers, copied_from=copied_from, changed=changed,
                 renamed=renamed, std=std)


# -- the operation -------------------------------------------------------------------------------------------
def expand_blocks(spec: ExpandBlocksSpec, ctx: RunContext) -> ExpandBlocksResult:
    """Run ``spec``: insert the new blocks, write the output atomically, return where they are.

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems.
        InvalidCheckpoint: no usable config.json, a bare .safetensors file, no layer list transformers knows.
        InvalidSpec: bad num_blocks or positions (``positions.<i>``); an architecture whose new config would build
            other layers than the blocks copied; a residual writer that is not float.
        NotEnoughMemory: scaled_normal's largest tensor does not fit (503); DiskFull (507) when the output cannot.
    """
    run = begin(spec, ctx)
    output = run.output
    device = pick_device(spec.device)
    ckpt = run.open()
    if ckpt.is_file or output.suffix == ".safetensors":
        raise InvalidCheckpoint("expand-blocks needs a model directory (config.json names the layer count it "
                                "changes)", field="checkpoint" if ckpt.is_file else "output",
                                fix="Send the model directory with its config.json, and a directory as output.")
    if ckpt.config is None:
        raise InvalidCheckpoint(f"the checkpoint has no usable config.json ({ckpt.config_problem}); its layer "
                                "count cannot be updated", field="checkpoint",
                                fix="Send the model directory with its config.json.")
    model, problem = build_meta_model(ckpt)
    if model is None:
        raise InvalidCheckpoint(f"transformers cannot build this config ({problem}), so its layers are unknown",
                                field="checkpoint", fix="Send a checkpoint whose config.json transformers knows.")
    layers = layer_facts(ckpt, model)
    if not layers.residual_writers:
        raise InvalidCheckpoint(f"no projection of {layers.layer_class} writes into the residual stream (no "
                                f"Linear of width {layers.hidden_size} in a sub-block)", field="checkpoint",
                                fix="This architecture is not supported by expand-blocks.")
    _check_pre_norm(model, layers)
    warnings = list(ckpt.warnings)
    plan = plan_expansion(spec, ckpt, layers, device)
    ctx.say(f"planned {len(plan.new_layers)} new blocks at {plan.new_layers}, {layers.count} -> "
            f"{len(plan.sequence)} layers")
    sources = [src for src, _ in plan.sequence]
    config = renumbered_config(ckpt.config, layers, sources)
    warnings += _check_structure(config, model, layers, plan)
    for key, why in layers.depth_dependent.items():
        warnings.append(f"config {key} is set: {why}, so the output is not an exact identity of the base")
    _check_resources(spec, ckpt, plan, output)
    with run.writing() as tmp:
        digests = write_checkpoint(ckpt, tmp, plan.changes, ctx.say, cache=ctx.digests)
        for path in ckpt.other_files():
            if path.name != "config.json":
                shutil.copyfile(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        files = describe_files(tmp, known=digests)
        report = None
        if spec.verify:  # before the output is published
            report = run.verify(tmp, device=spec.device, layer_map=hidden_state_map(plan.sequence),
                                changes_output=_CHANGES_OUTPUT.get(spec.init))
    return ExpandBlocksResult(
        output=spec.output, new_layers=plan.new_layers, copied_from=plan.copied_from,
        num_layers_before=layers.count, num_layers_after=len(plan.sequence), layer_prefix=layers.key_prefix,
        residual_writers=list(layers.residual_writers), init=spec.init, init_std=plan.std,
        changed_tensors=plan.changed, renamed_tensors=plan.renamed, files=[FileInfo.of(f) for f in files],
        warnings=warnings, seconds=run.seconds(), report=report)


def _check_pre_norm(model: torch.nn.Module, layers: Layers) -> None:
    """Refuse post-LN layers (a norm over residual + output, :func:`post_norm_writers`): a copied block with zero
    writers is no identity there, and LLaMA Pro's expansion assumes pre-LN blocks (Wu et al. 2024, section 2)."""
    _, blocks = find_layer_list(model, layers.count)
    post = post_norm_writers(blocks[0], layers.residual_writers, layers.hidden_size)
    if post:
        raise InvalidSpec(f"{layers.layer_class} is a post-LN layer: {post[0]} is followed by a norm of the residual "
                          "sum, so a new block with zero residual writers is no identity (it normalizes the stream "
                          "again) and the output would not equal the base's", field="checkpoint",
                          fix="expand-blocks inserts blocks into pre-LN decoders (Llama, Qwen, Mistral, GPT-2, "
                              "GPT-NeoX...); for a post-LN encoder (BERT, RoBERTa, DeBERTa) train without new blocks.")


_CHANGES_OUTPUT = {"scaled_normal": "scaled_normal blocks change the output by design"}


def step_facts(options: ExpandBlocksOptions, result: dict[str, Any]) -> StepFacts:
    """What a surgery step tells the report: its output's hidden states against its input's, scaled_normal's
    change of the output."""
    new = set(result["new_layers"])
    sequence = [(0, j in new) for j in range(result["num_layers_after"])]
    return StepFacts(layer_map=tuple(hidden_state_map(sequence)), changes_output=_CHANGES_OUTPUT.get(options.init))


def hidden_state_map(sequence: list[tuple[int, bool]]) -> list[int | None]:
    """For each hidden state of the output (0: embeddings, j+1: after output layer j), the base hidden state at the
    same depth: after as many base blocks (a new zero block's output is the stream it received). ``transformers``
    returns the last hidden state after the final norm: the output's last maps to the base's last, and a state
    after the last base block but before trailing new blocks has no counterpart (``None``)."""
    count = sum(not new for _, new in sequence)
    out: list[int | None] = [0]
    depth = 0
    for _, new in sequence:
        depth += 0 if new else 1
        out.append(None if depth == count else depth)
    out[-1] = count
    return out


def _check_structure(config: dict, model: torch.nn.Module, layers: Layers, plan: _Plan) -> list[str]:
    """The model the new config builds must hold, layer by layer, the parameters of the block each comes from.

    Raises:
        InvalidSpec: a layer that would be built otherwise (its parameters depend on its index).
    """
    try:
        with quiet_transformers():
            built = meta_model_for(config, model)
            _, new_layers = find_layer_list(built, len(plan.sequence))
    except Exception as exc:  # transformers raises many kinds; the output is still written, with a warning
        return [f"the expanded config could not be checked on the meta device ({type(exc).__name__}: {exc})"]
    for j, (layer, (src, _)) in enumerate(zip(new_layers, plan.sequence, strict=True)):
        got = {n: tuple(p.shape) for n, p in layer.named_parameters()}
        if got != layers.params[src]:
            diff = sorted(set(got) ^ set(layers.params[src])) or [n for n in got if got[n] != layers.params[src][n]]
            raise InvalidSpec(
                f"{layers.layer_class} builds output layer {j} differently from base block {src}, which it would "
                f"hold (e.g. {diff[0]}): this architecture's layers depend on their index (an MoE every k-th "
                "layer, dense first layers)", field="positions",
                fix="Choose positions after which the layer structure does not change, or expand another model.")
    return []


def _check_resources(spec: ExpandBlocksOptions, ckpt: Checkpoint, plan: _Plan, output: Path) -> None:
    """Refuse before writing when scaled_normal's largest tensor (float32 + cast) cannot fit in memory (503) or
    the rewritten shards and new tensors cannot fit on the output's filesystem (507)."""
    new = [src for src, _ in plan.changes.add.values() if isinstance(src, InitTensor)]
    if spec.init == "scaled_normal" and new:
        largest = max(new, key=lambda t: t.nbytes)
        numel = math.prod(largest.shape)
        resources.require(4 * numel + largest.nbytes, field="init",
                          what=f"drawing a {list(largest.shape)} residual projection in float32",
                          fix='Use "init": "zero", or give the service more memory.')
    rewritten = plan.changes.changed_shards(ckpt)
    needed = sum(ckpt.shards[s].file_size for s in rewritten)
    needed += sum(plan.changes.add[c.name][0].nbytes for c in plan.changed)  # the new blocks
    existing = next(p for p in [output.parent, *output.parent.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if needed + DISK_MARGIN > free:
        full = getattr(errors, "DiskFull", InvalidSpec)  # 507 where the service defines it
        raise full(f"the output needs about {resources.size(needed)} (rewritten shards and new blocks) plus a "
                   f"margin of {resources.size(DISK_MARGIN)} kept free, but its filesystem has {resources.size(free)} "
                   "free", field="output",
                   fix="Free space where the output goes, or insert fewer blocks.")
