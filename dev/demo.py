"""``autoglm-dev demo``: the whole product on one machine, step by step.

1. the local control plane: kwok GPU nodes, one live GPU node whose pods run
   as real processes (``autoglm_dev.agent``), and the add-ons
   (``autoglm_dev.addons``): Prometheus, prometheus-adapter, the Gateway API
   with Traefik as its data plane;
2. the CRD;
3. the operator (``kopf run``), reconciling an ``AutoGLMDeployment`` with an
   HPA into its children until ``Ready=True``; its pod runs the real
   ``autoglm-server`` on a tiny GLM built locally, at the pod's IP;
4. an HTTPRoute and a GRPCRoute from the Gateway to the model's Service;
5. one gRPC request and one OpenAI-compatible HTTP request, sent to the
   Gateway, answered by the server in the operator's pod;
6. the autoscaling view: ``kubectl get hpa``, the custom metric the HPA reads
   through the adapter, and the Prometheus query behind it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .addons import (
    ADDONS_NAMESPACE,
    CUSTOM_METRICS_APISERVICES,
    GATEWAY_LISTENER,
    GATEWAY_NAME,
    endpoints,
)
from .cluster import CRD_NAME, LocalCluster, install_crd
from .waiting import WaitTimeout, wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "demo"
NAMESPACE = "default"
MODEL_SOURCE = "hf://autoglm-demo/tiny-glm4"
HPA_METRIC = "autoglm_requests_per_second"
GRPC_PORT, HTTP_PORT = 8001, 8000


def _step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def _show(cluster: LocalCluster, *args: str) -> None:
    print(f"$ kubectl {' '.join(args)}")
    print(cluster.kubectl(*args).stdout.rstrip(), flush=True)


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive_or_fail(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    if proc.poll() is not None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")


def _apply(cluster: LocalCluster, manifest: dict[str, Any]) -> None:
    cluster.kubectl(
        "apply", "--server-side", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest)
    )


def build_demo_deployment(placement: dict[str, Any]) -> dict[str, Any]:
    """The demo's AutoGLMDeployment: a tiny GLM on the live node, 1 to 2
    replicas on requests per second."""
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"source": MODEL_SOURCE, "servedName": "tiny-glm"},
            "resources": {**placement, "cpu": "1", "memory": "2Gi", "shmSize": "64Mi"},
            "server": {"batching": {"maxBatchSize": 4, "maxBatchTokens": 512}},
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 2,
                "scaleDownStabilizationSeconds": 30,
                "targets": [{"type": "requestsPerSecond", "averageValue": "5"}],
            },
        },
    }


def build_routes(service: str, grpc_service: str) -> list[dict[str, Any]]:
    """An HTTPRoute (OpenAI API) and a GRPCRoute (autoglm.v1 and health) from
    the cluster's Gateway to the model's pods."""
    parent = {"name": GATEWAY_NAME, "namespace": ADDONS_NAMESPACE, "sectionName": GATEWAY_LISTENER}
    return [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": NAME},
            "spec": {
                "parentRefs": [parent],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                        "backendRefs": [{"name": service, "port": HTTP_PORT}],
                    }
                ],
            },
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": NAME},
            "spec": {
                "parentRefs": [parent],
                "rules": [
                    {
                        "matches": [
                            {"method": {"service": "autoglm.v1.AutoGLM"}},
                            {"method": {"service": "grpc.health.v1.Health"}},
                        ],
                        "backendRefs": [{"name": grpc_service, "port": GRPC_PORT}],
                    }
                ],
            },
        },
    ]


def build_h2c_service(selector: dict[str, str]) -> dict[str, Any]:
    """The model's gRPC port with appProtocol ``kubernetes.io/h2c``, which Gateway
    API defines for cleartext HTTP/2 (GEP-1911) and Traefik requires for a
    GRPCRoute's backend; the operator's Service says ``grpc``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{NAME}-grpc"},
        "spec": {
            "selector": selector,
            "ports": [
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "appProtocol": "kubernetes.io/h2c",
                }
            ],
        },
    }


def _route_ready(cluster: LocalCluster, kind: str) -> bool:
    obj = json.loads(cluster.kubectl("get", kind, NAME, "-n", NAMESPACE, "-o", "json").stdout)
    for parent in obj.get("status", {}).get("parents") or []:
        conds = {c["type"]: c["status"] for c in parent.get("conditions") or []}
        if conds.get("Accepted") == "True" and conds.get("ResolvedRefs") == "True":
            return True
    return False


def _prometheus_query(prometheus: str, query: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        result: list[dict[str, Any]] = json.loads(resp.read())["data"]["result"]
    return result


def run_demo(cluster: LocalCluster, keep: bool = False) -> int:
    from .agent import build_live_placement, install_tiny_model

    operator: subprocess.Popen[bytes] | None = None
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    try:
        _step(
            "1/6 Local Kubernetes: control plane, GPU nodes, Prometheus, metrics adapter, Gateway"
        )
        started = time.monotonic()
        state = cluster.start()
        cluster.start_agent(1)
        cluster.start_addons()
        state = cluster.load_state() or state
        ends = endpoints(state)
        print(f"up in {time.monotonic() - started:.1f}s at {state.server}")
        print(f"Prometheus {ends.prometheus}, Gateway {ends.gateway} (Traefik)")
        env["KUBECONFIG"] = state.kubeconfig
        _show(cluster, "get", "nodes", "-L", "nvidia.com/gpu.product", "-L", "nvidia.com/gpu.count")
        _show(cluster, "get", "gateway", "-n", ADDONS_NAMESPACE)
        _show(cluster, "get", "apiservices", *CUSTOM_METRICS_APISERVICES)

        _step("2/6 The AutoGLMDeployment CRD")
        install_crd(cluster)
        _show(cluster, "get", "crd", CRD_NAME)

        _step("3/6 The operator reconciles an AutoGLMDeployment; its pod runs the server")
        model_dir = install_tiny_model(cluster.workdir, MODEL_SOURCE)
        print(f"{MODEL_SOURCE} -> {model_dir} (a tiny GLM with random weights, built locally)")
        logs = cluster.workdir / "logs"
        op_log = logs / "operator.log"
        operator = _spawn(
            [
                str(BIN / "kopf"),
                "run",
                "--standalone",
                "--all-namespaces",
                "-m",
                "autoglm_operator.handlers",
            ],
            op_log,
            {**env, "AUTOGLM_OPERATOR_METRICS_PORT": "0", "AUTOGLM_OPERATOR_LOG_FORMAT": "text"},
        )
        print(
            f"$ kopf run --standalone --all-namespaces -m autoglm_operator.handlers   (log: {op_log})"
        )
        manifest = build_demo_deployment(build_live_placement())
        _apply(cluster, manifest)
        print(f"$ kubectl apply -f -  <<< {json.dumps(manifest)}")

        def ready() -> bool:
            _alive_or_fail(operator, "the operator", op_log)
            obj = json.loads(
                cluster.kubectl("get", "agd", NAME, "-n", NAMESPACE, "-o", "json").stdout
            )
            conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True"

        wait_until(
            ready,
            timeout=300,
            interval=0.5,
            message=f"AutoGLMDeployment/{NAME} to be Ready (agent log: {logs / 'agent.log'})",
        )
        _show(cluster, "get", "agd", "-n", NAMESPACE)
        _show(
            cluster,
            "get",
            "deployments,services,hpa,pods",
            "-n",
            NAMESPACE,
            "-l",
            f"app.kubernetes.io/instance={NAME}",
            "-o",
            "wide",
        )

        _step("4/6 Routes from the Gateway to the model's Service")
        service = json.loads(
            cluster.kubectl("get", "service", NAME, "-n", NAMESPACE, "-o", "json").stdout
        )
        _apply(cluster, build_h2c_service(service["spec"]["selector"]))
        for route in build_routes(NAME, f"{NAME}-grpc"):
            _apply(cluster, route)
        for kind in ("httproute", "grpcroute"):
            wait_until(
                lambda kind=kind: _route_ready(cluster, kind),  # type: ignore[misc]
                timeout=60,
                message=f"{kind}/{NAME} accepted by the Gateway",
            )
        _show(cluster, "get", "httproutes,grpcroutes", "-n", NAMESPACE)
        _show(
            cluster,
            "get",
            "endpointslices",
            "-n",
            NAMESPACE,
            "-l",
            f"kubernetes.io/service-name={NAME}",
        )

        _step("5/6 Requests through the Gateway to the server in the operator's pod")
        target = f"127.0.0.1:{ends.gateway_port}"

        def serving() -> bool:
            _alive_or_fail(operator, "the operator", op_log)
            probe = subprocess.run(
                [str(BIN / "autoglm"), "--target", target, "--timeout", "5", "health"],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            return probe.returncode == 0

        wait_until(serving, timeout=60, interval=0.5, message="gRPC health through the Gateway")
        generate = [
            str(BIN / "autoglm"),
            "--target",
            target,
            "generate",
            "Hello, GPU world",
            "--max-new-tokens",
            "16",
            "--stream",
        ]
        print(
            f'$ autoglm --target {target} generate "Hello, GPU world" --max-new-tokens 16 --stream'
        )
        out = subprocess.run(
            generate, capture_output=True, text=True, env=env, timeout=60, check=True
        )
        print(out.stdout.rstrip())
        body = json.dumps(
            {
                "model": "tiny-glm",
                "messages": [{"role": "user", "content": "Hi!"}],
                "max_tokens": 16,
            }
        ).encode()
        print(f"$ curl -s {ends.gateway}/v1/chat/completions -d '{body.decode()}'")
        req = urllib.request.Request(
            f"{ends.gateway}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            print(json.dumps(json.loads(resp.read()), indent=2))
        print("(the model is tiny and random, so the text is noise: the plumbing is the point)")

        _step("6/6 Autoscaling: the HPA reads the server's metric through the adapter")

        def hpa_value() -> str | None:
            hpa = json.loads(
                cluster.kubectl("get", "hpa", NAME, "-n", NAMESPACE, "-o", "json").stdout
            )
            current = hpa.get("status", {}).get("currentMetrics") or []
            if not current:
                return None
            value: str = current[0]["pods"]["current"]["averageValue"]
            return value

        wait_until(hpa_value, timeout=120, interval=1, message=f"hpa/{NAME} to read its metric")
        try:
            # The two requests above reach the HPA after a scrape (2 s), the
            # adapter's relist (3 s) and an HPA sync (5 s).
            wait_until(lambda: hpa_value() not in (None, "0"), timeout=45, interval=1)
        except WaitTimeout:
            print("(the HPA has not seen the requests above yet)")
        _show(cluster, "get", "hpa", "-n", NAMESPACE)
        raw = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{NAMESPACE}/pods/*/{HPA_METRIC}"
        print(f"$ kubectl get --raw '{raw}'")
        metrics = json.loads(cluster.kubectl("get", "--raw", raw).stdout)
        for item in metrics["items"]:
            print(
                f"  pod {item['describedObject']['name']}: {item['metricName']} = {item['value']}"
            )
        # The adapter's rule (charts/autoglm/templates/adapter-rules.yaml):
        # max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)
        pods = "|".join(i["describedObject"]["name"] for i in metrics["items"])
        query = f'max({HPA_METRIC}{{namespace="{NAMESPACE}",pod=~"{pods}"}}) by (pod)'
        print(f"$ curl -s '{ends.prometheus}/api/v1/query' --data-urlencode 'query={query}'")
        for sample in _prometheus_query(ends.prometheus, query):
            print(f"  {json.dumps(sample['metric'])}: {sample['value'][1]}")
        return 0
    finally:
        _stop(operator)
        if keep:
            print(
                f"\ncluster left running: export KUBECONFIG={cluster.kubeconfig}; "
                "stop it with `autoglm-dev cluster down`"
            )
        else:
            cluster.stop()
