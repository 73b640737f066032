"""The node agent's pure core: pod IPs, the process for a container, back-off, status."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from autoglm_dev.agent import plan
from autoglm_operator.builders import Owner, build_deployment
from autoglm_operator.spec import parse_spec

NOW = "2026-11-28T06:00:00Z"
LATER = "2026-11-28T06:05:00Z"


def operator_pod(spec: dict[str, Any]) -> dict[str, Any]:
    """A pod as the ReplicaSet would create it from the operator's Deployment."""
    dep = build_deployment(parse_spec(spec), Owner("m", "ns", "uid-1"))
    template = dep["spec"]["template"]
    return {
        "metadata": {"name": "m-abc", "namespace": "ns", "uid": "pod-uid", **template["metadata"]},
        "spec": {**template["spec"], "nodeName": "gpu-live-0"},
        "status": {},
    }


def ctx(tmp_path: Path) -> plan.NodeContext:
    return plan.NodeContext(
        server_bin="/venv/bin/autoglm-server", path="/venv/bin:/usr/bin", models_root=tmp_path
    )


# ---- nodes and IPs --------------------------------------------------------------------


def test_pod_cidrs_are_distinct_and_not_loopback_addresses() -> None:
    cidrs = [plan.compute_pod_cidr(i) for i in range(4)]
    assert [str(c) for c in cidrs] == [
        "198.18.1.0/24",
        "198.18.2.0/24",
        "198.18.3.0/24",
        "198.18.4.0/24",
    ]
    # EndpointSlices refuse loopback addresses (ValidateEndpointIP): the pod
    # network lives in a network namespace of the cluster's own instead of 127/8.
    assert not any(c.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) for c in cidrs)
    assert plan.compute_node_ip(0) == "198.18.1.1"
    # The host end of the veth pair is in the block's first /24, which no node has.
    gateway = ipaddress.IPv4Address(plan.compute_pod_gateway())
    assert str(gateway) == "198.18.0.1"
    assert not any(gateway in c for c in cidrs)
    block = ipaddress.IPv4Network("198.18.48.0/20")
    assert plan.pod_namespace_name(block) == "autoglm-pods-198-18-48-0"
    assert plan.pod_veth_name(block) == "agpc61230" and len(plan.pod_veth_name(block)) <= 15
    assert plan.pod_veth_name(block) != plan.pod_veth_name(ipaddress.IPv4Network("198.18.64.0/20"))
    with pytest.raises(ValueError, match="node index"):
        plan.compute_pod_cidr(254)
    inside = ipaddress.IPv4Network("127.1.0.0/16")
    assert str(plan.compute_pod_cidr(2, inside)) == "127.1.3.0/24"


def test_live_node_is_tainted_and_labelled() -> None:
    node = plan.build_live_node(1, gpus=8)
    assert node["metadata"]["name"] == "gpu-live-1"
    assert node["metadata"]["labels"][plan.GPU_PRODUCT_LABEL] == plan.LIVE_GPU_PRODUCT
    assert node["spec"]["podCIDR"] == "198.18.2.0/24"
    assert {"key": plan.LIVE_TAINT_KEY, "value": "true", "effect": "NoSchedule"} in node["spec"][
        "taints"
    ]
    status = plan.build_node_status(1, 8, NOW, "v1.36.3")
    assert status["capacity"][plan.GPU_RESOURCE] == "8"
    assert {"type": "InternalIP", "address": "198.18.2.1"} in status["addresses"]
    assert [c["status"] for c in status["conditions"] if c["type"] == "Ready"] == ["True"]


def test_live_placement_passes_the_operator_spec() -> None:
    spec = parse_spec({"model": {"source": "hf://a/b"}, "resources": plan.build_live_placement()})
    dep = build_deployment(spec, Owner("m", "ns", "u"))
    pod_spec = dep["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {plan.GPU_PRODUCT_LABEL: plan.LIVE_GPU_PRODUCT}
    assert any(t.get("key") == plan.LIVE_TAINT_KEY for t in pod_spec["tolerations"])


def test_ip_allocation_round_robin_skips_used_and_node_address() -> None:
    cidr = plan.compute_pod_cidr(0)
    assert plan.allocate_pod_ip(cidr, [], None) == "198.18.1.2"
    assert plan.allocate_pod_ip(cidr, ["198.18.1.2"], None) == "198.18.1.3"
    # After .3 was handed out and .2 freed, the next is .4, not the freed .2.
    assert plan.allocate_pod_ip(cidr, ["198.18.1.3"], "198.18.1.3") == "198.18.1.4"
    # Wraps around at the end of the range.
    assert plan.allocate_pod_ip(cidr, [], "198.18.1.254") == "198.18.1.2"
    full = [str(h) for h in cidr.hosts()]
    with pytest.raises(plan.ContainerConfigError, match="no free pod IP"):
        plan.allocate_pod_ip(cidr, full, None)


# ---- model sources ---------------------------------------------------------------------------


def test_model_source_substitution_rule(tmp_path: Path) -> None:
    assert plan.compute_model_dir(tmp_path, "hf://org/name@v2") == tmp_path / "hf" / "org" / "name"
    assert plan.compute_model_dir(tmp_path, "hf://org/name") == tmp_path / "hf" / "org" / "name"
    assert plan.compute_model_dir(tmp_path, "pvc://claim/a/b") == tmp_path / "pvc" / "claim" / "a/b"
    assert plan.compute_model_dir(tmp_path, "/models/glm") == tmp_path / "image" / "models" / "glm"
    assert plan.compute_model_dir(tmp_path, "s3://bucket/x") is None


# ---- the process ----------------------------------------------------------------------------


def plan_for(pod: dict[str, Any], tmp_path: Path) -> plan.ProcessPlan:
    container = pod["spec"]["containers"][0]
    volumes = {v.name: v for v in plan.plan_volumes(pod, tmp_path / "pod", tmp_path / "models")}
    mounts = plan.compute_mounts(container, volumes)
    return plan.plan_process(
        container, "198.18.1.7", mounts, tmp_path / "home", ctx(tmp_path / "models")
    )


def test_process_keeps_the_operators_env_and_substitutes_the_documented_few(tmp_path: Path) -> None:
    pod = operator_pod(
        {
            "model": {"source": "hf://org/tiny", "dtype": "bfloat16"},
            "server": {"batching": {"maxBatchSize": 3, "maxBatchTokens": 64}},
        }
    )
    (tmp_path / "models" / "hf" / "org" / "tiny").mkdir(parents=True)
    p = plan_for(pod, tmp_path)
    assert p.argv == ("/venv/bin/autoglm-server",)
    env = p.env
    # Unchanged from the pod spec: dtype and batching reach the server as given.
    assert env["AUTOGLM_DTYPE"] == "bfloat16"
    assert env["AUTOGLM_MAX_BATCH_SIZE"] == "3"
    assert env["AUTOGLM_MAX_BATCH_TOKENS"] == "64"
    assert env["AUTOGLM_GRPC_PORT"] == "8001"
    # Substituted.
    assert env["AUTOGLM_HOST"] == "198.18.1.7"
    assert env["AUTOGLM_DEVICE"] == "cpu"
    assert env["AUTOGLM_MODEL"] == str(tmp_path / "models" / "hf" / "org" / "tiny")
    assert env["HF_HOME"] == str(tmp_path / "pod" / "volumes" / "hf-cache")
    assert env["HF_HUB_OFFLINE"] == "1"
    assert set(p.substituted) == {"AUTOGLM_HOST", "AUTOGLM_DEVICE", "AUTOGLM_MODEL", "HF_HOME"}
    # Every other variable the operator set is passed through exactly.
    pod_env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    for key, value in pod_env.items():
        if key not in p.substituted:
            assert env[key] == value, key


def test_missing_model_stays_missing(tmp_path: Path) -> None:
    pod = operator_pod({"model": {"source": "hf://org/absent"}})
    assert plan_for(pod, tmp_path).env["AUTOGLM_MODEL"] == "hf://org/absent"
    pod = operator_pod({"model": {"source": "/no/such/model"}})
    assert plan_for(pod, tmp_path).env["AUTOGLM_MODEL"] == str(
        tmp_path / "models" / "image" / "no" / "such" / "model"
    )


def test_digest_file_and_pvc_paths_map_to_volume_dirs(tmp_path: Path) -> None:
    pod = operator_pod(
        {"model": {"source": "pvc://weights/glm/v1", "sha256": {"model.safetensors": "a" * 64}}}
    )
    env = plan_for(pod, tmp_path).env
    assert env["AUTOGLM_MODEL"] == str(tmp_path / "models" / "pvc" / "weights" / "glm" / "v1")
    assert env["AUTOGLM_SHA256_FILE"] == str(
        tmp_path / "pod" / "volumes" / "model-digests" / "sha256.json"
    )


def test_command_args_and_refusals(tmp_path: Path) -> None:
    container = {"name": "c", "command": ["/opt/autoglm/bin/autoglm-server", "--x"], "args": ["1"]}
    p = plan.plan_process(container, "198.18.1.2", [], tmp_path, ctx(tmp_path))
    assert p.argv == ("/venv/bin/autoglm-server", "--x", "1")
    with pytest.raises(plan.ContainerConfigError, match="only the autoglm-server entrypoint"):
        plan.plan_process(
            {"name": "c", "command": ["sh"]}, "198.18.1.2", [], tmp_path, ctx(tmp_path)
        )
    env_from = {"name": "c", "env": [{"name": "A", "valueFrom": {"secretKeyRef": {}}}]}
    with pytest.raises(plan.ContainerConfigError, match="env A: valueFrom"):
        plan.plan_process(env_from, "198.18.1.2", [], tmp_path, ctx(tmp_path))
    with pytest.raises(plan.ContainerConfigError, match="hostPath"):
        plan.plan_volumes(
            {"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, tmp_path, tmp_path
        )


# ---- restarts, termination, probes --------------------------------------------------------


def test_backoff_doubles_and_caps() -> None:
    assert [plan.compute_backoff(n) for n in range(7)] == [0, 10, 20, 40, 80, 160, 300]
    assert plan.compute_backoff(3, initial_s=1, cap_s=3) == 3


def test_exit_codes_and_restart_policy() -> None:
    assert plan.compute_exit_code(2) == 2
    assert plan.compute_exit_code(-9) == 137
    assert plan.compute_exit_reason(0) == "Completed"
    assert plan.compute_exit_reason(2) == "Error"
    assert plan.compute_should_restart("Always", 0)
    assert not plan.compute_should_restart("OnFailure", 0)
    assert plan.compute_should_restart("OnFailure", 1)
    assert not plan.compute_should_restart("Never", 1)


def test_termination_message_is_the_log_tail() -> None:
    log = b"".join(b"line %d\n" % i for i in range(200)) + b"ERROR model load failed: x\n"
    msg = plan.compute_termination_message(log)
    assert msg.endswith("ERROR model load failed: x")
    assert len(msg.splitlines()) == 80
    assert len(plan.compute_termination_message(b"x" * 5000).encode()) == 2048


def test_probes_from_the_operator_pod() -> None:
    pod = operator_pod({"model": {"source": "hf://a/b"}})
    c = pod["spec"]["containers"][0]
    startup = plan.plan_probe(c["startupProbe"], c, "198.18.1.2")
    ready = plan.plan_probe(c["readinessProbe"], c, "198.18.1.2")
    assert startup is not None and ready is not None
    assert (startup.kind, startup.port, startup.period_s, startup.failure_threshold) == (
        "grpc",
        8001,
        10,
        180,
    )
    assert (ready.service, ready.period_s, ready.timeout_s) == ("autoglm.v1.AutoGLM", 5, 5)
    http = plan.plan_probe({"httpGet": {"port": "http", "path": "/readyz"}}, c, "198.18.1.2")
    assert http is not None and (http.kind, http.port, http.timeout_s) == ("http", 8000, 1)
    assert plan.plan_probe(None, c, "198.18.1.2") is None


# ---- status -----------------------------------------------------------------------------------


def view(ready: bool, state: dict[str, Any], restarts: int = 0) -> plan.PodView:
    return plan.PodView(
        phase="Running",
        host_ip="198.18.1.1",
        pod_ip="198.18.1.2",
        start_time=NOW,
        containers=(
            plan.ContainerView(
                "server", "img", state, ready=ready, started=ready, restart_count=restarts
            ),
        ),
    )


def test_status_keeps_foreign_conditions_and_transition_times() -> None:
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}
    first = plan.build_pod_status(
        {"conditions": [scheduled]}, view(False, {"running": {"startedAt": NOW}}), NOW
    )
    conds = {c["type"]: c for c in first["conditions"]}
    assert conds["PodScheduled"] == scheduled
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["message"] == "containers with unready status: [server]"
    assert first["podIP"] == "198.18.1.2" and first["podIPs"] == [{"ip": "198.18.1.2"}]
    # Nothing changed: an equal status, so nothing is written.
    again = plan.build_pod_status(first, view(False, {"running": {"startedAt": NOW}}), LATER)
    assert again == first
    assert not plan.compute_status_changed(first, again)
    # Ready flips: only Ready/ContainersReady get the new transition time.
    ready = plan.build_pod_status(first, view(True, {"running": {"startedAt": NOW}}), LATER)
    conds = {c["type"]: c for c in ready["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["lastTransitionTime"] == LATER
    assert conds["Initialized"]["lastTransitionTime"] == NOW
    assert plan.compute_status_changed(first, ready)


def test_crash_loop_status() -> None:
    last = {"terminated": {"exitCode": 2, "reason": "Error", "message": "model load failed"}}
    v = plan.PodView(
        phase="Running",
        host_ip="198.18.1.1",
        pod_ip="198.18.1.2",
        start_time=NOW,
        containers=(
            plan.ContainerView(
                "server",
                "img",
                {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                last_state=last,
                restart_count=2,
            ),
        ),
    )
    status = plan.build_pod_status({}, v, NOW)
    cs = status["containerStatuses"][0]
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["lastState"] == last
    assert cs["restartCount"] == 2 and cs["ready"] is False


def test_each_running_agent_claims_its_own_pod_network(tmp_path: Path) -> None:
    from autoglm_dev.agent.runtime import AgentError, claim_pod_network

    blocks = plan.plan_pod_network_blocks()
    assert len(blocks) == 32 and str(blocks[0]) == "198.18.0.0/20"
    assert all(not b.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) for b in blocks)
    first, lock1 = claim_pod_network("auto", tmp_path)
    second, lock2 = claim_pod_network("auto", tmp_path)
    assert (str(first), str(second)) == ("198.18.0.0/20", "198.18.16.0/20")
    # A restarted agent prefers the block its nodes' podCIDRs are in.
    third, lock3 = claim_pod_network("auto", tmp_path, ipaddress.IPv4Network("198.18.81.0/24"))
    assert str(third) == "198.18.80.0/20"
    with pytest.raises(AgentError, match="no free pod network"):
        claim_pod_network(str(first), tmp_path)
    lock1.close()  # the agent exits: its network is free again
    again, lock4 = claim_pod_network("auto", tmp_path)
    assert again == first
    for fh in (lock2, lock3, lock4):
        fh.close()
