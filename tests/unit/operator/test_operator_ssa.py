"""Would an apply change anything? The owned view of a live object vs the desired manifest."""

from __future__ import annotations

import copy
from typing import Any

from autoglm_operator.ssa import (
    compute_equal,
    compute_handover,
    compute_needs_apply,
    compute_owned_view,
    find_managed_fields,
)

MANAGER = "autoglm-operator"

DESIRED: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "glm",
        "namespace": "ns",
        "labels": {"app": "glm"},
        "ownerReferences": [
            {
                "apiVersion": "serving.autoglm.io/v1alpha1",
                "kind": "AutoGLMDeployment",
                "name": "glm",
                "uid": "u1",
                "controller": True,
            }
        ],
    },
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "server",
                        "image": "img:1",
                        "env": [{"name": "A", "value": "1"}],
                        "resources": {"requests": {"cpu": "0.5", "memory": "1Gi"}},
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
                "enableServiceLinks": False,
            }
        },
    },
}

FIELDS: dict[str, Any] = {
    "f:metadata": {
        "f:labels": {"f:app": {}},
        "f:ownerReferences": {'k:{"uid":"u1"}': {}},
    },
    "f:spec": {
        "f:replicas": {},
        "f:template": {
            "f:spec": {
                "f:containers": {
                    'k:{"name":"server"}': {
                        ".": {},
                        "f:name": {},
                        "f:image": {},
                        "f:env": {'k:{"name":"A"}': {".": {}, "f:name": {}, "f:value": {}}},
                        "f:resources": {"f:requests": {"f:cpu": {}, "f:memory": {}}},
                    }
                },
                "f:volumes": {'k:{"name":"tmp"}': {".": {}, "f:emptyDir": {}, "f:name": {}}},
                "f:enableServiceLinks": {},
            }
        },
    },
}


def live_from(desired: dict[str, Any]) -> dict[str, Any]:
    """What the API server would store: defaults added, quantities canonical, managedFields."""
    live = copy.deepcopy(desired)
    live["metadata"]["uid"] = "child-uid"
    live["metadata"]["resourceVersion"] = "42"
    live["metadata"]["managedFields"] = [
        {
            "manager": MANAGER,
            "operation": "Apply",
            "apiVersion": "apps/v1",
            "fieldsType": "FieldsV1",
            "fieldsV1": copy.deepcopy(FIELDS),
        },
        {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "subresource": "status",
            "fieldsV1": {"f:status": {}},
        },
    ]
    c = live["spec"]["template"]["spec"]["containers"][0]
    c["resources"]["requests"]["cpu"] = "500m"  # canonical form
    c["terminationMessagePath"] = "/dev/termination-log"  # defaulted, not ours
    c["imagePullPolicy"] = "IfNotPresent"
    live["spec"]["strategy"] = {"type": "RollingUpdate"}
    live["status"] = {"replicas": 2}
    return live


def test_unchanged_object_needs_no_apply() -> None:
    assert compute_needs_apply(DESIRED, live_from(DESIRED), MANAGER) is False


def test_missing_object_needs_apply() -> None:
    assert compute_needs_apply(DESIRED, None, MANAGER) is True


def test_object_we_never_applied_needs_apply() -> None:
    live = live_from(DESIRED)
    live["metadata"]["managedFields"] = live["metadata"]["managedFields"][1:]
    assert compute_needs_apply(DESIRED, live, MANAGER) is True


def test_hand_edit_moves_ownership_and_needs_apply() -> None:
    live = live_from(DESIRED)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "img:hacked"
    del live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"][
        "f:containers"
    ]['k:{"name":"server"}']["f:image"]
    live["metadata"]["managedFields"].append(
        {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:spec": {}}}
    )
    assert compute_needs_apply(DESIRED, live, MANAGER) is True


def test_changed_desired_value_needs_apply() -> None:
    want = copy.deepcopy(DESIRED)
    want["spec"]["replicas"] = 3
    assert compute_needs_apply(want, live_from(DESIRED), MANAGER) is True


def test_field_we_no_longer_want_needs_apply() -> None:
    want = copy.deepcopy(DESIRED)
    del want["spec"]["replicas"]
    assert compute_needs_apply(want, live_from(DESIRED), MANAGER) is True


def test_new_list_item_needs_apply() -> None:
    want = copy.deepcopy(DESIRED)
    want["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "B", "value": "2"})
    assert compute_needs_apply(want, live_from(DESIRED), MANAGER) is True


def test_other_managers_fields_are_ignored() -> None:
    live = live_from(DESIRED)
    live["spec"]["template"]["spec"]["containers"][0]["env"].insert(
        0, {"name": "FROM_SOMEONE", "value": "x"}
    )
    live["metadata"]["labels"]["someone"] = "else"
    assert compute_needs_apply(DESIRED, live, MANAGER) is False


def test_owned_view_cuts_to_our_fields() -> None:
    live = live_from(DESIRED)
    fields = find_managed_fields(live, MANAGER)
    assert fields is not None
    view = compute_owned_view(live, fields)
    container = view["spec"]["template"]["spec"]["containers"][0]
    assert "terminationMessagePath" not in container
    assert "strategy" not in view["spec"]
    assert "status" not in view


def test_omitted_zero_values_equal_false_only_when_the_object_lacks_the_key() -> None:
    # The API server dropped an omitempty zero: absent from the object, equal.
    assert compute_equal({"a": False, "b": 1}, {"b": 1})
    assert compute_equal({"a": False, "b": 1}, {"b": 1}, whole={"b": 1, "c": 2})
    assert not compute_equal({"a": True, "b": 1}, {"b": 1})
    # Missing from our view but present in the object: another manager owns it now.
    assert not compute_equal({"a": False, "b": 1}, {"b": 1}, whole={"a": True, "b": 1})
    assert not compute_equal({"a": 0}, {}, whole={"a": 3})
    assert not compute_equal({"a": False}, {}, whole={"a": False})


def hand_edit(live: dict[str, Any], path: list[str], value: Any, manager: str) -> None:
    """What the API server does on an Update by ``manager``: the value changes, ownership moves."""
    obj, owned = live, live["metadata"]["managedFields"][0]["fieldsV1"]
    for step in path[:-1]:
        if isinstance(obj, list):
            (obj,) = [i for i in obj if i.get("name") == step]
            owned = owned[f'k:{{"name":"{step}"}}']
        else:
            obj, owned = obj[step], owned[f"f:{step}"]
    obj[path[-1]] = value
    del owned[f"f:{path[-1]}"]
    live["metadata"]["managedFields"].append(
        {"manager": manager, "operation": "Update", "fieldsV1": {}}
    )


def test_hand_edit_of_a_false_field_needs_apply() -> None:
    live = live_from(DESIRED)
    hand_edit(live, ["spec", "template", "spec", "enableServiceLinks"], True, "kubectl-edit")
    assert compute_needs_apply(DESIRED, live, MANAGER) is True


def test_hand_edit_of_a_false_field_in_a_list_item_needs_apply() -> None:
    want = copy.deepcopy(DESIRED)
    want["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
    }
    live = live_from(want)
    live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"][
        "f:containers"
    ]['k:{"name":"server"}']["f:securityContext"] = {
        ".": {},
        "f:allowPrivilegeEscalation": {},
        "f:runAsNonRoot": {},
    }
    assert compute_needs_apply(want, live, MANAGER) is False
    path = ["spec", "template", "spec", "containers", "server", "securityContext"]
    hand_edit(live, [*path, "allowPrivilegeEscalation"], True, "kubectl-patch")
    assert compute_needs_apply(want, live, MANAGER) is True


def test_scale_from_zero_by_hand_needs_apply() -> None:
    want = copy.deepcopy(DESIRED)
    want["spec"]["replicas"] = 0
    live = live_from(want)
    assert compute_needs_apply(want, live, MANAGER) is False
    hand_edit(live, ["spec", "replicas"], 3, "kubectl")  # kubectl scale --replicas=3
    live["metadata"]["managedFields"][-1]["subresource"] = "scale"
    assert compute_needs_apply(want, live, MANAGER) is True


def test_quantities_compare_by_value_only_for_quantity_keys() -> None:
    assert compute_equal({"cpu": "0.5"}, {"cpu": "500m"})
    assert compute_equal({"memory": "1024Mi"}, {"memory": "1Gi"})
    assert not compute_equal({"cpu": "1"}, {"cpu": "2"})
    assert not compute_equal({"name": "0.5"}, {"name": "500m"})


def test_echo_of_our_own_write_is_recognised() -> None:
    from autoglm_operator.ssa import compute_caused_by

    def entry(manager: str, time: str) -> dict[str, Any]:
        return {"manager": manager, "operation": "Update", "time": time}

    ours = {
        "metadata": {
            "managedFields": [
                entry("kubectl-patch", "2025-01-01T00:00:01Z"),
                entry(MANAGER, "2025-01-01T00:00:05Z"),
            ]
        }
    }
    theirs = {
        "metadata": {
            "managedFields": [
                entry(MANAGER, "2025-01-01T00:00:01Z"),
                entry("kubectl-patch", "2025-01-01T00:00:05Z"),
            ]
        }
    }
    tie = {
        "metadata": {
            "managedFields": [
                entry(MANAGER, "2025-01-01T00:00:05Z"),
                entry("kube-controller-manager", "2025-01-01T00:00:05Z"),
            ]
        }
    }
    assert compute_caused_by(ours, MANAGER) is True
    assert compute_caused_by(theirs, MANAGER) is False
    assert compute_caused_by(tie, MANAGER) is False
    assert compute_caused_by({"metadata": {}}, MANAGER) is False


def test_dropping_replicas_we_own_hands_them_over_at_the_live_value() -> None:
    want = copy.deepcopy(DESIRED)
    del want["spec"]["replicas"]  # an HPA takes over
    live = live_from(DESIRED)
    live["spec"]["replicas"] = 3
    assert compute_handover(want, live, MANAGER) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "glm", "namespace": "ns"},
        "spec": {"replicas": 3},
    }


def test_no_handover_while_we_set_replicas_or_no_longer_own_them() -> None:
    live = live_from(DESIRED)
    assert compute_handover(DESIRED, live, MANAGER) is None  # still ours to set
    want = copy.deepcopy(DESIRED)
    del want["spec"]["replicas"]
    assert compute_handover(want, None, MANAGER) is None  # nothing to keep yet
    del live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:replicas"]
    assert compute_handover(want, live, MANAGER) is None  # the HPA owns it already
    service = {"apiVersion": "v1", "kind": "Service", "metadata": want["metadata"], "spec": {}}
    assert compute_handover(service, live, MANAGER) is None
