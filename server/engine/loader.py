"""Model loading: resolve the source, verify digests, load weights and tokenizer.

Sources:

- a local directory with ``config.json`` and safetensors weights (a mounted
  PVC or an init-container download ends up here too);
- ``hf://org/name@revision``, resolved through the Hugging Face cache
  (``HF_HOME``). With ``HF_HUB_OFFLINE`` truthy (``1``, ``true``, ``yes``) the
  revision must already be there (``snapshot_download(local_files_only=True)``,
  never the network); otherwise a missing revision is downloaded into the
  cache. Pin a revision and use a digest manifest to be sure what runs.

With a digest manifest (``{"model.safetensors": "<hex>"}``) every listed file
is hashed before anything is deserialised, and every weight file in the
directory must be listed; any mismatch or missing file refuses the load with a
:class:`~autoglm_server.errors.ModelLoadError` naming the file.

Model code shipped with a checkpoint runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import ModelLoadError
from .config import EngineConfig

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_HF_SOURCE = re.compile(r"^hf://(?P<repo>[\w.\-]+(?:/[\w.\-]+)?)(?:@(?P<rev>[\w.\-/]+))?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config attributes that carry the trained context length, in order of preference.
_CONTEXT_ATTRS = ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions")
_TRUTHY = ("1", "true", "yes")


@dataclass(slots=True)
class LoadedModel:
    """A model ready for the runner, plus what the engine needs to know about it."""

    model: torch.nn.Module  # eval mode, on ``device``, in ``dtype``
    tokenizer: Any  # a transformers tokenizer
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    architecture: str  # e.g. "Glm4ForCausalLM"
    vocab_size: int  # rows of the output layer (may exceed len(tokenizer))
    eos_token_ids: frozenset[int]
    quantization: str = "none"  # none | fp8 | int8 | int4 | checkpoint:<format> (quant.py)
    tensor_parallel_size: int = 1  # ranks the model is sharded over (parallel.py)


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` says to stay off the network (``1``, ``true``, ``yes``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def resolve_model_dir(source: str, *, cache_dir: str | Path | None = None) -> Path:
    """Turn ``source`` into a local directory (hf://: from the cache, or downloaded into it
    unless :func:`hf_offline`)."""
    if source.startswith("hf://"):
        match = _HF_SOURCE.match(source)
        if match is None:
            raise ModelLoadError(f"model: {source!r} is not hf://org/name[@revision]")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo, revision = match.group("repo"), match.group("rev")
        offline = hf_offline()
        try:
            path = snapshot_download(
                repo, revision=revision, cache_dir=cache_dir, local_files_only=offline
            )
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
            where = (
                "is not in the local Hugging Face cache (HF_HUB_OFFLINE is set; "
                "pre-populate HF_HOME)"
                if offline
                else f"cannot be downloaded into the Hugging Face cache: {exc}"
            )
            raise ModelLoadError(f"model: {repo}@{revision or 'main'} {where}") from exc
        return Path(path)
    if "://" in source:
        scheme = source.split("://", 1)[0]
        raise ModelLoadError(
            f"model: the {scheme}:// scheme is resolved by the operator; the server takes a "
            "local directory or hf://org/name@revision"
        )
    local = Path(source).expanduser()
    if not local.is_dir():
        raise ModelLoadError(f"model: {source} is not a directory")
    if not (local / "config.json").is_file():
        raise ModelLoadError(f"model: {source} has no config.json")
    return local


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(manifest_path: str | Path) -> dict[str, str]:
    """Read and validate a ``{"file": "<64 hex>"}`` manifest."""
    path = Path(manifest_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"sha256_file: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ModelLoadError(f"sha256_file: {path} must be a non-empty JSON object")
    manifest: dict[str, str] = {}
    for name, digest in data.items():
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelLoadError(f"sha256_file: {name!r} must be a relative path inside the model")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ModelLoadError(f"sha256_file: the digest for {name} is not 64 hex characters")
        manifest[rel.as_posix()] = digest.lower()
    return manifest


def verify_digests(model_dir: Path, manifest: dict[str, str]) -> None:
    """Hash every listed file; refuse unlisted weight files. Raises ModelLoadError naming the file."""
    for name, expected in sorted(manifest.items()):
        path = model_dir / name
        if not path.is_file():
            raise ModelLoadError(f"sha256: {name} is listed but missing from {model_dir}")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelLoadError(
                f"sha256: {name} does not match (expected {expected}, got {actual})"
            )
    for pattern in WEIGHT_PATTERNS:
        for path in model_dir.rglob(pattern):
            rel = path.relative_to(model_dir).as_posix()
            if rel not in manifest:
                raise ModelLoadError(f"sha256: weight file {rel} is not listed in the manifest")
    logger.info("verified %d file digests in %s", len(manifest), model_dir)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device: cuda was requested but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device, config: Any) -> torch.dtype:
    """``auto``: float32 on CPU; on GPU the checkpoint's half type, else bfloat16 (float16 without bf16 support)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    if stored in (torch.float16, torch.bfloat16):
        return stored
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_max_model_len(config: Any, requested: int | None) -> int:
    trained = next(
        (int(v) for a in _CONTEXT_ATTRS if isinstance(v := getattr(config, a, None), int)), None
    )
    if requested is None:
        if trained is None:
            raise ModelLoadError("max_model_len: the model config has no context length; set it")
        return trained
    if trained is not None and requested > trained:
        raise ModelLoadError(
            f"max_model_len: {requested} exceeds the model's context length {trained}"
        )
    return requested


def _eos_ids(config: Any, generation_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (config, generation_config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(cfg: EngineConfig) -> LoadedModel:
    """Resolve, verify and load ``cfg.model``. Every failure is a ModelLoadError."""
    model_dir = resolve_model_dir(cfg.model)
    if cfg.sha256_file:
        verify_digests(model_dir, read_manifest(cfg.sha256_file))
    if not any(model_dir.glob("*.safetensors")) and not cfg.trust_remote_code:
        # Pickle-based weights execute code on load; only safetensors are loaded by default.
        raise ModelLoadError(f"model: no *.safetensors weights in {model_dir}")

    from transformers import AutoConfig, AutoTokenizer
    from transformers import AutoModelForCausalLM as _AutoModel

    auto_model: Any = _AutoModel  # transformers' own annotations are partial
    trust = cfg.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    except Exception as exc:
        raise ModelLoadError(f"model: cannot read config.json in {model_dir}: {exc}") from exc
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, hf_config)
    max_model_len = resolve_max_model_len(hf_config, cfg.max_model_len)
    from .quant import plan_quantization, quantize_model

    tp = cfg.tensor_parallel_size
    if tp > 1:
        from .parallel import check_shardable, rank_device

        check_shardable(hf_config, tp)
        device = rank_device(device)
    quant = plan_quantization(
        cfg.quantization,
        hf_config,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        memory_fraction=cfg.kv_cache_memory_fraction,
        tensor_parallel_size=tp,
    )
    if quant.reported.startswith("checkpoint:"):
        from .quant import prepare_checkpoint_config

        prepare_checkpoint_config(hf_config)
    # Sharded or quantised: load on the CPU and move the result, so the whole
    # bf16 model never has to fit the device.
    staged = tp > 1 or quant.method != "none"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        model: Any = auto_model.from_pretrained(
            model_dir,
            config=hf_config,
            dtype=dtype,
            device_map=str(device) if device.type == "cuda" and not staged else None,
            trust_remote_code=trust,
            use_safetensors=None if trust else True,
            attn_implementation="sdpa",
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"model: cannot load {model_dir}: {type(exc).__name__}: {exc}"
        ) from exc
    if tp > 1:
        from .parallel import shard_model

        shard_model(model, tp)
    quantize_model(model, quant.method, device)
    model.to(device)
    model.eval()
    architecture = type(model).__name__
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    eos = _eos_ids(hf_config, getattr(model, "generation_config", None), tokenizer)
    logger.info(
        "loaded %s from %s: %s on %s, max_model_len %d, quantization %s (%s), tensor parallel %d",
        architecture,
        model_dir,
        str(dtype).removeprefix("torch."),
        device,
        max_model_len,
        quant.reported,
        quant.reason,
        tp,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        architecture=architecture,
        vocab_size=vocab_size,
        eos_token_ids=eos,
        quantization=quant.reported,
        tensor_parallel_size=tp,
    )
