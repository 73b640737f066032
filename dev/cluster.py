"""A real Kubernetes control plane as local processes on 127.0.0.1.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as they
would in a cluster; kwok plays the kubelets, so Nodes with ``nvidia.com/gpu``
capacity exist and scheduled pods go Running and Ready. Nothing runs
containers. This is the envtest approach plus the two components envtest
leaves out (controller-manager and scheduler), because our tests need
ReplicaSets, garbage collection and scheduling to be real.

State lives in one work directory: PKI, logs, etcd data, the admin kubeconfig
and ``state.json`` (pids and ports), so ``down`` and ``status`` work from
another process than ``up``.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .binaries import ensure_binaries
from .pki import PKIPaths, aggregation_layer_args, pki_paths, write_pki

log = logging.getLogger(__name__)

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Order of start; stop goes in reverse.
KWOK_STAGES = Path(__file__).resolve().parent / "kwok-stages.yaml"
# The API of record; the chart and manifests/base carry generated copies.
CRD_FILE = (
    Path(__file__).resolve().parents[1] / "crds" / "serving.autoglm.io_autoglmdeployments.yaml"
)
CRD_NAME = "autoglmdeployments.serving.autoglm.io"
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "agent",  # the node agent of the live nodes (autoglm_dev.agent), when asked for
    # The add-ons (autoglm_dev.addons), when asked for.
    "prometheus",
    "prometheus-adapter",
    "traefik",
)
# Seconds from SIGTERM to SIGKILL. The apiserver's HTTP server waits up to 60 s
# for requests still open (watches that the grace period below did not close).
STOP_TIMEOUT_S = {"kube-apiserver": 70.0, "agent": 20.0}


class ClusterError(RuntimeError):
    """The control plane could not start, or a component died."""


class ComponentCrashed(ClusterError):
    def __init__(self, name: str, returncode: int | None, log_tail: str) -> None:
        super().__init__(
            f"{name} exited with code {returncode} during start-up; last lines of its log:\n{log_tail}"
        )
        self.component = name
        self.returncode = returncode


@dataclass(slots=True)
class ClusterState:
    """What ``state.json`` holds."""

    workdir: str
    kubeconfig: str
    server: str
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    started_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    name: str
    pid: int
    alive: bool
    log_tail: str


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the control plane, the demo and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); read its state to tell.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM the child when its parent dies, so a
    killed test run leaves no control plane behind."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def build_node_manifest(name: str, gpus: int, gpu_product: str = GPU_PRODUCT) -> dict[str, object]:
    """A kwok-managed Node with GPU capacity and the GPU product label that
    NVIDIA's GPU feature discovery would set."""
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": gpu_product,
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "spec": {
            "taints": [
                {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
            ],
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


class LocalCluster:
    """Start, inspect and stop a local control plane rooted at ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: int = 4,
        gpus_per_node: int = 8,
        gpu_product: str = GPU_PRODUCT,
        die_with_parent: bool = False,
        live_nodes: int = 0,
        max_processes: int = 6,
        addons: bool = False,
    ) -> None:
        self.workdir = workdir
        # Prometheus, prometheus-adapter, Gateway API + Traefik (autoglm_dev.addons).
        self.addons = addons
        self.nodes = nodes
        # Nodes whose pods really run (autoglm_dev.agent), beside kwok's simulated ones.
        self.live_nodes = live_nodes
        self.max_processes = max_processes
        self.gpus_per_node = gpus_per_node
        self.gpu_product = gpu_product
        self.die_with_parent = die_with_parent
        self.kubeconfig = workdir / "kubeconfig"
        self.state_path = workdir / "state.json"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._kubectl: Path | None = None  # resolved on first use

    # ---- inspection -------------------------------------------------------

    def load_state(self) -> ClusterState | None:
        try:
            return ClusterState(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def status(self) -> list[ComponentStatus]:
        state = self.load_state()
        if state is None:
            return []
        return [
            ComponentStatus(
                name, pid, _pid_alive(pid), _tail(self.workdir / "logs" / f"{name}.log", 10)
            )
            for name, pid in state.pids.items()
        ]

    def is_running(self) -> bool:
        statuses = self.status()
        return bool(statuses) and all(s.alive for s in statuses)

    # ---- lifecycle --------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> ClusterState:
        """Start every component and wait until the nodes are Ready.

        Raises ComponentCrashed with the log tail of the first component that
        exits; everything started so far is stopped again.
        """
        if self.is_running():
            state = self.load_state()
            assert state is not None
            return state
        self.stop()  # clean up a half-dead earlier run
        bins = ensure_binaries(
            (
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kwok",
                "kubectl",
            )
        )
        self._kubectl = bins["kubectl"]
        started = time.monotonic()
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "logs").mkdir(parents=True)
        pki = write_pki(self.workdir / "pki")
        ports = {
            "etcd": free_port(),
            "etcd-peer": free_port(),
            "kube-apiserver": free_port(),
            "kube-controller-manager": free_port(),
            "kube-scheduler": free_port(),
        }
        server = f"https://127.0.0.1:{ports['kube-apiserver']}"
        state = ClusterState(
            workdir=str(self.workdir),
            kubeconfig=str(self.kubeconfig),
            server=server,
            ports=ports,
            nodes=self.nodes,
        )
        deadline = started + timeout_s
        try:
            self._spawn("etcd", bins["etcd"], self._etcd_args(ports), state)
            self._wait(
                "etcd", lambda: self._http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), deadline
            )
            self._spawn(
                "kube-apiserver", bins["kube-apiserver"], self._apiserver_args(ports, pki), state
            )
            self._write_kubeconfig(server, pki)
            self._wait(
                "kube-apiserver", lambda: self._apiserver_ok(server, pki, "/readyz"), deadline
            )
            self._spawn(
                "kube-controller-manager",
                bins["kube-controller-manager"],
                self._controller_manager_args(ports, pki),
                state,
            )
            self._spawn(
                "kube-scheduler", bins["kube-scheduler"], self._scheduler_args(ports), state
            )
            self._spawn("kwok", bins["kwok"], self._kwok_args(), state)
            if self.live_nodes:
                self._spawn("agent", Path(sys.executable), self._agent_args(), state)
            for name in ("kube-controller-manager", "kube-scheduler"):
                url = f"https://127.0.0.1:{ports[name]}/healthz"
                self._wait(name, functools.partial(self._http_ok, url, insecure=True), deadline)
            if self.nodes:  # a cluster of live nodes only has no kwok node
                self.apply_nodes(self.nodes)
            self._wait("kwok", self._nodes_ready, deadline)
            if self.live_nodes:
                self._wait("agent", self._agent_up, deadline)
            self._wait("kube-controller-manager", self._default_sa_ready, deadline)
            if self.addons:
                from .addons import start_addons

                start_addons(self, state, pki)
        except BaseException:
            self.stop()
            raise
        state.started_at = time.time()
        self.state_path.write_text(json.dumps(asdict(state), indent=2))
        log.info("control plane up in %.1fs at %s", time.monotonic() - started, server)
        return state

    def start_agent(self, live_nodes: int = 1, timeout_s: float = 60.0) -> None:
        """Start the node agent with ``live_nodes`` live nodes on a running
        cluster, unless it runs already; returns when its nodes are Ready."""
        state = self.load_state()
        if state is None:
            raise ClusterError("the control plane is not running")
        pid = state.pids.get("agent")
        if pid is not None and _pid_alive(pid):
            return
        self.live_nodes = live_nodes
        self._spawn("agent", Path(sys.executable), self._agent_args(), state)
        self._wait("agent", self._agent_up, time.monotonic() + timeout_s)

    def _agent_up(self) -> bool:
        """The agent registered its nodes (its log says so: a node from an
        earlier agent may still look Ready) and they are Ready."""
        up = "node agent up" in _tail(self.workdir / "logs" / "agent.log", 200)
        return up and self._nodes_ready()

    def start_addons(self) -> None:
        """Start the add-ons (autoglm_dev.addons) on a running cluster, unless
        they run already; returns when they serve."""
        from .addons import start_addons

        state = self.load_state()
        if state is None:
            raise ClusterError("the control plane is not running")
        start_addons(self, state, pki_paths(self.workdir / "pki"))
        self.addons = True

    def stop_apiserver(self) -> None:
        """Stop the kube-apiserver alone, as an outage would (fault tests); the
        rest keeps running. ``start_apiserver`` brings it back on the same port."""
        state = self.load_state()
        if state is None or "kube-apiserver" not in state.pids:
            raise ClusterError("the control plane is not running")
        self._terminate("kube-apiserver", state.pids["kube-apiserver"], 70.0)
        self._procs.pop("kube-apiserver", None)

    def start_apiserver(self, timeout_s: float = 120.0) -> None:
        """Start the kube-apiserver again after ``stop_apiserver``; returns when it is ready."""
        state = self.load_state()
        if state is None:
            raise ClusterError("the control plane is not running")
        pki = pki_paths(self.workdir / "pki")
        binary = ensure_binaries(("kube-apiserver",))["kube-apiserver"]
        self._spawn("kube-apiserver", binary, self._apiserver_args(state.ports, pki), state)
        self._wait(
            "kube-apiserver",
            lambda: self._apiserver_ok(state.server, pki, "/readyz"),
            time.monotonic() + timeout_s,
        )

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop every component (reverse order), SIGTERM then SIGKILL, and reap.

        Each component gets ``timeout_s`` (default: ``STOP_TIMEOUT_S``) to exit
        after SIGTERM. The apiserver drains its watches within
        ``--shutdown-watch-termination-grace-period`` and closes the rest of its
        server within 60 s, so it gets longer than that before SIGKILL.
        """
        state = self.load_state()
        pids: dict[str, int] = dict(state.pids) if state else {}
        pids.update({n: p.pid for n, p in self._procs.items()})
        for name in reversed(COMPONENTS):
            pid = pids.get(name)
            if pid is None:
                continue
            wait = timeout_s if timeout_s is not None else STOP_TIMEOUT_S.get(name, 15.0)
            self._terminate(name, pid, wait)
        self._procs.clear()
        if self.state_path.exists():
            self.state_path.unlink()

    # ---- kubectl ----------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        if self._kubectl is None:
            self._kubectl = ensure_binaries(("kubectl",))["kubectl"]
        return run_kubectl(
            str(self._kubectl), self.kubeconfig, args, input=input, check=check, timeout=timeout
        )

    def apply_nodes(self, count: int) -> None:
        """Create (or keep) ``count`` GPU nodes named ``gpu-node-<i>``."""
        items = [
            build_node_manifest(f"gpu-node-{i}", self.gpus_per_node, self.gpu_product)
            for i in range(count)
        ]
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

    # ---- internals --------------------------------------------------------

    def _spawn(self, name: str, binary: Path, args: Sequence[str], state: ClusterState) -> None:
        logfile = (self.workdir / "logs" / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(binary), *args],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        logfile.close()
        self._procs[name] = proc
        state.pids[name] = proc.pid
        # Written at every step so that `down` finds a partial start too.
        self.state_path.write_text(json.dumps(asdict(state), indent=2))

    def _wait(self, name: str, ready: Callable[[], bool], deadline: float) -> None:
        while True:
            for comp, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ComponentCrashed(
                        comp, proc.returncode, _tail(self.workdir / "logs" / f"{comp}.log")
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{name} not ready in time; last lines of its log:\n"
                    f"{_tail(self.workdir / 'logs' / f'{name}.log')}"
                )
            time.sleep(0.2)

    def _terminate(self, name: str, pid: int, timeout_s: float) -> None:
        proc = self._procs.get(name)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not _pid_alive(pid):
                return
            time.sleep(0.1)
        log.warning("%s (pid %d) ignored SIGTERM; killing it", name, pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if proc is not None:
            proc.wait(timeout=5)

    @staticmethod
    def _http_ok(url: str, insecure: bool = False, context: ssl.SSLContext | None = None) -> bool:
        if insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _apiserver_ok(self, server: str, pki: PKIPaths, path: str) -> bool:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        return self._http_ok(server + path, context=context)

    def _nodes_ready(self) -> bool:
        proc = self.kubectl("get", "nodes", "-o", "json", check=False)
        if proc.returncode != 0:
            return False
        items = json.loads(proc.stdout)["items"]
        ready = [
            n
            for n in items
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
        ]
        return len(ready) >= self.nodes + self.live_nodes

    def _default_sa_ready(self) -> bool:
        # The service-account controller is a sign that controller-manager's
        # informers have synced, so the first test is not racing its start.
        return (
            self.kubectl(
                "get", "serviceaccount", "default", "-n", "default", check=False
            ).returncode
            == 0
        )

    def _write_kubeconfig(self, server: str, pki: PKIPaths) -> None:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "autoglm-local",
                    "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki.admin_cert),
                        "client-key-data": b64(pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": "autoglm-local", "context": {"cluster": "autoglm-local", "user": "admin"}}
            ],
            "current-context": "autoglm-local",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    def _etcd_args(self, ports: dict[str, int]) -> list[str]:
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]

    def _apiserver_args(self, ports: dict[str, int], pki: PKIPaths) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['kube-apiserver']}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.client_ca_cert}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            # Room for thousands of Services (a /24 runs out at 254 ClusterIPs).
            "--service-cluster-ip-range=10.0.0.0/16",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            *aggregation_layer_args(pki),
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            # Close open watches at shutdown (rate limited) instead of letting
            # them hold the HTTP server for its 60 s shutdown timeout.
            "--shutdown-watch-termination-grace-period=5s",
            # Audit every request, so tests can count what the operator sent.
            f"--audit-policy-file={self._write_audit_policy()}",
            f"--audit-log-path={self.workdir / 'logs' / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]

    def _write_audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            # Every request to a resource, reads included (each entry has its verb,
            # user agent and latency), so tests can count what a client sent, e.g.
            # that the operator reads nothing at idle. Health probes are left out.
            "rules": [
                {"level": "None", "nonResourceURLs": ["*"]},
                {"level": "Metadata"},
            ],
        }
        path.write_text(json.dumps(policy))
        return path

    def _controller_manager_args(self, ports: dict[str, int], pki: PKIPaths) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-controller-manager']}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            "--use-service-account-credentials=false",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            # HPAs act quickly in tests; defaults are for production.
            "--horizontal-pod-autoscaler-sync-period=5s",
            "--node-monitor-grace-period=10m",
            # Sized for the scale benchmark (1,000 AutoGLMDeployments on 500 nodes, where
            # each one costs the Deployment, ReplicaSet and endpoint controllers about 17
            # requests): client-go's defaults (20 requests/s, 5 workers per controller)
            # would make the control plane, not the operator, the limit (bench/README.md).
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--concurrent-deployment-syncs=20",
            "--concurrent-replicaset-syncs=20",
            "--concurrent-service-endpoint-syncs=20",
            "--concurrent-endpoint-syncs=20",
        ]

    def _scheduler_args(self, ports: dict[str, int]) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-scheduler']}",
            # One binding and one event per pod: 1,000 pods at once (the scale benchmark).
            "--kube-api-qps=100",
            "--kube-api-burst=200",
        ]

    def _kwok_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            # Pod IPs on fake nodes: room for thousands of pods (a /24 runs out at 254).
            "--cidr=10.244.0.1/16",
            "--node-ip=10.0.0.1",
            # kwok renews every node's Lease well inside its duration: at 40 s that was
            # about 22 updates/s for 500 nodes, a third of the apiserver's requests during
            # the scale benchmark (bench/README.md). 300 s cuts it about 7x and stays inside
            # the controller manager's --node-monitor-grace-period (10 min).
            "--node-lease-duration-seconds=300",
        ]

    def _agent_args(self) -> list[str]:
        return [
            "-m",
            "autoglm_dev.agent",
            f"--workdir={self.workdir}",
            f"--kubeconfig={self.kubeconfig}",
            f"--nodes={self.live_nodes}",
            f"--gpus={self.gpus_per_node}",
            f"--max-processes={self.max_processes}",
        ]


def default_workdir(name: str = "default") -> Path:
    from .binaries import cache_root

    return cache_root() / "clusters" / name


class ExistingCluster:
    """A cluster the user brought (``AUTOGLM_USE_EXISTING_CLUSTER=true`` and
    ``KUBECONFIG``): the same ``kubeconfig`` and ``kubectl()`` as LocalCluster,
    and nothing is started or stopped."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        kubectl = shutil.which("kubectl") or str(ensure_binaries(("kubectl",))["kubectl"])
        return run_kubectl(
            kubectl, self.kubeconfig, args, input=input, check=check, timeout=timeout
        )


def run_kubectl(
    kubectl: str,
    kubeconfig: Path,
    args: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl against ``kubeconfig``; with ``check``, a failure raises ClusterError with its stderr."""
    proc = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def operator_command(*scope: str) -> list[str]:
    """The command that runs the operator from this checkout's environment
    (``kopf run <scope> -m autoglm_operator.handlers``); ``scope`` defaults to
    ``--standalone --all-namespaces``. Run it with a working directory other than
    the checkout's root, whose ``operator/`` would shadow the standard library."""
    return [
        sys.executable,
        "-m",
        "kopf",
        "run",
        *(scope or ("--standalone", "--all-namespaces")),
        "-m",
        "autoglm_operator.handlers",
    ]


def install_crd(cluster: LocalCluster | ExistingCluster) -> Path:
    """Server-side apply the AutoGLMDeployment CRD and wait until it is served."""
    from .waiting import wait_until

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))

    # Polled: `kubectl wait --for=condition=Established` fails at once (".status.conditions
    # accessor error") when it reads a fresh CRD before any condition is written.
    def established() -> bool:
        jsonpath = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        got = cluster.kubectl("get", f"crd/{CRD_NAME}", "-o", jsonpath, check=False)
        return got.stdout.strip() == "True"

    wait_until(established, timeout=60, interval=0.2, message=f"crd/{CRD_NAME} Established")
    return CRD_FILE
