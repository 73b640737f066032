"""``--quantization auto``: a pure function of model size, KV budget and device memory."""

from __future__ import annotations

import pytest

from autoglm_server.engine.quant import (
    ModelFootprint,
    choose_quantization,
    weight_bytes_per_param,
)

GIB = 2**30
H100 = 80 * GIB  # 81,559 MiB

# glm9b-512-128 (hidden 4096, 40 layers, 32 heads, 2 KV heads x 128, intermediate 13696,
# vocab 151552): decoder Linear weights and the rest, counted from the shapes.
GLM9B = ModelFootprint(
    linear_params=40 * (4096 * (4096 + 2 * 256) + 4096 * 4096 + 3 * 4096 * 13696),
    other_params=2 * 151552 * 4096 + 40 * 2 * 4096 + 4096,
    kv_bytes_per_token=2 * 40 * 2 * 128 * 2,
)
# GLM-4-32B shape (hidden 6144, 61 layers, 48 heads, 2 KV heads, intermediate 23040).
GLM32B = ModelFootprint(
    linear_params=61 * (6144 * (6144 + 2 * 256) + 6144 * 6144 + 3 * 6144 * 23040),
    other_params=2 * 151552 * 6144,
    kv_bytes_per_token=2 * 61 * 2 * 128 * 2,
)


def pick(footprint: ModelFootprint, device_bytes: int, **kw: object) -> str:
    args: dict[str, object] = {
        "dtype_bytes": 2,
        "device_bytes": device_bytes,
        "min_kv_tokens": 8192,
    }
    args.update(kw)
    return choose_quantization(footprint, **args).method  # type: ignore[arg-type]


def test_bytes_per_weight() -> None:
    assert weight_bytes_per_param("none", 2) == 2
    assert weight_bytes_per_param("fp8", 2) == weight_bytes_per_param("int8", 2) == 1
    # int4 halves the 8-bit formats again, up to its group scales
    assert weight_bytes_per_param("int4", 2) == pytest.approx(0.53125)
    with pytest.raises(ValueError, match="quantization"):
        weight_bytes_per_param("int3", 2)


def test_a_model_that_fits_stays_in_its_dtype() -> None:
    assert pick(GLM9B, H100) == "none"


def test_smaller_devices_step_down_in_precision() -> None:
    assert pick(GLM9B, 24 * GIB) == "none"  # 17.5 GiB of bf16 weights
    assert pick(GLM9B, 16 * GIB) == "fp8"  # no room for them beside KV and work
    assert pick(GLM9B, 16 * GIB, fp8_native=False) == "int8"  # no native fp8: int8
    assert pick(GLM9B, 12 * GIB) == "int4"


def test_glm32b_fits_an_80gb_gpu_barely_and_a_48gb_one_only_with_two() -> None:
    # 60.7 GiB of bf16 weights + 2 GiB reserve + 1.9 GiB of KV for one 32K request
    assert pick(GLM32B, H100, min_kv_tokens=32768) == "none"
    assert pick(GLM32B, H100, min_kv_tokens=32768, memory_fraction=0.8) == "fp8"
    assert pick(GLM32B, 48 * GIB, min_kv_tokens=32768) == "fp8"
    assert pick(GLM32B, 48 * GIB, min_kv_tokens=32768, tensor_parallel_size=2) == "none"


def test_the_kv_budget_counts() -> None:
    small_kv = pick(GLM9B, 22 * GIB, min_kv_tokens=1024)
    big_kv = pick(GLM9B, 22 * GIB, min_kv_tokens=131072)
    assert (small_kv, big_kv) == ("none", "fp8")


def test_int4_is_skipped_where_unsupported_and_nothing_fitting_is_an_error() -> None:
    with pytest.raises(ValueError, match="not even int4 fits") as err:
        pick(GLM9B, 8 * GIB)
    assert "tensor_parallel_size" in str(err.value)
    with pytest.raises(ValueError, match="not even int4"):
        pick(GLM9B, 12 * GIB, int4_supported=False)


def test_the_choice_is_pure_and_explains_itself() -> None:
    a = choose_quantization(GLM9B, dtype_bytes=2, device_bytes=16 * GIB, min_kv_tokens=8192)
    b = choose_quantization(GLM9B, dtype_bytes=2, device_bytes=16 * GIB, min_kv_tokens=8192)
    assert a == b
    assert a.method == "fp8"
    assert a.weight_bytes <= a.budget_bytes
    assert "tried none" in a.reason and "fit" in a.reason
