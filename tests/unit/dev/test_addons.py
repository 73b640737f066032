"""Pure parts of the live cluster's add-ons: their pinned builds, cache folders,
the aggregation-layer PKI and flags, and the configs and manifests they get."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography import x509

from autoglm_dev import addons, binaries
from autoglm_dev.pki import aggregation_layer_args, write_pki, write_serving_cert


@pytest.mark.parametrize("name", binaries.ADDON_BINARIES)
def test_each_wrapper_module_pins_the_version_we_cache_under(name: str) -> None:
    spec = binaries.ADDONS[name]
    module_dir = binaries.HACK_DIR / spec.module_dir
    assert binaries.go_mod_version(module_dir, spec.module) == spec.version
    assert f"tool {spec.package}" in (module_dir / "go.mod").read_text()
    assert (module_dir / "go.sum").is_file()


def test_gateway_api_version_is_the_one_traefik_is_built_against() -> None:
    module_dir = binaries.HACK_DIR / "traefik"
    assert (
        binaries.go_mod_version(module_dir, "sigs.k8s.io/gateway-api")
        == binaries.GATEWAY_API_VERSION
    )


def test_each_addon_has_its_own_cache_folder_keyed_on_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOGLM_CACHE", str(tmp_path))
    folders = {binaries.bin_dir(n) for n in binaries.ADDON_BINARIES}
    assert len(folders) == len(binaries.ADDON_BINARIES)
    assert binaries.bin_dir() not in folders
    for name in binaries.ADDON_BINARIES:
        assert binaries.ADDONS[name].version in binaries.bin_dir(name).name
    monkeypatch.setenv("TEST_ASSET_TRAEFIK", "/opt/traefik")
    found = binaries.find_binary("traefik")
    assert found is not None and found.source == "TEST_ASSET_TRAEFIK"


def test_aggregation_layer_pki_and_flags(tmp_path: Path) -> None:
    pki = write_pki(tmp_path / "pki")
    client = x509.load_pem_x509_certificate(pki.front_proxy_client_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.front_proxy_ca_cert.read_bytes())
    assert client.issuer == ca.subject
    flags = aggregation_layer_args(pki)
    assert f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}" in flags
    cn = client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert f"--requestheader-allowed-names={cn}" in flags

    cert_path, _ = write_serving_cert(pki, "adapter", ["adapter.ns.svc"], ["127.0.0.1"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    serving_ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert cert.issuer == serving_ca.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["adapter.ns.svc"]


def test_prometheus_keeps_annotated_pods_and_labels_namespace_and_pod(tmp_path: Path) -> None:
    config = addons.build_prometheus_config(
        "https://127.0.0.1:6443", tmp_path / "ca.crt", tmp_path / "token"
    )
    job = config["scrape_configs"][0]
    sd = job["kubernetes_sd_configs"][0]
    assert sd["role"] == "pod" and sd["api_server"] == "https://127.0.0.1:6443"
    relabel = job["relabel_configs"]
    assert relabel[0] == {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "action": "keep",
        "regex": "true",
    }
    targets = {r.get("target_label"): r["source_labels"] for r in relabel}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert targets["__address__"] == [
        "__meta_kubernetes_pod_ip",
        "__meta_kubernetes_pod_annotation_prometheus_io_port",
    ]


def test_adapter_registration_dials_loopback_by_name() -> None:
    service, *apiservices = addons.build_adapter_registration(12345, b"PEM")
    assert service["spec"] == {"type": "ExternalName", "externalName": "localhost"}
    assert {a["metadata"]["name"] for a in apiservices} == {
        "v1beta1.custom.metrics.k8s.io",
        "v1beta2.custom.metrics.k8s.io",
    }
    for apiservice in apiservices:
        spec = apiservice["spec"]
        assert spec["group"] == "custom.metrics.k8s.io"
        assert apiservice["metadata"]["name"].startswith(spec["version"] + ".")
        assert spec["service"] == {
            "namespace": addons.ADDONS_NAMESPACE,
            "name": service["metadata"]["name"],
            "port": 12345,
        }
        assert base64.b64decode(spec["caBundle"]) == b"PEM"


def test_gateway_listener_takes_http_and_grpc_routes_from_all_namespaces() -> None:
    gatewayclass, gateway = addons.build_gateway(18080)
    assert gatewayclass["spec"]["controllerName"] == addons.GATEWAY_CONTROLLER
    (listener,) = gateway["spec"]["listeners"]
    assert listener["port"] == 18080 and listener["protocol"] == "HTTP"
    assert listener["allowedRoutes"]["namespaces"] == {"from": "All"}
    assert {k["kind"] for k in listener["allowedRoutes"]["kinds"]} == {"HTTPRoute", "GRPCRoute"}
    args = addons.traefik_args(
        {"traefik-web": 18080, "traefik-api": 18081},
        "https://127.0.0.1:6443",
        Path("/ca"),
        Path("/token"),
    )
    assert "--entryPoints.web.address=127.0.0.1:18080" in args


def test_prometheus_copies_the_revision_pod_label(tmp_path: Path) -> None:
    config = addons.build_prometheus_config("https://x", tmp_path / "ca", tmp_path / "t")
    relabel = config["scrape_configs"][0]["relabel_configs"]
    rule = next(r for r in relabel if r.get("target_label") == "revision")
    # kubernetes_sd writes pod label serving.autoglm.io/revision with every other character as _.
    assert rule["source_labels"] == ["__meta_kubernetes_pod_label_serving_autoglm_io_revision"]
    assert rule["regex"] == "(.+)"  # pods without the label get no empty `revision`


def test_istio_crd_names_are_read_from_the_module_file(tmp_path: Path) -> None:
    path = tmp_path / "crds.yaml"
    path.write_text(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata: {name: virtualservices.networking.istio.io}\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n"
    )
    assert addons.istio_crd_names(path) == ["virtualservices.networking.istio.io"]
