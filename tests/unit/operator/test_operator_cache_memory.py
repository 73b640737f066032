"""What the watch caches keep per object: equal to the trimmed object, strings shared."""

from __future__ import annotations

import copy
import json
import sys
import tracemalloc
from typing import Any

from autoglm_operator.cache import (
    INTERN_MAX,
    build_trimmed_child,
    build_trimmed_node,
    build_trimmed_owner,
    build_trimmed_pod,
    compute_interned,
)
from autoglm_operator.handlers import limit_malloc_arenas
from autoglm_operator.settings import Settings, SettingsError


def deployment(i: int) -> dict[str, Any]:
    """A Deployment as the watch delivers it: a fresh parse, so no string is shared."""
    container = {
        "name": "server",
        "image": "ghcr.io/autoglm/server:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}],
        "env": [{"name": f"AUTOGLM_VAR_{k}", "value": f"value-{k}"} for k in range(20)],
    }
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"m-{i:04d}",
            "namespace": "scale",
            "labels": {"app.kubernetes.io/instance": f"m-{i:04d}"},
            "managedFields": [
                {"manager": "autoglm-operator", "operation": "Apply", "fieldsV1": {"f:spec": {}}},
                {"manager": "kube-controller-manager", "fieldsV1": {"f:status": {}}},
            ],
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": [container]}}},
        "status": {"replicas": 1, "readyReplicas": 1},
    }
    return dict(json.loads(json.dumps(body)))


def test_interned_copy_is_equal_and_shares_keys_and_short_values() -> None:
    a, b = compute_interned(deployment(1)), compute_interned(deployment(2))
    assert a == deployment(1)
    ka = next(k for k in a["spec"] if k == "template")
    kb = next(k for k in b["spec"] if k == "template")
    assert ka is kb
    img_a = a["spec"]["template"]["spec"]["containers"][0]["image"]
    img_b = b["spec"]["template"]["spec"]["containers"][0]["image"]
    assert img_a is img_b
    long = "x" * (INTERN_MAX + 1)
    assert compute_interned({"k": long})["k"] is long  # long values are kept as they are
    assert compute_interned([1, 2.5, None, True, "s"]) == [1, 2.5, None, True, "s"]


def test_trimmed_objects_are_interned_and_unchanged_in_content() -> None:
    raw = deployment(3)
    before = copy.deepcopy(raw)
    child = build_trimmed_child(raw)
    assert raw == before  # the watch's body is not modified
    assert child["spec"] == raw["spec"] and child["status"] == raw["status"]
    assert child["spec"] is not raw["spec"]  # a copy: the event's body can be freed
    assert child["metadata"]["managedFields"][1] == {"manager": "kube-controller-manager"}
    owner = build_trimmed_owner({"metadata": {"name": "m", "managedFields": []}, "spec": {}})
    assert owner == {"metadata": {"name": "m"}, "spec": {}}
    pod = build_trimmed_pod({"metadata": {"name": "p"}, "status": {"phase": "Running"}})
    node = build_trimmed_node({"metadata": {"name": "n"}, "status": {"allocatable": {"a": "1"}}})
    assert pod["status"] == {"phase": "Running"} and node["status"]["allocatable"] == {"a": "1"}
    assert sys.intern("Running") is pod["status"]["phase"]


def test_the_cache_of_many_deployments_takes_much_less_memory_interned() -> None:
    raws = [deployment(i) for i in range(200)]
    tracemalloc.start()
    plain = [json.loads(json.dumps(r)) for r in raws]
    plain_bytes = tracemalloc.get_traced_memory()[0]
    del plain
    tracemalloc.stop()
    tracemalloc.start()
    shared = [build_trimmed_child(r) for r in raws]
    shared_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(shared) == 200
    assert shared_bytes < 0.7 * plain_bytes, (shared_bytes, plain_bytes)


def test_malloc_arenas_setting() -> None:
    assert Settings().malloc_arenas == 2
    assert Settings.from_environ({"AUTOGLM_OPERATOR_MALLOC_ARENAS": "0"}).malloc_arenas == 0
    try:
        Settings.from_environ({"AUTOGLM_OPERATOR_MALLOC_ARENAS": "-1"})
    except SettingsError as exc:
        assert "AUTOGLM_OPERATOR_MALLOC_ARENAS" in str(exc)
    else:
        raise AssertionError("a negative arena count was accepted")
    assert limit_malloc_arenas(0) is False
    # glibc (the operator image, CI, this machine) accepts it; another libc says no.
    assert limit_malloc_arenas(8) in (True, False)
