"""Pure parts of the local control plane: binary resolution, cache keys, PKI, node manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from autoglm_dev import binaries
from autoglm_dev.cluster import build_node_manifest
from autoglm_dev.pki import write_pki


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_resolution_order_matches_envtest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TEST_ASSET_KUBE_APISERVER", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    assert binaries.find_binary("kube-apiserver") is None

    cached = _exe(binaries.bin_dir() / "kube-apiserver")
    found = binaries.find_binary("kube-apiserver")
    assert found is not None and (found.path, found.source) == (cached, "cache")

    assets = _exe(tmp_path / "assets" / "kube-apiserver")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets.parent))
    found = binaries.find_binary("kube-apiserver")
    assert found is not None and (found.path, found.source) == (assets, "KUBEBUILDER_ASSETS")

    explicit = _exe(tmp_path / "explicit" / "apiserver")
    monkeypatch.setenv("TEST_ASSET_KUBE_APISERVER", str(explicit))
    found = binaries.find_binary("kube-apiserver")
    assert found is not None and (found.path, found.source) == (
        explicit,
        "TEST_ASSET_KUBE_APISERVER",
    )


def test_cache_key_names_every_pinned_version() -> None:
    key = binaries.cache_key()
    for version in (
        binaries.KUBERNETES_VERSION,
        binaries.ETCD_VERSION,
        binaries.KWOK_VERSION,
        binaries.HELM_VERSION,
    ):
        assert version in key


def test_wrapper_module_requires_the_pinned_versions() -> None:
    gomod = (binaries.K8S_MODULE_DIR / "go.mod").read_text()
    assert f"k8s.io/kubernetes {binaries.KUBERNETES_VERSION}" in gomod
    assert f"go.etcd.io/etcd/server/v3 {binaries.ETCD_VERSION}" in gomod
    staging = binaries.KUBERNETES_VERSION.replace("v1.", "v0.")
    assert f"k8s.io/api => k8s.io/api {staging}" in gomod


def test_ldflags_stamp_the_version() -> None:
    flags = binaries._ldflags()
    assert f"k8s.io/component-base/version.gitVersion={binaries.KUBERNETES_VERSION}" in flags
    assert "k8s.io/client-go/pkg/version.gitMinor=36" in flags


def test_pki_serving_cert_covers_loopback_and_admin_is_cluster_admin(tmp_path: Path) -> None:
    paths = write_pki(tmp_path / "pki")
    serving = x509.load_pem_x509_certificate(paths.serving_cert.read_bytes())
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.0.0.1"}
    admin = x509.load_pem_x509_certificate(paths.admin_cert.read_bytes())
    orgs = [
        a.value for a in admin.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
    ]
    assert orgs == ["system:masters"]
    assert admin.issuer != serving.issuer  # client and serving CAs are separate
    assert oct(paths.admin_key.stat().st_mode)[-3:] == "600"


def test_gpu_node_manifest_is_kwok_managed_with_gpu_capacity() -> None:
    node = build_node_manifest("n0", gpus=8, gpu_product="NVIDIA-H200")
    meta = node["metadata"]
    assert isinstance(meta, dict)
    assert meta["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert meta["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    status = node["status"]
    assert isinstance(status, dict)
    assert status["allocatable"]["nvidia.com/gpu"] == "8"
    assert build_node_manifest("n0", gpus=8, gpu_product="NVIDIA-H200") == node
