"""The server's optional features reach the pod: auth, TLS, signing, chat template,
HTTP limits, quantisation, tensor parallelism, compile cache and the pod knobs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoglm_operator.builders import (
    CHECKSUM_ANNOTATION,
    build_children,
    build_deployment,
    build_network_policy,
    compute_config_checksum,
)
from autoglm_operator.canary import build_revision_record, compute_revision
from autoglm_operator.owner import Owner
from autoglm_operator.spec import compute_canary_spec, compute_revision_spec, parse_spec

OWNER = Owner(name="glm", namespace="models", uid="0b7c6d8e-0000-4000-8000-000000000002")


def deploy(**spec: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"model": {"source": "pvc://models/glm"}, **spec}
    return build_deployment(parse_spec(raw), OWNER)


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env(dep: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in container(dep)["env"]:
        assert e["name"] not in out, f"duplicate env {e['name']}"
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def volumes(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}


def mounts(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(dep)["volumeMounts"]}


def test_plain_spec_has_none_of_the_features() -> None:
    dep = deploy()
    names = set(env(dep))
    assert not names & {
        "AUTOGLM_API_KEYS_FILE",
        "AUTOGLM_TLS_CERT_FILE",
        "AUTOGLM_MODEL_SIGNING_PUBLIC_KEY",
        "AUTOGLM_QUANTIZATION",
        "AUTOGLM_TENSOR_PARALLEL_SIZE",
        "AUTOGLM_COMPILE",
        "NCCL_DEBUG",
    }
    assert "grpc" in container(dep)["readinessProbe"]


# ---- 1. auth ---------------------------------------------------------------------


def test_auth_mounts_the_whole_secret_as_a_directory() -> None:
    dep = deploy(server={"auth": {"apiKeysSecret": "glm-keys", "metricsAuth": True}})
    assert env(dep)["AUTOGLM_API_KEYS_FILE"] == "/etc/autoglm/api-keys/keys.json"
    assert env(dep)["AUTOGLM_METRICS_AUTH"] == "true"
    assert volumes(dep)["api-keys"] == {"name": "api-keys", "secret": {"secretName": "glm-keys"}}
    mount = mounts(dep)["api-keys"]
    # A directory, never subPath: the kubelet swaps a rotated Secret's files in place.
    assert mount == {"name": "api-keys", "mountPath": "/etc/autoglm/api-keys", "readOnly": True}


def test_auth_key_and_metrics_default() -> None:
    dep = deploy(server={"auth": {"apiKeysSecret": "k", "key": "tenants.json"}})
    assert env(dep)["AUTOGLM_API_KEYS_FILE"] == "/etc/autoglm/api-keys/tenants.json"
    assert env(dep)["AUTOGLM_METRICS_AUTH"] == "false"


# ---- 2. TLS ------------------------------------------------------------------------


def test_tls_mounts_the_secret_and_moves_the_probes_to_the_metrics_port() -> None:
    dep = deploy(server={"tls": {"secretName": "glm-tls"}})
    e = env(dep)
    assert e["AUTOGLM_TLS_CERT_FILE"] == "/etc/autoglm/tls/tls.crt"
    assert e["AUTOGLM_TLS_KEY_FILE"] == "/etc/autoglm/tls/tls.key"
    assert "AUTOGLM_TLS_CLIENT_CA_FILE" not in e
    assert volumes(dep)["tls"]["secret"] == {"secretName": "glm-tls"}
    c = container(dep)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in c[probe]
        assert c[probe]["httpGet"]["port"] == 8002
        assert c[probe]["httpGet"]["scheme"] == "HTTP"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_mtls_from_the_same_secret_or_another() -> None:
    same = deploy(server={"tls": {"secretName": "t", "clientCASecret": "t"}})
    assert env(same)["AUTOGLM_TLS_CLIENT_CA_FILE"] == "/etc/autoglm/tls/ca.crt"
    assert "client-ca" not in volumes(same)
    other = deploy(server={"tls": {"secretName": "t", "clientCASecret": "ca", "clientCAKey": "x"}})
    assert env(other)["AUTOGLM_TLS_CLIENT_CA_FILE"] == "/etc/autoglm/client-ca/x"
    assert volumes(other)["client-ca"]["secret"] == {"secretName": "ca"}
    assert mounts(other)["client-ca"]["readOnly"] is True


# ---- 3. signature ----------------------------------------------------------------------


def test_signature_public_key_and_bundle_from_objects() -> None:
    dep = deploy(
        model={
            "source": "pvc://models/glm",
            "signature": {
                "publicKey": {"configMap": "glm-signing", "key": "key.pub"},
                "bundle": {"secret": "glm-sig", "key": "model.sig"},
            },
        }
    )
    e = env(dep)
    assert e["AUTOGLM_MODEL_SIGNING_PUBLIC_KEY"] == "/etc/autoglm/signing-key/key.pub"
    assert e["AUTOGLM_MODEL_SIGNATURE"] == "/etc/autoglm/model-signature/model.sig"
    assert volumes(dep)["signing-key"]["configMap"] == {"name": "glm-signing"}
    assert volumes(dep)["model-signature"]["secret"] == {"secretName": "glm-sig"}


def test_signature_path_in_the_model_and_default() -> None:
    dep = deploy(
        model={
            "source": "pvc://models/glm",
            "signature": {"publicKey": {"secret": "k", "key": "pub"}, "bundlePath": "sig/m.sig"},
        }
    )
    assert env(dep)["AUTOGLM_MODEL_SIGNATURE"] == "/models/glm/sig/m.sig"
    plain = deploy(model={"source": "/m", "signature": {"publicKey": {"secret": "k", "key": "p"}}})
    assert "AUTOGLM_MODEL_SIGNATURE" not in env(plain)  # the server's default, <model>/model.sig
    assert volumes(plain)["signing-key"]["secret"] == {"secretName": "k"}


# ---- 4. chat template, tool-call parser, HTTP limits ------------------------------------


def test_chat_template_parser_and_http_limits() -> None:
    dep = deploy(
        server={
            "chatTemplate": {"configMap": "tpl", "key": "glm4.jinja"},
            "toolCallParser": "glm4",
            "http": {"maxBodyBytes": 1048576, "requestTimeoutSeconds": 120},
        }
    )
    e = env(dep)
    assert e["AUTOGLM_CHAT_TEMPLATE"] == "/etc/autoglm/chat-template/glm4.jinja"
    assert volumes(dep)["chat-template"]["configMap"] == {"name": "tpl"}
    assert e["AUTOGLM_TOOL_CALL_PARSER"] == "glm4"
    assert e["AUTOGLM_HTTP_MAX_BODY_BYTES"] == "1048576"
    assert e["AUTOGLM_HTTP_REQUEST_TIMEOUT_SECONDS"] == "120"


# ---- 5. quantisation, tensor parallelism --------------------------------------------------


def test_quantization_passes_through() -> None:
    dep = deploy(model={"source": "/m", "quantization": "fp8"})
    assert env(dep)["AUTOGLM_QUANTIZATION"] == "fp8"


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_gpus_above_one_is_tensor_parallelism(gpus: int) -> None:
    dep = deploy(resources={"gpus": gpus, "shmSize": "16Gi"})
    e = env(dep)
    assert e["AUTOGLM_TENSOR_PARALLEL_SIZE"] == str(gpus)
    assert e["NCCL_DEBUG"] == "WARN"
    assert e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    res = container(dep)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(gpus)
    shm = volumes(dep)["dshm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "16Gi"}


@pytest.mark.parametrize("gpus", [3, 5, 16])
def test_gpus_must_be_a_tensor_parallel_size(gpus: int) -> None:
    with pytest.raises(ValidationError, match="1, 2, 4 or 8"):
        parse_spec({"model": {"source": "/m"}, "resources": {"gpus": gpus}})


def test_user_env_replaces_an_nccl_default() -> None:
    dep = deploy(resources={"gpus": 2}, server={"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]})
    assert env(dep)["NCCL_DEBUG"] == "INFO"


# ---- 6. compile ----------------------------------------------------------------------------


def test_compile_cache_on_a_claim() -> None:
    dep = deploy(server={"compile": {"cacheVolume": {"claimName": "glm-compile"}}})
    e = env(dep)
    assert e["AUTOGLM_COMPILE"] == "true"
    assert e["AUTOGLM_COMPILE_CACHE_DIR"] == "/var/cache/autoglm/compile"
    assert volumes(dep)["compile-cache"]["persistentVolumeClaim"] == {"claimName": "glm-compile"}
    assert mounts(dep)["compile-cache"] == {
        "name": "compile-cache",
        "mountPath": "/var/cache/autoglm/compile",
    }


def test_compile_off_and_cache_in_an_empty_dir() -> None:
    dep = deploy(server={"compile": {"enabled": False, "cacheVolume": {"emptyDir": True}}})
    assert env(dep)["AUTOGLM_COMPILE"] == "false"
    assert volumes(dep)["compile-cache"]["emptyDir"] == {}


def test_compile_cache_volume_needs_one_kind() -> None:
    for bad in ({}, {"claimName": "c", "emptyDir": True}, {"emptyDir": False}):
        with pytest.raises(ValidationError, match="exactly one of claimName"):
            parse_spec({"model": {"source": "/m"}, "server": {"compile": {"cacheVolume": bad}}})


# ---- 8. pod knobs --------------------------------------------------------------------------


def test_env_and_env_from_reach_the_container() -> None:
    dep = deploy(
        server={
            "env": [
                {
                    "name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
                },
                {"name": "LOG_EXTRA", "value": "1"},
            ],
            "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "X_"}],
        }
    )
    c = container(dep)
    assert c["env"][-2:] == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "LOG_EXTRA", "value": "1"},
    ]
    assert c["envFrom"] == [{"prefix": "X_", "secretRef": {"name": "creds"}}]


def test_env_may_not_set_the_operators_variables() -> None:
    with pytest.raises(ValidationError, match="AUTOGLM_"):
        parse_spec(
            {
                "model": {"source": "/m"},
                "server": {"env": [{"name": "AUTOGLM_MODEL", "value": "x"}]},
            }
        )
    with pytest.raises(ValidationError, match="unique"):
        parse_spec(
            {
                "model": {"source": "/m"},
                "server": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
            }
        )


def test_pod_knobs_reach_the_pod() -> None:
    affinity = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "glm"}},
                    },
                }
            ]
        }
    }
    dep = deploy(
        server={
            "pod": {
                "labels": {"team": "nlp"},
                "annotations": {"example.com/owner": "nlp"},
                "serviceAccountName": "glm-runner",
                "priorityClassName": "inference-high",
                "imagePullSecrets": ["regcred"],
                "affinity": affinity,
                "topologySpreadConstraints": [
                    {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}
                ],
            }
        }
    )
    template = dep["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"]["team"] == "nlp"
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "glm"
    assert template["metadata"]["annotations"]["example.com/owner"] == "nlp"
    assert CHECKSUM_ANNOTATION in template["metadata"]["annotations"]
    assert pod["serviceAccountName"] == "glm-runner"
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "inference-high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["affinity"] == affinity
    (tsc,) = pod["topologySpreadConstraints"]
    # No labelSelector given: this AutoGLMDeployment's pods, every revision.
    assert tsc["labelSelector"] == {
        "matchLabels": {
            "app.kubernetes.io/component": "server",
            "app.kubernetes.io/instance": "glm",
            "app.kubernetes.io/name": "autoglm",
        }
    }
    # The selector is untouched by the pod labels.
    assert dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "glm"


@pytest.mark.parametrize(
    "key", ["app.kubernetes.io/instance", "serving.autoglm.io/revision", "prometheus.io/port"]
)
def test_pod_labels_may_not_take_the_operators_keys(key: str) -> None:
    for field in ("labels", "annotations"):
        with pytest.raises(ValidationError, match="operator's"):
            parse_spec({"model": {"source": "/m"}, "server": {"pod": {field: {key: "x"}}}})


# ---- every field is pod-affecting: revision and checksum -----------------------------------

CHANGES: list[dict[str, Any]] = [
    {"server": {"auth": {"apiKeysSecret": "k"}}},
    {"server": {"tls": {"secretName": "t"}}},
    {
        "model": {
            "source": "pvc://models/glm",
            "signature": {"publicKey": {"secret": "k", "key": "p"}},
        }
    },
    {"model": {"source": "pvc://models/glm", "quantization": "int8"}},
    {"server": {"chatTemplate": {"configMap": "c", "key": "t"}}},
    {"server": {"toolCallParser": "llama3_json"}},
    {"server": {"http": {"maxBodyBytes": 2048}}},
    {"server": {"compile": {"enabled": False}}},
    {"server": {"env": [{"name": "HF_TOKEN", "value": "x"}]}},
    {"server": {"envFrom": [{"configMapRef": {"name": "c"}}]}},
    {"server": {"pod": {"priorityClassName": "p"}}},
    {"server": {"pod": {"labels": {"a": "b"}}}},
]


@pytest.mark.parametrize("change", CHANGES)
def test_every_new_field_changes_the_revision_and_the_checksum(change: dict[str, Any]) -> None:
    base = parse_spec({"model": {"source": "pvc://models/glm"}})
    changed = parse_spec({"model": {"source": "pvc://models/glm"}, **change})
    assert compute_revision(changed) != compute_revision(base)
    assert compute_config_checksum(changed) != compute_config_checksum(base)


def test_unset_new_fields_keep_the_old_revision_and_checksum() -> None:
    # Values computed before these fields existed: an operator upgrade rolls no pod.
    spec = parse_spec({"model": {"source": "pvc://models/glm"}})
    assert compute_revision(spec) == compute_revision(
        parse_spec({"model": {"source": "pvc://models/glm"}, "server": {}})
    )
    assert "auth" not in spec.server.model_dump(by_alias=True, exclude_none=True)


def test_the_children_of_a_spec_with_every_feature_build() -> None:
    spec = parse_spec(
        {
            "model": {"source": "pvc://models/glm", "quantization": "auto"},
            "resources": {"gpus": 4},
            "server": {
                "auth": {"apiKeysSecret": "k"},
                "tls": {"secretName": "t", "clientCASecret": "t"},
                "compile": {"cacheVolume": {"claimName": "cc"}},
                "pod": {"labels": {"team": "x"}},
            },
        }
    )
    kinds = [c["kind"] for c in build_children(spec, OWNER)]
    assert "Deployment" in kinds


# ---- 7. network policy ----------------------------------------------------------------------


def peer(ns: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}


def test_network_policy_is_on_by_default_for_this_namespace_only() -> None:
    policy = build_network_policy(parse_spec({"model": {"source": "/m"}}), OWNER)
    assert policy is not None
    assert policy["metadata"]["name"] == "glm"
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "glm"
    assert "serving.autoglm.io/revision" not in spec["podSelector"]["matchLabels"]
    assert spec["ingress"] == [
        {
            "from": [{"podSelector": {}}],
            "ports": [{"port": 8001, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}],
        }
    ]


def test_network_policy_namespaces_gateway_and_prometheus() -> None:
    spec = parse_spec(
        {
            "model": {"source": "/m"},
            "server": {"grpcPort": 9001, "httpPort": 9000, "metricsPort": 9002},
            "traffic": {"provider": "gatewayAPI", "gateway": {"name": "gw", "namespace": "edge"}},
            "networkPolicy": {
                "allowSameNamespace": False,
                "fromNamespaces": ["mesh", "edge"],
                "fromPrometheusNamespaces": ["monitoring"],
            },
        }
    )
    policy = build_network_policy(spec, OWNER)
    assert policy is not None
    serving, metrics = policy["spec"]["ingress"]
    assert serving["from"] == [peer("edge"), peer("mesh")]
    assert serving["ports"] == [
        {"port": 9001, "protocol": "TCP"},
        {"port": 9000, "protocol": "TCP"},
    ]
    assert metrics == {"from": [peer("monitoring")], "ports": [{"port": 9002, "protocol": "TCP"}]}


def test_network_policy_gateway_in_our_namespace_adds_nothing() -> None:
    spec = parse_spec(
        {
            "model": {"source": "/m"},
            "traffic": {"provider": "gatewayAPI", "gateway": {"name": "gw"}},
        }
    )
    policy = build_network_policy(spec, OWNER)
    assert policy is not None
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]


def test_network_policy_closed_and_disabled() -> None:
    closed = parse_spec({"model": {"source": "/m"}, "networkPolicy": {"allowSameNamespace": False}})
    policy = build_network_policy(closed, OWNER)
    assert policy is not None and "ingress" not in policy["spec"]  # deny all ingress
    off = parse_spec({"model": {"source": "/m"}, "networkPolicy": {"enabled": False}})
    assert build_network_policy(off, OWNER) is None
    assert "NetworkPolicy" not in [c["kind"] for c in build_children(off, OWNER)]
    # Not pod-affecting: the revision stays.
    assert compute_revision(off) == compute_revision(parse_spec({"model": {"source": "/m"}}))


# ---- the canary -------------------------------------------------------------------------------


def test_a_canary_overrides_template_parser_http_compile_and_the_model_features() -> None:
    spec = parse_spec(
        {
            "model": {"source": "/m", "quantization": "none"},
            "server": {
                "auth": {"apiKeysSecret": "k"},
                "toolCallParser": "glm4",
                "env": [{"name": "A", "value": "1"}],
            },
            "canary": {
                "weight": 10,
                "model": {"source": "/m", "quantization": "fp8"},
                "server": {
                    "chatTemplate": {"configMap": "tpl2", "key": "t"},
                    "toolCallParser": "llama3_json",
                    "http": {"requestTimeoutSeconds": 30},
                    "compile": {"enabled": False},
                },
            },
        }
    )
    canary = compute_canary_spec(spec)
    assert canary.model.quantization == "fp8"
    server = canary.server
    assert server.chat_template is not None and server.chat_template.config_map == "tpl2"
    assert server.tool_call_parser == "llama3_json"
    assert server.http is not None and server.http.request_timeout_seconds == 30
    assert server.compile is not None and server.compile.enabled is False
    # Shared with the stable: the same clients reach both revisions.
    assert server.auth == spec.server.auth and server.env == spec.server.env
    assert compute_revision(canary) != compute_revision(spec)
    e = env(build_deployment(canary, OWNER))
    assert e["AUTOGLM_QUANTIZATION"] == "fp8"
    assert e["AUTOGLM_TOOL_CALL_PARSER"] == "llama3_json"
    assert e["AUTOGLM_COMPILE"] == "false"
    assert e["AUTOGLM_API_KEYS_FILE"] == "/etc/autoglm/api-keys/keys.json"


def test_a_canary_without_server_overrides_keeps_the_features() -> None:
    spec = parse_spec(
        {
            "model": {"source": "/m"},
            "server": {"tls": {"secretName": "t"}, "compile": {"enabled": False}},
            "canary": {"weight": 10, "image": "other:1"},
        }
    )
    canary = compute_canary_spec(spec)
    assert canary.server.tls == spec.server.tls
    assert canary.server.compile == spec.server.compile
    assert canary.server.image == "other:1"


# ---- the contract with the server: every variable is a flag it parses ----------------------


def test_the_server_parses_every_variable_the_operator_sets() -> None:
    # The operator never imports the server (its image has no torch); the test may.
    cli = pytest.importorskip("autoglm_server.cli")
    dep = deploy(
        model={
            "source": "pvc://models/glm",
            "quantization": "int4",
            "signature": {
                "publicKey": {"secret": "k", "key": "key.pub"},
                "bundle": {"configMap": "s", "key": "model.sig"},
            },
        },
        resources={"gpus": 4},
        server={
            "auth": {"apiKeysSecret": "keys", "metricsAuth": True},
            "tls": {"secretName": "t", "clientCASecret": "ca"},
            "chatTemplate": {"configMap": "c", "key": "t.jinja"},
            "toolCallParser": "llama3_json",
            "http": {"maxBodyBytes": 2048, "requestTimeoutSeconds": 60},
            "compile": {"enabled": False, "cacheVolume": {"emptyDir": True}},
        },
    )
    environ = {k: v for k, v in env(dep).items() if k.startswith("AUTOGLM_")}
    known = {flag.env for flag in cli.FLAGS}
    assert set(environ) <= known, set(environ) - known
    args = cli.build_parser(environ).parse_args([])
    assert args.quantization == "int4"
    assert args.tensor_parallel_size == 4
    assert args.api_keys_file == "/etc/autoglm/api-keys/keys.json"
    assert args.metrics_auth is True
    assert args.tls_cert_file == "/etc/autoglm/tls/tls.crt"
    assert args.tls_key_file == "/etc/autoglm/tls/tls.key"
    assert args.tls_client_ca_file == "/etc/autoglm/client-ca/ca.crt"
    assert args.model_signing_public_key == "/etc/autoglm/signing-key/key.pub"
    assert args.model_signature == "/etc/autoglm/model-signature/model.sig"
    assert args.chat_template == "/etc/autoglm/chat-template/t.jinja"
    assert args.tool_call_parser == "llama3_json"
    assert args.http_max_body_bytes == 2048
    assert args.http_request_timeout_seconds == 60
    assert args.compile is False
    assert args.compile_cache_dir == "/var/cache/autoglm/compile"
    assert args.model == "/models/glm"


def test_a_revision_record_brings_every_feature_back() -> None:
    spec = parse_spec(
        {
            "model": {
                "source": "pvc://models/glm",
                "quantization": "fp8",
                "signature": {"publicKey": {"secret": "k", "key": "p"}, "bundlePath": "m.sig"},
            },
            "server": {
                "auth": {"apiKeysSecret": "keys"},
                "tls": {"secretName": "t", "clientCASecret": "ca"},
                "env": [
                    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "h", "key": "t"}}}
                ],
                "pod": {"affinity": {"nodeAffinity": {}}, "labels": {"a": "b"}},
                "compile": {"cacheVolume": {"claimName": "cc"}},
            },
        }
    )
    record = build_revision_record(compute_revision(spec), spec, 0.0)
    back = compute_revision_spec(
        parse_spec({"model": {"source": "/other"}}), record["model"], record["server"]
    )
    assert back.model == spec.model and back.server == spec.server
    assert compute_revision(back) == compute_revision(spec)
