"""Fixtures for the server unit tests: one tiny random model per test session.

``tiny_model_dir`` (a 2-layer Glm4ForCausalLM with a locally trained byte-level
BPE tokenizer, see ``autoglm_server.testing``) is built once and shared; tests
must not modify it. Torch is limited to one thread: the CI machine has two
cores shared with other work.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread() -> None:
    try:
        import torch
    except ImportError:  # the pure-Python tests do not need torch
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoglm_server.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-glm4"), arch="glm4")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoglm_server.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")
