"""The pydantic models and the CRD schema say the same thing, in both directions."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from autoglm_operator.spec import (
    AutoGLMDeploymentSpec,
    AutoGLMDeploymentStatus,
    compute_model_version,
    parse_source,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[3]
CRD_PATH = ROOT / "crds" / "serving.autoglm.io_autoglmdeployments.yaml"
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def load_version_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = (
        version["openAPIV3Schema"]
        if "openAPIV3Schema" in version
        else version["schema"]["openAPIV3Schema"]
    )
    return schema


SCHEMA = load_version_schema()


# ---- the mirror -------------------------------------------------------------------


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for X | None."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _constraint(info: FieldInfo, name: str) -> Any:
    for meta in info.metadata:
        if hasattr(meta, name) and getattr(meta, name) is not None:
            return getattr(meta, name)
    return None


def _scalar_type(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return "string" if all(isinstance(v, str) for v in values) else "?"
    if get_origin(annotation) is typing.Annotated:
        return _scalar_type(get_args(annotation)[0])
    return {str: "string", int: "integer", bool: "boolean", float: "number"}.get(annotation, "?")


def _annotated_info(annotation: Any) -> list[Any]:
    if get_origin(annotation) is typing.Annotated:
        return list(get_args(annotation)[1:])
    return []


def check_mirror(
    schema: dict[str, Any], model: type[BaseModel], path: str, problems: list[str]
) -> None:
    props: dict[str, Any] = schema.get("properties", {})
    fields = {info.alias or name: (name, info) for name, info in model.model_fields.items()}
    for missing in sorted(set(props) - set(fields)):
        problems.append(f"{path}.{missing}: in the CRD, not in {model.__name__}")
    for missing in sorted(set(fields) - set(props)):
        problems.append(f"{path}.{missing}: in {model.__name__}, not in the CRD")
    required = set(schema.get("required", []))
    for alias in sorted(set(props) & set(fields)):
        _, info = fields[alias]
        sub = props[alias]
        where = f"{path}.{alias}"
        # required <-> no default
        if (alias in required) != info.is_required():
            problems.append(
                f"{where}: required in CRD={alias in required}, in pydantic={info.is_required()}"
            )
        # defaults
        if "default" in sub:
            if info.is_required():
                problems.append(f"{where}: CRD default but pydantic requires it")
            else:
                value = info.get_default(call_default_factory=True)
                if isinstance(value, BaseModel):
                    value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
                    expected = apply_defaults(sub, sub["default"])
                else:
                    expected = sub["default"]
                if value != expected:
                    problems.append(f"{where}: default CRD={expected!r} pydantic={value!r}")
        elif not info.is_required() and info.get_default(call_default_factory=True) is not None:
            problems.append(
                f"{where}: pydantic default {info.get_default(call_default_factory=True)!r}, none in CRD"
            )
        inner, _optional = _unwrap(info.annotation)
        check_type(sub, inner, info, where, problems)


def check_type(
    sub: dict[str, Any], inner: Any, info: FieldInfo | None, where: str, problems: list[str]
) -> None:
    stype = sub.get("type")
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        if stype != "object":
            problems.append(f"{where}: CRD type {stype}, pydantic model {inner.__name__}")
        check_mirror(sub, inner, where, problems)
        return
    origin = get_origin(inner)
    if origin is list:
        if stype != "array":
            problems.append(f"{where}: CRD type {stype}, pydantic list")
        (item,) = get_args(inner)
        check_type(sub["items"], item, None, f"{where}[]", problems)
        if info is not None and _constraint(info, "max_length") != sub.get("maxItems"):
            problems.append(
                f"{where}: maxItems CRD={sub.get('maxItems')} pydantic={_constraint(info, 'max_length')}"
            )
        return
    if origin is dict and get_args(inner)[1] is Any:
        if stype != "object" or not sub.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{where}: CRD is not an object that keeps unknown fields")
        return
    if origin is dict:
        if stype != "object" or "additionalProperties" not in sub:
            problems.append(f"{where}: CRD is not a map")
        _key, value = get_args(inner)
        check_type(sub["additionalProperties"], value, None, f"{where}{{}}", problems)
        if info is not None and _constraint(info, "max_length") != sub.get("maxProperties"):
            problems.append(
                f"{where}: maxProperties CRD={sub.get('maxProperties')} pydantic={_constraint(info, 'max_length')}"
            )
        return
    ptype = _scalar_type(inner)
    if ptype != stype:
        problems.append(f"{where}: CRD type {stype}, pydantic {ptype}")
    literal = inner if get_origin(inner) is Literal else None
    if literal is not None and list(get_args(literal)) != sub.get("enum"):
        problems.append(f"{where}: enum CRD={sub.get('enum')} pydantic={list(get_args(literal))}")
    if literal is None and "enum" in sub:
        problems.append(f"{where}: CRD enum but pydantic is not a Literal")
    metas = list(info.metadata) if info is not None else []
    metas += _annotated_info(inner)
    found: dict[str, Any] = {}
    for meta in metas:
        for attr in ("ge", "le", "min_length", "max_length", "pattern"):
            if getattr(meta, attr, None) is not None:
                found[attr] = getattr(meta, attr)
        # Annotated[str, Field(...)] keeps its constraints in FieldInfo.metadata
        for inner_meta in getattr(meta, "metadata", []) or []:
            for attr in ("ge", "le", "min_length", "max_length", "pattern"):
                if getattr(inner_meta, attr, None) is not None:
                    found[attr] = getattr(inner_meta, attr)
    pairs = {
        "ge": "minimum",
        "le": "maximum",
        "min_length": "minLength",
        "max_length": "maxLength",
        "pattern": "pattern",
    }
    for attr, key in pairs.items():
        if found.get(attr) != sub.get(key):
            problems.append(f"{where}: {key} CRD={sub.get(key)!r} pydantic={found.get(attr)!r}")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural-schema defaulting, as the API server does it."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = sub["default"]
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def test_spec_schema_and_model_mirror_each_other() -> None:
    problems: list[str] = []
    check_mirror(SCHEMA["properties"]["spec"], AutoGLMDeploymentSpec, "spec", problems)
    assert problems == []


def test_status_schema_and_model_mirror_each_other() -> None:
    problems: list[str] = []
    check_mirror(SCHEMA["properties"]["status"], AutoGLMDeploymentStatus, "status", problems)
    assert problems == []


def test_mirror_check_catches_a_missing_field() -> None:
    schema = {"type": "object", "properties": {"extra": {"type": "string", "description": "x"}}}

    class Empty(BaseModel):
        pass

    problems: list[str] = []
    check_mirror(schema, Empty, "spec", problems)
    assert problems == ["spec.extra: in the CRD, not in Empty"]


def _walk(schema: dict[str, Any], path: str) -> typing.Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description() -> None:
    undocumented = [
        path
        for path, sub in _walk(SCHEMA["properties"]["spec"], "spec")
        if "description" not in sub and not path.endswith("{}")
    ] + [
        path
        for path, sub in _walk(SCHEMA["properties"]["status"], "status")
        if "description" not in sub
    ]
    assert undocumented == []


def test_every_string_and_list_in_the_spec_is_bounded_for_cel_cost() -> None:
    unbounded = [
        path
        for path, sub in _walk(SCHEMA["properties"]["spec"], "spec")
        if (sub.get("type") == "string" and "maxLength" not in sub and "enum" not in sub)
        or (sub.get("type") == "array" and "maxItems" not in sub)
    ]
    assert unbounded == []


def test_crd_metadata() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["metadata"]["name"] == "autoglmdeployments.serving.autoglm.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["agd", "autoglm"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Ready", "Model", "Replicas", "Canary", "Age"]


# ---- examples and invalid specs, offline --------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate_against_schema_and_model(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc["spec"], SCHEMA["properties"]["spec"])
    spec = parse_spec(apply_defaults(SCHEMA["properties"]["spec"], doc["spec"]))
    # What the API server stores (schema defaults applied) is what pydantic fills in.
    stored = apply_defaults(SCHEMA["properties"]["spec"], doc["spec"])
    assert spec.model_dump(mode="json", by_alias=True, exclude_none=True) == stored


def test_three_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"minimal", "glm-1gpu", "autoscaling"}


INVALID_FOR_PYDANTIC = [
    ({"model": {"source": "s3://bucket/model"}}, "hf://, pvc:// or /"),
    ({"model": {"source": "hf://gpt2"}}, "hf://org/name"),
    ({"model": {"source": "pvc://Bad_Claim/x"}}, "pvc://claim-name"),
    ({"model": {"source": "/m", "hfCacheClaim": "cache"}}, "hfCacheClaim"),
    (
        {"model": {"source": "/m"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
        "minReplicas must be <=",
    ),
    ({"model": {"source": "/m"}, "autoscaling": {"maxReplicas": 3}}, "at least one target"),
    (
        {
            "model": {"source": "/m"},
            "autoscaling": {
                "maxReplicas": 3,
                "targets": [
                    {"type": "queueDepth", "averageValue": "1"},
                    {"type": "queueDepth", "averageValue": "2"},
                ],
            },
        },
        "at most once",
    ),
    (
        {
            "model": {"source": "/m"},
            "autoscaling": {
                "maxReplicas": 2,
                "targets": [{"type": "queueDepth", "averageValue": "1", "source": "dcgm"}],
            },
        },
        "only valid for the gpuUtilization",
    ),
    ({"model": {"source": "/m"}, "server": {"grpcPort": 8000}}, "must all differ"),
    (
        {
            "model": {"source": "/m"},
            "server": {"batching": {"maxBatchSize": 64, "maxBatchTokens": 8}},
        },
        "maxBatchTokens must be >=",
    ),
    ({"model": {"source": "/m", "dtype": "fp8"}}, "dtype"),
    ({"model": {"source": "/m", "maxModelLen": 1}}, "maxModelLen"),
    ({"model": {"source": "/m"}, "server": {"batching": {"maxQueueLength": 0}}}, "maxQueueLength"),
    ({"model": {"source": "/m"}, "resources": {"gpus": 0}}, "gpus"),
    (
        {
            "model": {"source": "/m"},
            "resources": {"tolerations": [{"operator": "Exists", "value": "x"}]},
        },
        "value must be empty",
    ),
    ({"model": {"source": "/m"}, "bogus": 1}, "bogus"),
]
M = {"source": "/m"}
GW = {"name": "gw"}
INVALID_FOR_PYDANTIC += [
    ({"model": M, "canary": {"image": "x"}}, "exactly one of weight or steps"),
    ({"model": M, "canary": {"weight": 5, "steps": [{"setWeight": 5}]}}, "exactly one of weight"),
    ({"model": M, "canary": {"weight": 101}}, "weight"),
    ({"model": M, "canary": {"steps": []}}, "steps"),
    ({"model": M, "canary": {"steps": [{}]}}, "exactly one of setWeight, pause, analysis"),
    (
        {"model": M, "canary": {"steps": [{"setWeight": 5, "pause": {}}]}},
        "exactly one of setWeight, pause, analysis",
    ),
    ({"model": M, "canary": {"steps": [{"setWeight": -1}]}}, "setWeight"),
    ({"model": M, "canary": {"steps": [{"pause": {"duration": "soon"}}]}}, "duration"),
    ({"model": M, "canary": {"weight": 5, "minReplicas": 3, "maxReplicas": 2}}, "minReplicas"),
    ({"model": M, "canary": {"weight": 5, "analysis": {"maxErrorRate": 2}}}, "maxErrorRate"),
    (
        {
            "model": M,
            "canary": {"weight": 5, "analysis": {"metrics": [{"name": "x", "query": "q"}]}},
        },
        "max, min or both",
    ),
    ({"model": M, "canary": {"weight": 5, "strategy": "yolo"}}, "strategy"),
    (
        {"model": M, "canary": {"weight": 5, "server": {"batching": {"maxBatchTokens": 8}}}},
        "maxBatchTokens must be >= maxBatchSize",
    ),
    ({"model": M, "canary": {"weight": 5, "model": {"source": "s3://x"}}}, "hf://, pvc:// or /"),
    ({"model": M, "traffic": {"provider": "gatewayAPI"}}, "traffic.gateway is required"),
    ({"model": M, "traffic": {"provider": "linkerd"}}, "provider"),
    ({"model": M, "rollout": {"revisionHistoryLimit": 0}}, "revisionHistoryLimit"),
    ({"model": M, "rollbackTo": "Not_A_Name"}, "rollbackTo"),
]
KEY = {"secret": "k", "key": "pub"}
INVALID_FOR_PYDANTIC += [
    ({"model": M, "resources": {"gpus": 3}}, "1, 2, 4 or 8"),
    ({"model": {**M, "quantization": "fp4"}}, "quantization"),
    (
        {"model": {**M, "signature": {"publicKey": {"secret": "a", "configMap": "b", "key": "k"}}}},
        "exactly one of configMap or secret",
    ),
    (
        {"model": {"source": "hf://a/b", "signature": {"publicKey": KEY, "bundlePath": "m.sig"}}},
        "needs a pvc:// or image path",
    ),
    (
        {"model": {**M, "signature": {"publicKey": KEY, "bundlePath": "../m.sig"}}},
        "relative to the model directory",
    ),
    (
        {"model": {**M, "signature": {"publicKey": KEY, "bundle": KEY, "bundlePath": "m"}}},
        "bundle or bundlePath, not both",
    ),
    ({"model": M, "server": {"auth": {"metricsAuth": True}}}, "apiKeysSecret"),
    ({"model": M, "server": {"tls": {"secretName": "Not_A_Name"}}}, "secretName"),
    ({"model": M, "server": {"toolCallParser": "hermes"}}, "toolCallParser"),
    ({"model": M, "server": {"http": {"maxBodyBytes": 10}}}, "maxBodyBytes"),
    (
        {"model": M, "server": {"compile": {"cacheVolume": {"claimName": "c", "emptyDir": True}}}},
        "exactly one of claimName",
    ),
    ({"model": M, "server": {"env": [{"name": "AUTOGLM_X", "value": "1"}]}}, "AUTOGLM_"),
    ({"model": M, "server": {"env": [{"name": "A"}, {"name": "A"}]}}, "unique"),
    ({"model": M, "server": {"envFrom": [{"prefix": "X_"}]}}, "exactly one of secretRef"),
    (
        {"model": M, "server": {"pod": {"labels": {"app.kubernetes.io/instance": "x"}}}},
        "operator's",
    ),
    ({"model": M, "networkPolicy": {"fromNamespaces": ["Not A Namespace"]}}, "fromNamespaces"),
]
# Path-like digest keys the server would refuse at start (crash-looping pods).
BAD_DIGEST_KEYS = ["../../../etc/shadow", "/proc/self/environ", "", "a/../b", "..", "x" * 513]
INVALID_FOR_PYDANTIC += [
    ({"model": {"source": "/m", "sha256": {key: "a" * 64}}}, "relative to the model directory")
    for key in BAD_DIGEST_KEYS
]


@pytest.mark.parametrize(("spec", "needle"), INVALID_FOR_PYDANTIC)
def test_pydantic_rejects_what_the_crd_rejects(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(spec)
    assert needle in str(info.value)


def test_parse_source() -> None:
    assert parse_source("hf://THUDM/glm-4@v1.0").repo == "THUDM/glm-4"
    assert parse_source("hf://THUDM/glm-4@v1.0").revision == "v1.0"
    assert parse_source("hf://THUDM/glm-4").revision is None
    pvc = parse_source("pvc://models/glm/4")
    assert (pvc.scheme, pvc.claim, pvc.path) == ("pvc", "models", "glm/4")
    assert parse_source("/opt/model").scheme == "path"


def test_model_version() -> None:
    assert compute_model_version(parse_spec({"model": {"source": "hf://a/b@rev1"}}).model) == "rev1"
    assert compute_model_version(parse_spec({"model": {"source": "hf://a/b"}}).model) == "main"
    assert compute_model_version(parse_spec({"model": {"source": "/m"}}).model) == "local"
    assert (
        compute_model_version(parse_spec({"model": {"source": "/m", "version": "v7"}}).model)
        == "v7"
    )


@pytest.mark.parametrize("key", ["model.safetensors", "sub/dir/x.bin", "a..b", ".hidden"])
def test_digest_keys_inside_the_model_are_accepted(key: str) -> None:
    assert parse_spec({"model": {"source": "/m", "sha256": {key: "a" * 64}}}).model.sha256


VALID_CANARY = {
    "model": {"source": "hf://org/glm@v1"},
    "canary": {
        "model": {"source": "hf://org/glm@v2"},
        "steps": [
            {"setWeight": 10},
            {"pause": {"duration": "30s"}},
            {"analysis": {"interval": "10s"}},
            {"pause": {}},
        ],
        "analysis": {"metrics": [{"name": "kv", "query": "sum(x{pod=~'{{pods}}'})", "max": 0.9}]},
    },
    "traffic": {"provider": "gatewayAPI", "gateway": {"name": "gw", "sectionName": "http"}},
    "rollbackTo": "0a1b2c3d",
}


def test_a_canary_spec_is_accepted_by_schema_and_model_alike() -> None:
    schema = SCHEMA["properties"]["spec"]
    jsonschema.validate(VALID_CANARY, schema)
    stored = apply_defaults(schema, VALID_CANARY)
    spec = parse_spec(stored)
    assert spec.model_dump(mode="json", by_alias=True, exclude_none=True) == stored
    assert spec.canary is not None and spec.canary.steps is not None
    assert stored["canary"]["steps"][2]["analysis"]["successfulIntervals"] == 3
    assert stored["canary"]["analysis"]["maxErrorRate"] == 0.05
    assert stored["rollout"] == {"revisionHistoryLimit": 3, "instantRollbackWindow": "10m"}


def test_canary_spec_merges_overrides() -> None:
    from autoglm_operator.spec import compute_canary_spec

    spec = parse_spec(
        {
            "model": {"source": "/m"},
            "server": {"image": "img:1", "batching": {"maxBatchSize": 8, "maxBatchTokens": 64}},
            "canary": {"weight": 5, "image": "img:2", "server": {"batching": {"maxBatchSize": 4}}},
        }
    )
    merged = compute_canary_spec(spec)
    assert merged.server.image == "img:2"
    assert (merged.server.batching.max_batch_size, merged.server.batching.max_batch_tokens) == (
        4,
        64,
    )
    assert merged.model == spec.model
    assert merged.server.grpc_port == spec.server.grpc_port


def test_parse_duration() -> None:
    from autoglm_operator.spec import parse_duration

    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2.5s") == 2.5
