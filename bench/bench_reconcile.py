"""Time from apply to Ready=True for AutoGLMDeployments in the local cluster.

    python bench/bench_reconcile.py OUT_DIR [--objects 20] [--mode burst|sequential|both]
                                            [--use-existing-cluster] [--resync-seconds 30]

Starts the local control plane (kwok GPU nodes) unless --use-existing-cluster
(then $KUBECONFIG), installs the CRD, runs the operator as a subprocess
(``kopf run``, as in its image), applies N minimal objects and records, for
each, the time from sending the apply to the first observation of Ready=True
for its generation. Prints median and p99 and writes them, with the commit and
the configuration, to OUT_DIR/bench_reconcile-<utc time>.json.

Modes: ``burst`` applies all objects at once (the operator's queueing counts);
``sequential`` applies one, waits for Ready, then the next (pure latency).
Pods never run containers here (kwok), so this measures the control loop:
watch -> reconcile -> apply -> scheduler -> kwok -> Deployment status ->
child event -> status write. Not part of the test run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {
        "sha": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain")),
    }


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ready_for_generation(obj: dict[str, Any]) -> bool:
    gen = obj["metadata"].get("generation")
    st = obj.get("status") or {}
    return st.get("observedGeneration") == gen and any(
        c.get("type") == "Ready"
        and c.get("status") == "True"
        and c.get("observedGeneration") == gen
        for c in st.get("conditions") or []
    )


def manifest(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}},
    }


def run_mode(api: Any, namespace: str, count: int, mode: str, timeout_s: float) -> list[float]:
    """Latencies (seconds) from apply to Ready=True, one per object."""
    from autoglm_operator.spec import API_VERSION, KIND

    names = [f"{mode[:5]}-{i:02d}" for i in range(count)]
    sent: dict[str, float] = {}
    done: dict[str, float] = {}

    def poll_until(targets: list[str]) -> None:
        deadline = time.monotonic() + timeout_s
        while any(n not in done for n in targets):
            if time.monotonic() > deadline:
                missing = [n for n in targets if n not in done]
                raise TimeoutError(f"not Ready within {timeout_s}s: {missing}")
            now = time.monotonic()
            for obj in api.list_objects(API_VERSION, KIND, namespace):
                name = obj["metadata"]["name"]
                if name in sent and name not in done and ready_for_generation(obj):
                    done[name] = now
            time.sleep(0.05)

    if mode == "burst":
        for name in names:
            sent[name] = time.monotonic()
            api.apply(manifest(name, namespace))
        poll_until(names)
    else:
        for name in names:
            sent[name] = time.monotonic()
            api.apply(manifest(name, namespace))
            poll_until([name])
    return [done[n] - sent[n] for n in names]


def wait_no_pods(api: Any, namespace: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while api.list_objects("v1", "Pod", namespace):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pods in {namespace} still there after {timeout_s}s")
        time.sleep(0.5)


def scrape_metrics(port: int) -> dict[str, Any]:
    """Reconcile count and time, and write requests by kind, from the operator."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, Any] = {"writes": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "autoglm_operator_reconcile_duration_seconds_count":
                out["reconciles"] = int(sample.value)
            elif sample.name == "autoglm_operator_reconcile_duration_seconds_sum":
                out["reconcile_seconds_total"] = round(sample.value, 3)
            elif sample.name == "autoglm_operator_api_writes_total":
                key = f"{sample.labels['verb']} {sample.labels['kind']}"
                out["writes"][key] = int(sample.value)
    return out


def summarize(latencies: list[float]) -> dict[str, Any]:
    return {
        "samples": len(latencies),
        "median_s": round(statistics.median(latencies), 4),
        "p99_s": round(percentile(latencies, 0.99), 4),
        "min_s": round(min(latencies), 4),
        "max_s": round(max(latencies), 4),
        "mean_s": round(statistics.fmean(latencies), 4),
        "latencies_s": [round(x, 4) for x in latencies],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder for the JSON result")
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--mode", choices=("burst", "sequential", "both"), default="both")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="operator timer period")
    parser.add_argument("--timeout-seconds", type=float, default=300.0)
    parser.add_argument(
        "--use-existing-cluster",
        action="store_true",
        help="use $KUBECONFIG instead of starting one",
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    args = parser.parse_args(argv)

    from autoglm_dev.cluster import (
        ExistingCluster,
        LocalCluster,
        free_port,
        install_crd,
        operator_command,
    )

    workdir = Path(tempfile.mkdtemp(prefix="autoglm-bench-"))
    cluster: Any
    if args.use_existing_cluster:
        cluster = ExistingCluster(
            Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")))
        )
    else:
        cluster = LocalCluster(
            workdir / "cluster",
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            die_with_parent=True,
        )
        cluster.start()
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    namespace = f"bench-{int(time.time())}"
    operator: subprocess.Popen[bytes] | None = None
    log_path = workdir / "operator.log"
    try:
        install_crd(cluster)
        cluster.kubectl("create", "namespace", namespace)
        port = free_port()
        env = {
            **os.environ,
            "AUTOGLM_OPERATOR_METRICS_PORT": str(port),
            "AUTOGLM_OPERATOR_RESYNC_SECONDS": str(args.resync_seconds),
        }
        with log_path.open("wb") as log:
            operator = subprocess.Popen(
                operator_command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Not the checkout root: `python -m` puts the cwd first on sys.path, and
                # the folder `operator/` there would shadow the standard library's.
                cwd=workdir,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).close()
                break
            except OSError:
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"operator did not start; see {log_path}") from None
                time.sleep(0.2)

        from autoglm_operator.k8s import KubeApi

        api = KubeApi.from_environment()
        api.field_manager = "autoglm-bench"
        modes = ["burst", "sequential"] if args.mode == "both" else [args.mode]
        results: dict[str, Any] = {}
        for mode in modes:
            latencies = run_mode(api, namespace, args.objects, mode, args.timeout_seconds)
            results[mode] = summarize(latencies)
            print(
                f"{mode:10s} n={len(latencies)} median={results[mode]['median_s']:.3f}s p99={results[mode]['p99_s']:.3f}s"
            )
            # Free the GPUs before the next mode: terminating pods still hold theirs.
            cluster.kubectl(
                "delete", "agd", "--all", "-n", namespace, "--wait=true", "--timeout=120s"
            )
            wait_no_pods(api, namespace, args.timeout_seconds)
        operator_metrics = scrape_metrics(port)
        version = json.loads(cluster.kubectl("version", "-o", "json").stdout).get(
            "serverVersion", {}
        )
        record = {
            "benchmark": "reconcile_apply_to_ready",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "config": {
                "objects": args.objects,
                "modes": modes,
                "resync_seconds": args.resync_seconds,
                "cluster": "existing" if args.use_existing_cluster else "local (kwok)",
                "nodes": args.nodes,
                "gpus_per_node": args.gpus_per_node,
                "spec": manifest("x", namespace)["spec"],
                "kubernetes": version.get("gitVersion"),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            },
            "results": results,
            # Totals over all modes, from the operator's own metrics.
            "operator": operator_metrics,
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = args.out_dir / f"bench_reconcile-{stamp}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        if not args.use_existing_cluster:
            cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
