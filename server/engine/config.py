"""Engine configuration: the batching policy and what to load.

Field names are the ``autoglm-server`` flag names with underscores
(``--max-batch-size`` is ``max_batch_size``; ``AUTOGLM_MAX_BATCH_SIZE`` is the
same setting), so the CLI can map flags onto these objects mechanically. Both
classes are frozen: the policy is fixed for the life of the process, and the
scheduler reads it on every step without copying.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("none", "fp8", "int8", "int4", "auto")  # the same tuple as quant.QUANTIZATIONS


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """The batching policy. Validated on construction (``ValueError`` names the field)."""

    max_batch_size: int = 64  # running requests per step; also the number of KV slots
    max_batch_tokens: int = 8192  # tokens per step: one per decoding request plus prefill chunks
    max_queue_delay_ms: float = 0.0  # how long the first waiting request may wait for company
    max_queue_length: int = 1024  # waiting requests before QueueFullError
    priority_levels: int = 1  # priorities 0 (most urgent) .. priority_levels - 1
    chunked_prefill: bool = True  # split long prompts across steps to stay under the budget

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens < self.max_batch_size:
            # Every running request needs one token of budget per decode step;
            # a smaller budget would starve some of them.
            raise ValueError(
                f"max_batch_tokens: must be >= max_batch_size ({self.max_batch_size}), "
                f"got {self.max_batch_tokens}"
            )
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms: must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue_length < 1:
            # Every request waits in the queue until the next step admits it, so
            # 0 would refuse all of them (RESOURCE_EXHAUSTED) even with free slots.
            raise ValueError(f"max_queue_length: must be >= 1, got {self.max_queue_length}")
        if self.priority_levels < 1:
            raise ValueError(f"priority_levels: must be >= 1, got {self.priority_levels}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything ``build_engine`` needs. Validated on construction."""

    model: str  # local directory or hf://org/name@revision (HF cache; see loader.py)
    served_model_name: str | None = None  # None: the directory / repository name
    model_version: str = "local"  # revision label in APIs and metrics
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # prompt + output; None: from the model config
    trust_remote_code: bool = False  # explicit opt-in to run code shipped with the model
    sha256_file: str | None = None  # JSON {"file.safetensors": "<hex>"}; every file verified
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # KV cache and kernels (see engine/README.md).
    kv_cache_memory_fraction: float = 0.9  # CUDA: share of the device for weights + KV + work
    kv_block_size: int = 16  # tokens per KV block (prefix caching shares whole blocks)
    num_kv_blocks: int | None = None  # None: from free memory (CUDA) or slots x max_model_len
    prefix_caching: bool = True  # reuse the KV of shared prompt prefixes
    attention_backend: str = "auto"  # auto | portable | triton
    compile: bool = True  # torch.compile of the decoder (CUDA only; ignored on CPU)
    compile_cache_dir: str | None = None  # where compiled kernels persist across restarts
    # Bigger models (quant.py, parallel.py).
    quantization: str = "none"  # none | fp8 | int8 | int4 | auto (torchao; see quant.py)
    tensor_parallel_size: int = 1  # processes (GPUs) the model is sharded over
    # "layers": one decoder layer compiled and shared by all (glm9b warm-up 39 s
    # cold, 13.5 s warm); "decoder": one graph over the whole decoder (184 s)
    compile_scope: str = "layers"
    # Launch each step before the previous step's tokens are read back, so the host's
    # work (scheduling, detokenizing, streaming) overlaps the device's (engine.py).
    pipeline: bool = True

    def __post_init__(self) -> None:
        if not 0.05 <= self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                "kv_cache_memory_fraction: must be in [0.05, 1], "
                f"got {self.kv_cache_memory_fraction}"
            )
        if self.kv_block_size < 1 or self.kv_block_size & (self.kv_block_size - 1):
            raise ValueError(f"kv_block_size: must be a power of two, got {self.kv_block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks: must be >= 2, got {self.num_kv_blocks}")
        if self.attention_backend not in ("auto", "portable", "triton"):
            raise ValueError(
                "attention_backend: must be auto, portable or triton, "
                f"got {self.attention_backend!r}"
            )
        if self.compile_scope not in ("decoder", "layers"):
            raise ValueError(
                f"compile_scope: must be decoder or layers, got {self.compile_scope!r}"
            )
        if not self.model:
            raise ValueError("model: must not be empty")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.tensor_parallel_size not in (1, 2, 4, 8):
            raise ValueError(
                f"tensor_parallel_size: must be 1, 2, 4 or 8, got {self.tensor_parallel_size}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        base_device = self.device.split(":", 1)[0]
        if base_device not in DEVICES or (base_device != "cuda" and ":" in self.device):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
