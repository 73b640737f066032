"""The sharded model compiles as one graph: the all-reduce after o_proj/down_proj is a
single opaque op to torch.compile (as on the GPU, where the decoder is compiled and
captured in CUDA graphs), with plain and quantised weights.

A one-rank gloo group in this process (the all-reduce is then the identity), so
the test checks tracing and numbers, not communication (test_tp_engine does that).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from autoglm_server.engine.parallel import shard_model, tp_all_reduce  # noqa: E402
from autoglm_server.engine.quant import quantize_model  # noqa: E402


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=30)
    )
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["none", "int8"])
def test_a_sharded_decoder_compiles_fullgraph_with_the_all_reduce(
    one_rank_group: None, tiny_llama_dir: Path, method: str
) -> None:
    if method != "none":
        pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    shard_model(model, 1, rank=0)
    quantize_model(model, method, torch.device("cpu"), fuse=False)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(1))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.inference_mode():
        want = model.model(input_ids=ids).last_hidden_state
        compiled = torch.compile(model.model, backend="aot_eager", fullgraph=True, dynamic=True)
        got = compiled(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want)
    assert calls  # the hooks run inside the compiled graph too


def test_the_all_reduce_op_sums_into_a_new_tensor(one_rank_group: None) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    y = tp_all_reduce(x)
    assert y is not x and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, x)  # one rank: the sum is the tensor itself
