"""Operator pods on live nodes: real servers at their pod IPs, probes, drain, crash loops."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from live_helpers import (
    Kube,
    OperatorProcess,
    container_status,
    describe_pods,
    live_agd,
    node_network,
    ready_addresses,
    wait_for,
)

from autoglm_dev.cluster import LocalCluster
from autoglm_server.client import AutoGLMClient

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _wait_agd(kube: Kube, name: str, status: str, timeout: float = 240) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = kube.get("agd", name)
        if obj is None:
            return None
        gen = obj["metadata"]["generation"]
        for c in obj.get("status", {}).get("conditions") or []:
            if (
                c["type"] == "Ready"
                and c["status"] == status
                and c.get("observedGeneration") == gen
            ):
                return dict(obj)
        return None

    result: dict[str, Any] = wait_for(
        probe,
        timeout=timeout,
        message=lambda: (
            f"agd/{name} Ready={status}; status: "
            f"{json.dumps((kube.get('agd', name) or {}).get('status'))}\n"
            f"{describe_pods(kube, name)}"
        ),
    )
    return result


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        out: dict[str, Any] = json.loads(resp.read())
        return out


def _process_log(cluster: LocalCluster, pod: dict[str, Any], restart: int = 0) -> Path:
    meta = pod["metadata"]
    key = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    return cluster.workdir / "logs" / "pods" / key / "server" / f"{restart}.log"


def test_pods_serve_grpc_and_openai_at_their_endpointslice_addresses(
    kube: Kube, live_operator: OperatorProcess, tiny_model: Path, live_cluster: LocalCluster
) -> None:
    kube.apply(live_agd("serve", replicas=2))
    _wait_agd(kube, "serve", "True")

    pods = kube.pods("serve")
    assert len(pods) == 2, describe_pods(kube, "serve")
    pod_cidr, node_ip = node_network(live_cluster, "gpu-live-0")
    assert not pod_cidr.subnet_of(ipaddress.IPv4Network("127.0.0.0/8"))
    ips = []
    for pod in pods:
        st = pod["status"]
        assert st["phase"] == "Running"
        assert ipaddress.IPv4Address(st["podIP"]) in pod_cidr
        assert st["podIPs"] == [{"ip": st["podIP"]}]
        assert st["hostIP"] == node_ip
        cs = container_status(pod)
        assert cs["ready"] is True and cs["started"] is True and cs["restartCount"] == 0
        ips.append(st["podIP"])
    assert len(set(ips)) == 2

    # The Service's EndpointSlices (controller-manager) list exactly the pods' addresses.
    assert wait_for(lambda: ready_addresses(kube, "serve") == sorted(ips), timeout=30)

    for ip in ips:
        with AutoGLMClient(f"{ip}:8001", timeout=60) as client:
            assert client.health("autoglm.v1.AutoGLM") == "SERVING"
            result = client.generate("Hello, live pod", max_new_tokens=4, ignore_eos=True)
            assert result.model == "serve"
            assert result.completion_tokens == 4
        body = _post_json(
            f"http://{ip}:8000/v1/completions",
            {"model": "serve", "prompt": "Hi", "max_tokens": 3},
        )
        assert body["choices"] and body["usage"]["completion_tokens"] >= 1

    # The process got exactly the operator's env, with the documented substitutions.
    text = _process_log(live_cluster, pods[0]).read_text()
    assert f"listening on {pods[0]['status']['podIP']}" in text

    # Figure: server start time in a pod on this machine (container start to pod Ready).
    for pod in pods:
        started = _ts(container_status(pod)["state"]["running"]["startedAt"])
        ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
        log_text = _process_log(live_cluster, pod).read_text()
        engine = [line for line in log_text.splitlines() if "engine started in" in line]
        print(
            f"\nFIGURE server start in a pod: container start -> pod Ready "
            f"{_ts(ready['lastTransitionTime']) - started:.0f} s (1 s resolution; startup probe "
            f"period 10 s); {engine[-1].split(': ', 1)[-1] if engine else 'engine line missing'}"
        )


def test_deleting_a_pod_drains_its_server_before_it_goes(
    kube: Kube, live_operator: OperatorProcess, tiny_model: Path, live_cluster: LocalCluster
) -> None:
    kube.apply(live_agd("drain", replicas=1, shutdown_grace_seconds=30))
    _wait_agd(kube, "drain", "True")
    (pod,) = kube.pods("drain")
    ip, name = pod["status"]["podIP"], pod["metadata"]["name"]

    chunks: list[Any] = []
    errors: list[BaseException] = []
    first = threading.Event()

    def stream() -> None:
        try:
            with AutoGLMClient(f"{ip}:8001", timeout=120) as client:
                for chunk in client.generate_stream(
                    "Tell me a long story", max_new_tokens=400, ignore_eos=True
                ):
                    chunks.append(chunk)
                    first.set()
        except BaseException as exc:
            errors.append(exc)
            first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    kube.run("delete", "pod", name, "--wait=false")
    t.join(120)
    assert not errors, errors
    # The request admitted before SIGTERM ran to completion (the drain).
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 400

    # The agent removed the pod once the process had exited.
    wait_for(
        lambda: all(p["metadata"]["uid"] != pod["metadata"]["uid"] for p in kube.pods("drain")),
        timeout=60,
        message="the deleted pod to be removed",
    )
    text = _process_log(live_cluster, pod).read_text()
    assert "SIGTERM: draining" in text
    assert "exiting with code 0" in text
    reasons = {e["reason"] for e in kube.events(name)}
    assert {"Started", "Killing"} <= reasons, reasons


def test_a_server_that_cannot_start_crash_loops_and_the_deployment_says_why(
    kube: Kube, live_operator: OperatorProcess, tiny_model: Path
) -> None:
    # A digest that does not match the weights: the server refuses to load them (exit 2).
    kube.apply(live_agd("broken", model={"sha256": {"model.safetensors": "0" * 64}}))

    def crash_looping() -> dict[str, Any] | None:
        for pod in kube.pods("broken"):
            cs = container_status(pod)
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if cs.get("restartCount", 0) >= 1 and waiting.get("reason") == "CrashLoopBackOff":
                return pod
        return None

    pod = wait_for(crash_looping, timeout=180, message=lambda: describe_pods(kube, "broken"))
    cs = container_status(pod)
    assert cs["ready"] is False
    last = cs["lastState"]["terminated"]
    assert last["exitCode"] == 2
    assert "sha256: model.safetensors does not match" in last["message"]
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert "BackOff" in {e["reason"] for e in kube.events(pod["metadata"]["name"])}

    obj = _wait_agd(kube, "broken", "False", timeout=60)

    def says_why() -> dict[str, Any] | None:
        cond = kube.condition("broken")
        if cond is None:
            return None
        text = f"{cond.get('reason')} {cond.get('message')}"
        return cond if "CrashLoopBackOff" in text and "does not match" in text else None

    wait_for(
        says_why,
        timeout=60,
        message=lambda: f"Ready to name the crash loop; status: {json.dumps(obj.get('status'))}",
    )
    kube.run("delete", "agd", "broken", "--wait=false")


def test_rolling_update_under_steady_load_loses_no_request(
    kube: Kube, live_operator: OperatorProcess, tiny_model: Path
) -> None:
    kube.apply(live_agd("roll", replicas=2))
    _wait_agd(kube, "roll", "True")
    # Ready follows the pods; the EndpointSlice controller publishes them a moment later.
    old_ips = set(
        wait_for(
            lambda: ips if len(ips := ready_addresses(kube, "roll")) == 2 else None,
            timeout=30,
            message=lambda: f"2 ready addresses, have {ready_addresses(kube, 'roll')}",
        )
    )

    # A client as a headless-Service gRPC client would be: round robin over the
    # ready EndpointSlice addresses (refreshed every 0.3 s), and UNAVAILABLE
    # (a draining server) retried on another address, up to 3 attempts.
    addresses: list[str] = sorted(old_ips)
    stop = threading.Event()
    served: list[tuple[float, str]] = []
    failed: list[str] = []
    retried = [0]
    lock = threading.Lock()

    def refresh() -> None:
        nonlocal addresses
        while not stop.is_set():
            found = ready_addresses(kube, "roll")
            if found:
                addresses = found
            stop.wait(0.3)

    def send(worker: int) -> None:
        import grpc

        n = worker
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            for attempt in range(3):
                ip = addresses[n % len(addresses)]
                n += 1
                try:
                    with AutoGLMClient(f"{ip}:8001", timeout=30) as client:
                        client.generate("steady load", max_new_tokens=8, ignore_eos=True)
                    with lock:
                        served.append((time.monotonic(), ip))
                    break
                except grpc.RpcError as exc:
                    if exc.code() is grpc.StatusCode.UNAVAILABLE and attempt < 2:
                        with lock:
                            retried[0] += 1
                        continue
                    with lock:
                        failed.append(f"{ip}: {exc.code().name} {exc.details()}")
                    break

    threads = [threading.Thread(target=refresh)] + [
        threading.Thread(target=send, args=(i,)) for i in range(2)
    ]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(served) >= 10, timeout=60, message="load to flow")
        started = time.monotonic()
        agd = kube.get("agd", "roll")
        kube.run(
            "patch",
            "agd",
            "roll",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"server": {"batching": {"maxBatchSize": 3}}}}),
        )

        def rolled() -> bool:
            pods = kube.pods("roll")
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            ips = set(ready_addresses(kube, "roll"))
            return (
                len(pods) == 2
                and len(live) == 2
                and len(ips) == 2
                and not (ips & old_ips)
                and all(container_status(p).get("ready") for p in live)
            )

        wait_for(rolled, timeout=300, message=lambda: describe_pods(kube, "roll"))
        _wait_agd(kube, "roll", "True", timeout=120)
        rollout_s = time.monotonic() - started
        # Keep the load on a little after the rollout.
        count = len(served)
        wait_for(lambda: len(served) >= count + 5, timeout=60, message="load after the rollout")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    new_ips = set(ready_addresses(kube, "roll"))
    assert kube.get("agd", "roll")["metadata"]["generation"] > agd["metadata"]["generation"]
    print(
        f"\nFIGURE rolling update under load: {len(served)} requests served, "
        f"{len(failed)} failed, {retried[0]} UNAVAILABLE attempts retried on another pod; "
        f"rollout took {rollout_s:.0f} s"
    )
    assert failed == [], failed
    # New pods served while old ones still did: the rollout overlapped.
    first_new = min(t for t, ip in served if ip in new_ips)
    last_old = max(t for t, ip in served if ip in old_ips)
    assert first_new < last_old
