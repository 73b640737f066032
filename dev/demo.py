"""``autoglm-dev demo``: the whole product on one machine, step by step.

1. the local control plane with GPU nodes;
2. the CRD;
3. the operator (``kopf run``), reconciling an ``AutoGLMDeployment`` into its
   children until ``Ready=True``;
4. the inference server on a tiny GLM built locally (pods on kwok nodes don't
   run containers, so the same server runs here as a process);
5. one gRPC request and one OpenAI-compatible HTTP request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .binaries import cache_root
from .cluster import CRD_NAME, LocalCluster, free_port, install_crd
from .waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "manifests" / "examples" / "minimal.yaml"


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


def run_demo(cluster: LocalCluster, keep: bool = False) -> int:
    operator: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    try:
        _step("1/5 Local Kubernetes control plane with simulated GPU nodes")
        started = time.monotonic()
        state = cluster.start()
        print(f"up in {time.monotonic() - started:.1f}s at {state.server}")
        env["KUBECONFIG"] = state.kubeconfig
        _show(cluster, "get", "nodes", "-L", "nvidia.com/gpu.product", "-L", "nvidia.com/gpu.count")

        _step("2/5 The AutoGLMDeployment CRD")
        install_crd(cluster)
        _show(cluster, "get", "crd", CRD_NAME)

        _step("3/5 The operator reconciles manifests/examples/minimal.yaml")
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
        cluster.kubectl("apply", "-n", "default", "-f", str(EXAMPLE))
        print(f"$ kubectl apply -f {EXAMPLE.relative_to(ROOT)}")

        def ready() -> bool:
            _alive_or_fail(operator, "the operator", op_log)
            obj = json.loads(
                cluster.kubectl("get", "agd", "minimal", "-n", "default", "-o", "json").stdout
            )
            conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True"

        wait_until(ready, timeout=120, message="AutoGLMDeployment/minimal to be Ready")
        _show(cluster, "get", "agd", "-n", "default")
        _show(
            cluster,
            "get",
            "deployments,services,hpa,pdb,pods",
            "-n",
            "default",
            "-l",
            "app.kubernetes.io/instance=minimal",
            "-o",
            "wide",
        )

        _step("4/5 The inference server on a tiny GLM (random weights, locally trained tokenizer)")
        from autoglm_server.testing import build_tiny_model

        model_dir = build_tiny_model(cache_root() / "demo" / "tiny-glm4")
        grpc_port, http_port = free_port(), free_port()
        srv_log = logs / "server.log"
        server = _spawn(
            [
                str(BIN / "autoglm-server"),
                "--model",
                str(model_dir),
                "--served-model-name",
                "tiny-glm",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--metrics-port",
                "0",
                "--device",
                "cpu",
            ],
            srv_log,
            env,
        )
        print(
            f"$ autoglm-server --model {model_dir} --grpc-port {grpc_port} --http-port {http_port}"
        )
        target = f"127.0.0.1:{grpc_port}"

        def serving() -> bool:
            _alive_or_fail(server, "the server", srv_log)
            probe = subprocess.run(
                [str(BIN / "autoglm"), "--target", target, "--timeout", "2", "health"],
                capture_output=True,
                text=True,
                env=env,
            )
            return probe.returncode == 0

        wait_until(
            serving, timeout=180, interval=0.5, message="the server's gRPC health to be SERVING"
        )
        print("gRPC health: SERVING")

        _step("5/5 Requests")
        print(
            f'$ autoglm --target {target} generate "Hello, GPU world" --max-new-tokens 16 --stream'
        )
        out = subprocess.run(
            [
                str(BIN / "autoglm"),
                "--target",
                target,
                "generate",
                "Hello, GPU world",
                "--max-new-tokens",
                "16",
                "--stream",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        print(out.stdout.rstrip())
        body = json.dumps(
            {
                "model": "tiny-glm",
                "messages": [{"role": "user", "content": "Hi!"}],
                "max_tokens": 16,
            }
        ).encode()
        print(f"$ curl -s http://127.0.0.1:{http_port}/v1/chat/completions -d '{body.decode()}'")
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            print(json.dumps(json.loads(resp.read()), indent=2))
        print("\n(the model is tiny and random, so the text is noise: the plumbing is the point)")
        return 0
    finally:
        _stop(server)
        _stop(operator)
        if keep:
            print(
                f"\ncluster left running: export KUBECONFIG={cluster.kubeconfig}; stop it with `autoglm-dev cluster down`"
            )
        else:
            cluster.stop()
