"""attach-lora's request, options and result models, and the constants that bound them."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field, StrictBool, StrictInt, StringConstraints, field_validator

from adapter_surgery import patterns
from adapter_surgery.devices import DeviceName
from adapter_surgery.ops.common import FileInfo, PathFields, Seed, StrictModel
from adapter_surgery.serving import VLLM_DEFAULT_MAX_LORA_RANK, VLLM_MAX_LORA_RANKS, Runtime

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RESIDUAL_DIR = "base"
#: Inits that read nothing but the headers.
DATA_FREE_INITS = ("true", "gaussian", "orthogonal")
#: Inits that need data, gradients or quantization the service does not have, with the reason.
REFUSED_INITS = {
    "eva": "EVA derives A from the SVD of each layer's input activations, so it needs forward passes over your "
           "training data (peft's initialize_lora_eva_weights with a dataloader); the service has no data.",
    "corda": "CorDA builds A and B from input covariance collected by running calibration data through the model "
             "(peft's preprocess_corda); the service has no data.",
    "loftq": "LoftQ alternates quantizing the base weights with an SVD of the quantization error, so it needs a "
             "quantization backend and produces a quantized base, which the service does not write.",
    "lora_ga": "LoRA-GA initializes A and B from gradients estimated on training batches (peft's "
               "preprocess_loraga), which need data and a backward pass.",
}
ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PISSA = re.compile(r"^pissa(_niter_(\d+))?$")
TargetModules = list[str] | str


#: Largest LoRA rank, pissa_niter_N, list lengths, token ids accepted by the request model.
MAX_RANK = 1 << 16
MAX_PISSA_NITER = 64
MAX_NAMES = 1024
MAX_LAYERS = 1024
MAX_TOKEN_IDS = 1 << 20
Name = Annotated[str, StringConstraints(max_length=1000)]
Names = Annotated[list[Name], Field(max_length=MAX_NAMES)] | Name
LayerIndex = Annotated[StrictInt, Field(ge=0, lt=MAX_LAYERS)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, lt=1 << 26)]], Field(max_length=MAX_TOKEN_IDS)]


class AttachLoraOptions(StrictModel):
    """The adapter (everything but the paths). Field names and defaults are ``peft.LoraConfig``'s."""

    r: StrictInt = Field(8, le=MAX_RANK, description="LoRA rank: A is (r, in_features), B is (out_features, r). 1 <= "
                                                     "r <= min(in, out) of every target (and <= 65536).")
    lora_alpha: float = Field(8, gt=0, allow_inf_nan=False,
                              description="Scaling numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora); > 0.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    target_modules: Names | None = Field(
        None, description="Module names or suffixes (e.g. ['q_proj', 'v_proj']), a regex string matched against "
                          "full names, or 'all-linear' (every Linear/Conv1D but the output head). None: peft's "
                          "default for the model type.")
    exclude_modules: Names | None = Field(None, description="Names/suffixes or a regex of modules to skip.")
    layers_to_transform: Annotated[list[LayerIndex], Field(max_length=MAX_LAYERS)] | LayerIndex | None = Field(
        None, description="Only these layer indices (0..1023).")
    layers_pattern: Names | None = Field(None, description="Name of the layer list for layers_to_transform "
                                                           "(e.g. 'layers'); None: any.")
    rank_pattern: dict[Name, Annotated[StrictInt, Field(le=MAX_RANK)]] = Field(
        default_factory=dict, max_length=MAX_NAMES, description="Regex of a module name -> its rank (1..65536).")
    alpha_pattern: dict[Name, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=MAX_NAMES, description="Regex of a module name -> its lora_alpha (> 0).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained (and saved).")
    use_rslora: StrictBool = Field(False, description="Rank-stabilized scaling lora_alpha / sqrt(r) (Kalajdzievski "
                                                     "2023).")
    use_dora: StrictBool = Field(False, description="Weight-decomposed LoRA (Liu et al. 2024): reads the targeted "
                                                   "weights.")
    init_lora_weights: StrictBool | str = Field(
        True, description="true (Kaiming-uniform A, zero B), 'gaussian', 'orthogonal' (even r): headers only. "
                          "'pissa', 'pissa_niter_N' (1 <= N <= 64), 'olora': read the targeted weights and also "
                          "write a residual base into <output>/base.")
    modules_to_save: Annotated[list[Name], Field(max_length=MAX_NAMES)] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. ['embed_tokens', 'lm_head']).")
    trainable_token_indices: TokenIds | dict[Name, TokenIds] | None = Field(
        None, description="Token ids whose embedding rows are trained (e.g. the ids /extend-vocab added); a dict "
                          "maps embedding module names to ids.")
    ensure_weight_tying: StrictBool | None = Field(
        None, description="Keep tied embedding/head copies tied (peft's ensure_weight_tying). None: on when the "
                          "model ties them and modules_to_save names one of them.")
    seed: Seed = Field(0, description="torch.manual_seed before peft initializes; same seed, identical files.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the adapter tensors (lora_A/B, magnitude, trainable token rows).")
    device: DeviceName = Field("auto", description="Where inits that read weights compute: auto (GPU when "
                                                   "present), cpu, cuda.")
    serving: Runtime | None = Field(
        None, description="The runtime the adapter will be served with ('vllm'): an adapter it cannot load (DoRA, "
                          "modules_to_save, biases, trainable_token_indices, a rank above max_lora_rank, per-module "
                          "scalings) is refused with the option that makes it loadable. None: such adapters are "
                          "written, and the result's warnings name the runtimes that could not load them.")
    max_lora_rank: StrictInt | None = Field(
        None, ge=1, le=MAX_RANK, description="The serving runtime's rank limit (vLLM's --max-lora-rank: 1, 8, 16, 32, "
                                             f"64, 128, 256, 320 or 512). None: vLLM's default, "
                                             f"{VLLM_DEFAULT_MAX_LORA_RANK}.")


    _safe_patterns = field_validator("target_modules", "exclude_modules", "layers_pattern", "rank_pattern",
                                     "alpha_pattern")(patterns.checked)

    @field_validator("max_lora_rank")
    @classmethod
    def _a_vllm_rank(cls, value: int | None) -> int | None:
        """vLLM's ``--max-lora-rank`` takes only ``MaxLoRARanks`` (vllm/config/lora.py): another value names a
        server that cannot be started, and the rank check would pass adapters no such server loads."""
        if value is not None and value not in VLLM_MAX_LORA_RANKS:
            up = next((m for m in VLLM_MAX_LORA_RANKS if m >= value), VLLM_MAX_LORA_RANKS[-1])
            raise ValueError(f"vLLM's --max-lora-rank takes {', '.join(map(str, VLLM_MAX_LORA_RANKS))}, not {value}; "
                             f"send the value your server runs with (e.g. {up})")
        return value

    @field_validator("init_lora_weights")
    @classmethod
    def _bounded_niter(cls, value: bool | str) -> bool | str:
        m = PISSA.match(value.lower()) if isinstance(value, str) else None
        if m and m.group(2) is not None and int(m.group(2)) > MAX_PISSA_NITER:
            raise ValueError(f"init_lora_weights 'pissa_niter_N' takes at most N = {MAX_PISSA_NITER} power "
                             f"iterations (got {m.group(2)}; peft's usual value is 4)")
        return value


class AttachLoraSpec(PathFields, AttachLoraOptions):
    """The full ``POST /attach-lora`` request."""


class TargetModule(BaseModel):
    name: str = Field(description="Full module name, e.g. model.layers.0.self_attn.q_proj; for a parameter, its "
                                   "full name (model.layers.0.mlp.experts.gate_up_proj).")
    kind: Literal["linear", "conv1d", "parameter"] = Field(
        description="parameter: a parameter adapted through peft's target_parameters (lora.ParamWrapper): "
                    "transformers 5's fused MoE experts (3-D) and routers.")
    in_features: int
    out_features: int
    experts: int = Field(1, description="Experts of a 3-D parameter: lora_A is (r * experts, in_features), lora_B "
                                        "(out_features, r * experts).")
    weight_dtype: str = Field(description="Stored dtype of the base weight.")
    r: int
    lora_alpha: float
    scaling: float
    lora_A: list[int] = Field(description="Shape of lora_A.weight: (r, in_features).")
    lora_B: list[int] = Field(description="Shape of lora_B.weight: (out_features, r).")


class ResidualBase(BaseModel):
    path: str = Field(description="The residual base, relative to the data directory.")
    replaced_tensors: list[str]
    rewritten_shards: list[FileInfo]
    linked_shards: list[str] = Field(description="Shards linked (or copied) unchanged from the checkpoint.")
    note: str


class AttachLoraResult(BaseModel):
    output: str
    task_type: str | None
    base_model_name_or_path: str = Field(description="The base this adapter belongs to (the residual base for "
                                                     "PiSSA/OLoRA), relative to the data directory.")
    adapter_files: list[FileInfo]
    target_modules: list[TargetModule]
    trainable_parameters: int = Field(description="Elements of every tensor in adapter_model.safetensors.")
    base_bytes_read: int = Field(description="Bytes of base tensor data read (0 for data-free inits).")
    residual_base: ResidualBase | None
    warnings: list[str]
    seconds: float

