"""Model loading: local directories, the offline HF cache, digests, dtype and device."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from autoglm_server.engine.config import EngineConfig  # noqa: E402
from autoglm_server.engine.loader import load_model, resolve_model_dir  # noqa: E402
from autoglm_server.errors import ModelLoadError  # noqa: E402
from autoglm_server.testing import build_tiny_model, write_sha256_manifest  # noqa: E402


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def test_loads_a_local_directory(tiny_model_dir: Path) -> None:
    loaded = load_model(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="auto"))
    assert loaded.architecture == "Glm4ForCausalLM"
    assert loaded.dtype == torch.float32  # auto on CPU
    assert loaded.max_model_len == 512  # from max_position_embeddings
    assert loaded.eos_token_ids == {loaded.tokenizer.eos_token_id}
    assert not loaded.model.training


def test_dtype_and_max_model_len_are_applied(tiny_model_dir: Path) -> None:
    cfg = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="bfloat16", max_model_len=64)
    loaded = load_model(cfg)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.max_model_len == 64
    with pytest.raises(ModelLoadError, match="max_model_len"):
        load_model(EngineConfig(model=str(tiny_model_dir), device="cpu", max_model_len=4096))


def test_matching_digests_load(model_copy: Path, tmp_path: Path) -> None:
    manifest = write_sha256_manifest(model_copy, tmp_path / "sha.json")
    load_model(EngineConfig(model=str(model_copy), device="cpu", sha256_file=str(manifest)))


def test_digest_mismatch_names_the_file(model_copy: Path, tmp_path: Path) -> None:
    manifest = write_sha256_manifest(model_copy, tmp_path / "sha.json")
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors does not match"):
        load_model(EngineConfig(model=str(model_copy), device="cpu", sha256_file=str(manifest)))


def test_missing_listed_file_is_named(model_copy: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "sha.json"
    digests = json.loads(write_sha256_manifest(model_copy, manifest).read_text())
    digests["model-00002-of-00002.safetensors"] = "0" * 64
    manifest.write_text(json.dumps(digests))
    with pytest.raises(
        ModelLoadError, match=r"model-00002-of-00002\.safetensors is listed but missing"
    ):
        load_model(EngineConfig(model=str(model_copy), device="cpu", sha256_file=str(manifest)))


def test_unlisted_weight_file_is_refused(model_copy: Path, tmp_path: Path) -> None:
    manifest = write_sha256_manifest(model_copy, tmp_path / "sha.json")
    (model_copy / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"extra\.safetensors is not listed"):
        load_model(EngineConfig(model=str(model_copy), device="cpu", sha256_file=str(manifest)))


def test_bad_manifest_is_refused(model_copy: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "sha.json"
    manifest.write_text(json.dumps({"../etc/passwd": "0" * 64}))
    with pytest.raises(ModelLoadError, match="relative path"):
        load_model(EngineConfig(model=str(model_copy), device="cpu", sha256_file=str(manifest)))


def test_missing_directory_and_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="s3://"):
        resolve_model_dir("s3://bucket/model")


def test_hf_source_resolves_offline_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lay out a Hugging Face cache entry by hand, as a pre-populated HF_HOME would have it.
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-glm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    build_tiny_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("hf://acme/tiny-glm", cache_dir=cache) == repo / "snapshots" / commit
    assert resolve_model_dir(f"hf://acme/tiny-glm@{commit}", cache_dir=cache).name == commit
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model_dir("hf://acme/other@main", cache_dir=cache)
    with pytest.raises(ModelLoadError, match="hf://org/name"):
        resolve_model_dir("hf://a/b/c")


@pytest.mark.parametrize(
    ("env", "offline"),
    [(None, False), ("0", False), ("false", False), ("1", True), ("TRUE", True), ("yes", True)],
)
def test_hf_source_downloads_unless_hf_hub_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None, offline: bool
) -> None:
    # Only HF_HUB_OFFLINE keeps the loader off the network; the download
    # itself is stubbed so the test stays offline.
    import huggingface_hub

    calls: list[dict[str, object]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    if env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env)
    assert resolve_model_dir("hf://acme/tiny-glm@v1") == tmp_path
    (call,) = calls
    assert call["repo_id"] == "acme/tiny-glm" and call["revision"] == "v1"
    assert call["local_files_only"] is offline


def test_cuda_without_a_gpu_is_a_load_error(tiny_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="cuda"):
        load_model(EngineConfig(model=str(tiny_model_dir), device="cuda"))


def test_engine_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="m", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        EngineConfig(model="m", device="tpu")
    with pytest.raises(ValueError, match=r"^max_model_len: must be >= 2"):
        EngineConfig(model="m", max_model_len=1)
    assert EngineConfig(model="m", max_model_len=2).max_model_len == 2
    assert EngineConfig(model="m", device="cuda:1").device == "cuda:1"


def test_build_tiny_model_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
