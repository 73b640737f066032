"""Tiny, deterministic models for tests, demos and CPU benchmarks.

Nothing is downloaded: the weights are random (fixed seed) and the tokenizer is
a byte-level BPE trained here, on a small built-in corpus, with the
``tokenizers`` library. Byte-level BPE means every string round-trips,
including multi-byte UTF-8 that was never seen in training, which is what the
streaming detokenizer tests need. The result is an ordinary Hugging Face
directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with a chat template) that loads through
``AutoModelForCausalLM`` / ``AutoTokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, "<|user|>", "<|assistant|>", "<|system|>")

# GLM-4 style: role markers are special tokens; the assistant turn is left open
# when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes; a GPU node runs the inference server.",
    "Continuous batching lets requests join and leave the running batch at every step.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def main() -> None:\n    print('hello')\n",
    "0123456789 + - * / = < > ( ) [ ] { } , . ; : ! ? ' \"",
    "你好\uff0c世界\u3002模型推理服务\u3002",
    "Grüße aus Köln, naïve café, résumé, façade.",
    "emoji: 🚀✨🙂 and symbols: € £ ¥ ©",
    "Привет, мир! \u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5!",
]


def _train_tokenizer(vocab_size: int) -> Any:
    """Train a byte-level BPE on the fixed corpus (deterministic, a few milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _model_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    from transformers import Glm4Config, GlmConfig, LlamaConfig

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA, like GLM-4
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "bos_token_id": None,
    }
    common.update(overrides)
    if arch == "glm4":
        return Glm4Config(**common)
    if arch == "glm":
        return GlmConfig(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"arch: unknown {arch!r} (glm4, glm, llama)")


def build_tiny_model(
    path: str | Path,
    arch: Literal["glm4", "glm", "llama"] = "glm4",
    *,
    vocab_size: int = 512,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random causal LM and its tokenizer to ``path``; return the path.

    ``config_overrides`` go to the model config (e.g. ``num_hidden_layers=4``,
    ``max_position_embeddings=2048``). The same arguments always give the same
    bytes, so digests can be computed once and compared later.
    """
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer_cls: Any = PreTrainedTokenizerFast  # transformers' annotations are partial
    auto_model: Any = AutoModelForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    backend = _train_tokenizer(vocab_size)
    actual_vocab = backend.get_vocab_size()
    tokenizer = tokenizer_cls(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        model_max_length=config_overrides.get("max_position_embeddings", 512),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = _model_config(
        arch,
        vocab_size=actual_vocab,
        eos_token_id=backend.token_to_id(EOS_TOKEN),
        pad_token_id=backend.token_to_id(PAD_TOKEN),
        **config_overrides,
    )
    # Seed a private generator and initialise explicitly, so building a model
    # never disturbs (or depends on) the global RNG state of the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_model.from_config(config, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if name.endswith("norm.weight") or "layernorm" in name:
                    param.fill_(1.0)
                elif param.ndim >= 2:
                    param.normal_(0.0, 0.2, generator=generator)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    logger.debug("built tiny %s model at %s", arch, out)
    return out


def compute_sha256(path: str | Path) -> str:
    """Hex SHA-256 of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_sha256_manifest(
    model_dir: str | Path,
    out_file: str | Path | None = None,
    patterns: tuple[str, ...] = ("*.safetensors",),
) -> Path:
    """Write ``{"file.safetensors": "<hex>"}`` for the weight files in ``model_dir``.

    The format is what ``--sha256-file`` / ``AUTOGLM_SHA256_FILE`` expects.
    Returns the manifest path (default: ``<model_dir>/sha256.json``).
    """
    root = Path(model_dir)
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    manifest = {p.relative_to(root).as_posix(): compute_sha256(p) for p in files}
    target = Path(out_file) if out_file is not None else root / "sha256.json"
    target.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target


def break_model(path: str | Path, value: float = float("nan")) -> Path:
    """Turn the model at ``path`` into a broken revision: one element of its
    final norm's weight becomes ``value`` (NaN by default), so every forward
    pass yields non-finite logits while the model still loads and warms up.
    The canary tests use it as a model that really fails on real input."""
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(path)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    norms = sorted(
        name for name in tensors if name.endswith("norm.weight") and ".layers." not in name
    )
    if not norms:
        raise ValueError(f"{weights}: no final norm weight to break")
    broken = tensors[norms[0]].clone()
    broken.view(-1)[0] = torch.tensor(value, dtype=broken.dtype)
    tensors[norms[0]] = broken
    save_file(tensors, weights, metadata={"format": "pt"})
    return out
