"""The operator at scale: many AutoGLMDeployments applied at once on many simulated GPU nodes.

    python bench/bench_scale.py OUT_DIR [--nodes 500] [--sizes 100,300,1000]
                                        [--idle-seconds 150] [--timeout-seconds 600]

Starts the local control plane with ``--nodes`` kwok GPU nodes, installs the
CRD and runs the operator as a subprocess (``kopf run --standalone``, as in
its image, with its default settings unless --workers/--qps/--burst). For
each size N, in a fresh namespace, N minimal AutoGLMDeployments are created
at once (16 client threads) and, from watches:

- time until every object has its children (Deployment and both Services);
- time until every object is Ready=True for its generation;
- apply-to-Ready per object: p50, p99, max.

After the last (largest) size, with everything Ready:
- idle traffic: the operator's requests during ``--idle-seconds`` (longer
  than its resync period), by verb and resource, per minute, from the
  apiserver's audit log (user agents ``kopf/`` and ``OpenAPI-Generator/``);
- reconcile duration p99 after the burst, from the operator's histograms, over
  two waves on 10% of the objects each: a spec change that makes a new
  revision (a new Deployment and Service each), then a replica count change
  (the Deployment alone); with the apiserver's latency in each wave;
- the operator's peak RSS (VmHWM) and CPU seconds (utime+stime) per phase;
- the apiserver's request latency (audit: stageTimestamp - requestReceived),
  p50/p99 of non-watch requests during each burst, by verb;
- the load average before and after (the machine is shared).

Writes OUT_DIR/bench_scale-<utc time>.json with the commit and the config.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_reconcile import git_commit, percentile, ready_for_generation  # noqa: E402

OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
GROUP, VERSION, PLURAL = "serving.autoglm.io", "v1alpha1", "autoglmdeployments"


def manifest(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}},
    }


# ---- process figures -------------------------------------------------------------


def proc_figures(pid: int) -> dict[str, float]:
    """Peak RSS (MiB), current RSS (MiB) and CPU seconds of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {
        line.split(":")[0]: line.split(":")[1].strip()
        for line in status.splitlines()
        if ":" in line
    }
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024,
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
    }


def component_cpu(cluster: Any) -> dict[str, float]:
    """CPU seconds so far of each control-plane process (etcd, apiserver, kcm, scheduler, kwok)."""
    state = cluster.load_state()
    out: dict[str, float] = {}
    for name, pid in (state.pids if state is not None else {}).items():
        try:
            out[name] = proc_figures(pid)["cpu_s"]
        except (OSError, KeyError, IndexError):
            continue
    return out


KCM_SERIES = (
    "workqueue_queue_duration_seconds_sum",
    "workqueue_queue_duration_seconds_count",
)


def scrape_controller_manager(cluster: Any) -> dict[str, float]:
    """kube-controller-manager's work-queue waits (sums and counts, by queue), from its
    /metrics (allowed without credentials, see dev/cluster.py), and how many times its log
    says a request waited on its client-side rate limit (1.36 exports no metric for it)."""
    import ssl

    state = cluster.load_state()
    port = (state.ports if state is not None else {}).get("kube-controller-manager")
    if port is None:
        return {}
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/metrics", timeout=20, context=ctx
        ) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = defaultdict(float)
    log = Path(state.workdir) / "logs" / "kube-controller-manager.log" if state else None
    if log is not None and log.exists():
        with log.open(errors="replace") as fh:
            out["throttled_log_lines"] = sum("client-side throttling" in line for line in fh)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in KCM_SERIES:
                label = s.labels.get("name", "")
                out[f"{s.name}{{{label}}}" if label else s.name] += s.value
    return dict(out)


def delta_controller_manager(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Throttling log lines, and the mean work-queue wait per controller (seconds)."""

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out: dict[str, Any] = {
        "client_side_throttling_log_lines": int(d("throttled_log_lines")),
        "queue_wait_mean_s": {},
    }
    prefix = "workqueue_queue_duration_seconds_count{"
    for key in after:
        if key.startswith(prefix):
            name = key[len(prefix) : -1]
            n = d(key)
            if n > 0:
                total = d("workqueue_queue_duration_seconds_sum{" + name + "}")
                out["queue_wait_mean_s"][name] = round(total / n, 3)
    return out


def requests_by_agent(entries: list[dict[str, Any]], top: int = 25) -> dict[str, int]:
    """Every client's requests (watches excluded) by user agent, verb and resource."""
    out: Counter[str] = Counter()
    for e in entries:
        if e.get("verb") == "watch":
            continue
        agent = str(e.get("userAgent", "?")).split(" ")[0].split("/")[0]
        ref = e.get("objectRef") or {}
        resource = ref.get("resource", "?") + (
            "/" + ref["subresource"] if ref.get("subresource") else ""
        )
        out[f"{agent} {e['verb']} {resource}"] += 1
    return dict(out.most_common(top))


def scrape(port: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, Any] = {"buckets": {}, "queue_buckets": {}, "writes": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "autoglm_operator_reconcile_duration_seconds_bucket":
                out["buckets"][float(s.labels["le"])] = s.value
            elif s.name == "autoglm_operator_queue_wait_seconds_bucket":
                out["queue_buckets"][float(s.labels["le"])] = s.value
            elif s.name == "autoglm_operator_reconcile_duration_seconds_count":
                out["count"] = s.value
            elif s.name == "autoglm_operator_api_writes_total":
                out["writes"][f"{s.labels['verb']} {s.labels['kind']}"] = int(s.value)
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of the samples between two scrapes."""
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0.0)
    if total <= 0:
        return 0.0
    for le in bounds:
        if after[le] - before.get(le, 0.0) >= q * total:
            return le
    return bounds[-1]


def finite(x: float) -> float | None:
    """JSON has no Infinity: the +Inf bucket becomes None."""
    return x if x != float("inf") else None


# ---- the audit log -------------------------------------------------------------------


def audit_entries(path: Path, since: float, until: float) -> list[dict[str, Any]]:
    """Completed requests received in [since, until) (unix seconds)."""
    lo = datetime.datetime.fromtimestamp(since, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    hi = datetime.datetime.fromtimestamp(until, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out = []
    with path.open() as fh:
        for line in fh:
            entry = json.loads(line)
            if entry.get("stage") != "ResponseComplete":
                continue
            if lo <= entry.get("requestReceivedTimestamp", "") < hi:
                out.append(entry)
    return out


def parse_time(text: str) -> float:
    return (
        datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def operator_requests(entries: list[dict[str, Any]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for e in entries:
        if str(e.get("userAgent", "")).startswith(OPERATOR_AGENTS):
            out[f"{e['verb']} {e.get('objectRef', {}).get('resource', '?')}"] += 1
    return out


def apiserver_latency(entries: list[dict[str, Any]]) -> dict[str, Any]:
    by_verb: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        if e.get("verb") == "watch":
            continue
        seconds = parse_time(e["stageTimestamp"]) - parse_time(e["requestReceivedTimestamp"])
        by_verb[e["verb"]].append(seconds)
        by_verb["all"].append(seconds)
    return {
        verb: {
            "requests": len(xs),
            "p50_ms": round(1000 * percentile(xs, 0.5), 2),
            "p99_ms": round(1000 * percentile(xs, 0.99), 2),
        }
        for verb, xs in sorted(by_verb.items())
    }


# ---- one burst ---------------------------------------------------------------------------


class Watcher:
    """Watches AGDs, Deployments and Services in one namespace and notes when each object
    first had all of its children and first turned Ready."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.children: dict[str, set[str]] = defaultdict(set)
        self.children_at: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(kind,), daemon=True)
            for kind in ("agd", "deployments", "services")
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, kind: str) -> None:
        import kubernetes

        api_client = kubernetes.client.ApiClient()
        api_client.user_agent = "autoglm-bench"
        w = kubernetes.watch.Watch()
        if kind == "agd":
            api = kubernetes.client.CustomObjectsApi(api_client)
            fn, args = api.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL)
        elif kind == "deployments":
            fn, args = (
                kubernetes.client.AppsV1Api(api_client).list_namespaced_deployment,
                (self.namespace,),
            )
        else:
            fn, args = (
                kubernetes.client.CoreV1Api(api_client).list_namespaced_service,
                (self.namespace,),
            )
        while not self._stop.is_set():
            try:
                for event in w.stream(fn, *args, timeout_seconds=30, _request_timeout=60):
                    obj = event["object"]
                    now = time.monotonic()
                    if kind == "agd":
                        name = obj["metadata"]["name"]
                        if name not in self.ready_at and ready_for_generation(obj):
                            self.ready_at[name] = now
                    else:
                        meta = obj.metadata
                        owner = (meta.labels or {}).get("app.kubernetes.io/instance")
                        if owner is None:
                            continue
                        self.children[owner].add(f"{kind}/{meta.name}")
                        if owner not in self.children_at and len(self.children[owner]) >= 3:
                            self.children_at[owner] = now
                    if self._stop.is_set():
                        break
            except Exception:  # a dropped watch: open it again
                time.sleep(0.5)


def burst(cluster: Any, size: int, timeout_s: float, audit: Path, pid: int) -> dict[str, Any]:
    from autoglm_operator.k8s import KubeApi

    namespace = f"scale-{size}-{int(time.time())}"
    cluster.kubectl("create", "namespace", namespace)
    watcher = Watcher(namespace)
    watcher.start()
    time.sleep(2)  # the watches are open
    client = KubeApi.from_environment(pool=16)
    client.field_manager = "autoglm-bench"
    client._client.user_agent = "autoglm-bench"  # not counted as the operator's
    names = [f"m-{i:04d}" for i in range(size)]
    sent: dict[str, float] = {}
    before = proc_figures(pid)
    cpu_before = component_cpu(cluster)
    kcm_before = scrape_controller_manager(cluster)
    wall0 = time.time()
    start = time.monotonic()

    def create(name: str) -> None:
        sent[name] = time.monotonic()
        client.apply(manifest(name, namespace))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    applied_s = time.monotonic() - start
    deadline = start + timeout_s
    while len(watcher.ready_at) < size or len(watcher.children_at) < size:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    watcher.stop()
    wall1 = time.time()
    after = proc_figures(pid)
    cpu_after = component_cpu(cluster)
    kcm_after = scrape_controller_manager(cluster)
    missing_ready = [n for n in names if n not in watcher.ready_at]
    latencies = [watcher.ready_at[n] - sent[n] for n in names if n in watcher.ready_at]
    entries = audit_entries(audit, wall0, wall1)
    return {
        "namespace": namespace,
        "objects": size,
        "create_requests_s": round(applied_s, 2),
        "all_children_s": round(max(watcher.children_at.values()) - start, 2)
        if len(watcher.children_at) == size
        else None,
        "all_ready_s": round(max(watcher.ready_at.values()) - start, 2)
        if not missing_ready
        else None,
        "not_ready": len(missing_ready),
        "apply_to_ready_s": {
            "p50": round(percentile(latencies, 0.5), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies), 2),
        }
        if latencies
        else None,
        "operator_cpu_s": round(after["cpu_s"] - before["cpu_s"], 1),
        "operator_peak_rss_mib": round(after["peak_rss_mib"], 1),
        "operator_requests": dict(operator_requests(entries).most_common()),
        "apiserver_latency": apiserver_latency(entries),
        "control_plane_cpu_s": {
            k: round(cpu_after[k] - v, 1) for k, v in cpu_before.items() if k in cpu_after
        },
        "controller_manager": delta_controller_manager(kcm_before, kcm_after),
        "requests_by_agent": requests_by_agent(entries),
    }


def change_wave(
    port: int, audit: Path, namespace: str, indexes: range, spec: dict[str, Any]
) -> dict[str, Any]:
    """Apply ``spec`` on top of the objects ``indexes`` at once (16 threads), wait 60 s,
    and report the reconciles in that window from the operator's histograms."""
    from autoglm_operator.k8s import KubeApi

    client = KubeApi.from_environment(pool=16)
    client.field_manager = "autoglm-bench"
    client._client.user_agent = "autoglm-bench"
    before = scrape(port)

    def change(i: int) -> None:
        m = manifest(f"m-{i:04d}", namespace)
        m["spec"].update(spec)
        client.apply(m)

    w0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(change, indexes))
    time.sleep(60)
    after = scrape(port)
    entries = audit_entries(audit, w0, time.time())
    return {
        "changed_objects": len(indexes),
        "change": spec,
        "reconciles": int(after.get("count", 0) - before.get("count", 0)),
        # None: beyond the largest finite bucket (10 s).
        "reconcile_p50_le_s": finite(histogram_quantile(before["buckets"], after["buckets"], 0.5)),
        "reconcile_p99_le_s": finite(histogram_quantile(before["buckets"], after["buckets"], 0.99)),
        "queue_wait_p99_le_s": finite(
            histogram_quantile(before["queue_buckets"], after["queue_buckets"], 0.99)
        )
        if after["queue_buckets"]
        else None,
        "operator_requests": dict(operator_requests(entries).most_common()),
        "apiserver_latency": apiserver_latency(entries),
    }


def add_nodes(cluster: Any, count: int, gpus: int, timeout_s: float = 900) -> None:
    """Create ``count`` kwok GPU nodes in chunks (one 500-node apply can outlast kubectl's
    timeout on a busy machine) and wait until they are all Ready."""
    from autoglm_dev.cluster import build_node_manifest

    for first in range(0, count, 100):
        items = [
            build_node_manifest(f"gpu-node-{i}", gpus)
            for i in range(first, min(count, first + 100))
        ]
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
            timeout=300,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json", timeout=120).stdout)
        ready = [
            n
            for n in nodes["items"]
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions") or []
            )
        ]
        if len(ready) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ready)}/{count} nodes Ready after {timeout_s}s")
        time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--idle-seconds", type=float, default=150.0)
    parser.add_argument("--timeout-seconds", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--qps", type=float, default=None)
    parser.add_argument("--burst", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]

    from autoglm_dev.cluster import LocalCluster, free_port, install_crd, operator_command
    from autoglm_operator.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="autoglm-scale-"))
    cluster = LocalCluster(
        workdir / "cluster",
        nodes=min(args.nodes, 4),
        gpus_per_node=args.gpus_per_node,
        die_with_parent=True,
    )
    load_before = os.getloadavg()
    t0 = time.monotonic()
    cluster.start(timeout_s=600)
    add_nodes(cluster, args.nodes, args.gpus_per_node)
    cluster_start_s = time.monotonic() - t0
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    import kubernetes

    kubernetes.config.load_kube_config(config_file=str(cluster.kubeconfig))
    audit = workdir / "cluster" / "logs" / "audit.log"
    port = free_port()
    env = {**os.environ, "AUTOGLM_OPERATOR_METRICS_PORT": str(port)}
    for flag, var in (
        (args.workers, "WORKERS"),
        (args.qps, "API_QPS"),
        (args.burst, "API_BURST"),
    ):
        if flag is not None:
            env[f"AUTOGLM_OPERATOR_{var}"] = str(flag)
    settings = Settings.from_environ(env)
    log_path = workdir / "operator.log"
    operator: subprocess.Popen[bytes] | None = None
    try:
        install_crd(cluster)
        with log_path.open("wb") as log:
            operator = subprocess.Popen(
                operator_command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,  # not the checkout: its operator/ would shadow the stdlib
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                scrape(port)
                break
            except OSError:
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"operator did not start; see {log_path}") from None
                time.sleep(0.5)
        results: list[dict[str, Any]] = []
        for size in sizes:
            result = burst(cluster, size, args.timeout_seconds, audit, operator.pid)
            results.append(result)
            print(json.dumps(result))
        # Idle: everything Ready, nothing changing.
        time.sleep(20)
        idle0 = time.time()
        cpu0 = proc_figures(operator.pid)["cpu_s"]
        time.sleep(args.idle_seconds)
        idle1 = time.time()
        cpu1 = proc_figures(operator.pid)["cpu_s"]
        idle_requests = operator_requests(audit_entries(audit, idle0, idle1))
        minutes = (idle1 - idle0) / 60
        idle = {
            "seconds": round(idle1 - idle0, 1),
            "objects": sum(sizes),
            "requests_per_min": {k: round(v / minutes, 2) for k, v in idle_requests.items()},
            "writes": sum(
                v
                for k, v in idle_requests.items()
                if k.split()[0] in ("create", "update", "patch", "delete")
            ),
            "reads_excluding_watches": sum(
                v for k, v in idle_requests.items() if k.split()[0] in ("get", "list")
            ),
            "operator_cpu_percent": round(100 * (cpu1 - cpu0) / (idle1 - idle0), 1),
        }
        print(json.dumps({"idle": idle}))
        # After the burst, two waves on 10% of the largest namespace each: a spec change
        # that makes a new revision (a new Deployment and Service, the old ones deleted),
        # then, on other objects, a replica count (the Deployment alone).
        largest = results[-1]
        wave = max(1, sizes[-1] // 10)
        post = {
            "revision_wave": change_wave(
                port,
                audit,
                largest["namespace"],
                range(wave),
                {"server": {"batching": {"maxBatchSize": 32}}},
            ),
            "scale_wave": change_wave(
                port, audit, largest["namespace"], range(wave, 2 * wave), {"replicas": 2}
            ),
        }
        print(json.dumps({"after_burst": post}))
        figures = proc_figures(operator.pid)
        record = {
            "benchmark": "operator_scale",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "config": {
                "nodes": args.nodes,
                "gpus_per_node": args.gpus_per_node,
                "sizes": sizes,
                "operator_settings": {
                    "resync_seconds": settings.resync_seconds,
                    "workers": settings.workers,
                    "api_qps": settings.api_qps,
                    "api_burst": settings.api_burst,
                },
                "client_threads": 16,
                "spec": manifest("x", "y")["spec"],
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "cpu_model": next(
                    (
                        line.split(":", 1)[1].strip()
                        for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")
                    ),
                    "?",
                ),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "note": "2 shared cores: other work ran on the machine at the same time "
                "(see the load averages); the control plane, kwok, the operator and "
                "this client share them",
            },
            "cluster_start_s": round(cluster_start_s, 1),
            "bursts": results,
            "idle": idle,
            "after_burst": post,
            "operator": {
                "peak_rss_mib": round(figures["peak_rss_mib"], 1),
                "rss_mib_end": round(figures["rss_mib"], 1),
                "cpu_s_total": round(figures["cpu_s"], 1),
                "writes": scrape(port)["writes"],
            },
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = args.out_dir / f"bench_scale-{stamp}.json"
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
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
