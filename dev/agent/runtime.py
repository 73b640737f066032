"""The node agent's I/O shell: node registration, pod watches, processes, probes.

One asyncio loop. Per live node: a list-then-watch of the pods bound to it.
Per pod: a :class:`PodWorker` task (pod IP, volumes, status, deletion), and
per container a :class:`ContainerWorker` task (start, probes, restarts). The
decisions are in :mod:`autoglm_dev.agent.plan`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import plan
from .kube import KubeClient, KubeError, WatchExpired, pod_path
from .plan import ContainerConfigError, ContainerView, Manifest, NodeContext, PodView, ProbePlan

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1
POLL_S = 0.25


def _die_with_agent() -> None:
    """preexec_fn: SIGKILL the server when the agent dies, so nothing outlives it."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def rfc3339(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def micro_time(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )


def _tail_bytes(path: Path, size: int = 16384) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read()
    except OSError:
        return b""


class AgentError(RuntimeError):
    """The agent can't run on this machine."""


async def _ip(*args: str) -> tuple[int, str]:
    """Run ``ip`` (iproute2); (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    workdir: Path
    kubeconfig: Path
    nodes: int = 1
    first_node: int = 0  # nodes gpu-live-<first>..<first+nodes-1> (a second agent takes others)
    gpus_per_node: int = 8
    max_processes: int = 6
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 300.0
    backoff_reset_s: float = 600.0  # a run this long resets the back-off
    shutdown_grace_s: float = 10.0  # agent stop: SIGTERM, then SIGKILL after this
    threads_per_process: int = 1
    server_bin: str = ""
    kubelet_version: str = "v0.0.0"
    models_root: Path | None = None
    pod_network: str = "auto"  # or a network whose /24s are the nodes' podCIDRs
    lock_dir: Path = Path(tempfile.gettempdir()) / "autoglm-pod-networks"

    @property
    def indices(self) -> range:
        return range(self.first_node, self.first_node + self.nodes)

    @property
    def models(self) -> Path:
        return self.models_root or self.workdir / "models"


def claim_pod_network(
    requested: str, lock_dir: Path, prefer: ipaddress.IPv4Network | None = None
) -> tuple[ipaddress.IPv4Network, IO[str]]:
    """Claim a pod network for this agent's lifetime: the first candidate whose
    lock file (machine-wide, under ``lock_dir``) no running agent holds. The lock
    goes with the process, so a killed agent frees its network. ``prefer``: the
    block a restarted agent's nodes already have (their podCIDRs are immutable)."""
    if requested == "auto":
        candidates = plan.plan_pod_network_blocks()
        if prefer is not None:
            candidates = [b for b in candidates if prefer.subnet_of(b)] + [
                b for b in candidates if not prefer.subnet_of(b)
            ]
    else:
        candidates = [ipaddress.IPv4Network(requested)]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for network in candidates:
        fh = (lock_dir / f"{network.network_address}_{network.prefixlen}.lock").open("w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        return network, fh
    raise AgentError(
        f"no free pod network: {', '.join(map(str, candidates))} are all held by running agents"
    )


class NodeAgent:
    """The kubelet of the live nodes, for server pods."""

    def __init__(self, config: AgentConfig, kube: KubeClient) -> None:
        self.config = config
        self.kube = kube
        self.network = plan.POD_NETWORK  # claimed in run()
        self._network_lock: IO[str] | None = None
        self.ctx = NodeContext(
            server_bin=config.server_bin,
            path=os.pathsep.join(
                [str(Path(config.server_bin).parent), "/usr/local/bin", "/usr/bin", "/bin"]
            ),
            models_root=config.models,
            threads=config.threads_per_process,
        )
        self.workers: dict[str, PodWorker] = {}
        self.live_processes = 0
        self.slot_freed = asyncio.Event()
        self._ips: dict[int, dict[str, str]] = {i: {} for i in config.indices}  # ip -> uid
        self._last_ip: dict[int, str | None] = {i: None for i in config.indices}
        self._tasks: list[asyncio.Task[None]] = []
        self._netns: tuple[str, str] | None = None  # (namespace, host veth) of the pod network

    async def _setup_pod_namespace(self) -> None:
        """Put this agent's pod network in a network namespace of its own.

        The pods' servers run inside it (``ip netns exec``); the pod addresses
        are local there (one ``local`` route per node /24 on the namespace's
        ``lo``), and the host reaches them over a veth pair whose host end has
        the block's gateway address. So every address a test, Prometheus or
        the Gateway connects to belongs to a namespace the cluster made itself,
        and nothing is added to the host's own interfaces but that veth.
        """
        if self.network.subnet_of(plan.LOOPBACK_NETWORK):
            log.warning(
                "pod network %s is inside 127.0.0.0/8: EndpointSlices can't list its pods",
                self.network,
            )
            return
        ns = plan.pod_namespace_name(self.network)
        host_if = plan.pod_veth_name(self.network)
        gateway = plan.compute_pod_gateway(self.network)
        # Left over by an agent of this block that was killed: start clean.
        await _ip("netns", "del", ns)
        await _ip("link", "del", host_if)
        steps: list[tuple[str, ...]] = [
            ("netns", "add", ns),
            ("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns),
            ("addr", "add", f"{gateway}/32", "dev", host_if),
            ("link", "set", host_if, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
            ("-n", ns, "link", "set", "eth0", "up"),
            ("-n", ns, "route", "add", f"{gateway}/32", "dev", "eth0"),
            ("route", "add", str(self.network), "dev", host_if, "src", gateway),
        ]
        for i in self.config.indices:
            cidr = plan.compute_pod_cidr(i, self.network)
            steps.append(("-n", ns, "route", "add", "local", str(cidr), "dev", "lo"))
        for step in steps:
            rc, err = await _ip(*step)
            if rc != 0:
                await self._teardown_pod_namespace(ns, host_if)
                raise AgentError(
                    f"can't set up the pod network namespace {ns} (ip {' '.join(step)}: "
                    f"{err.strip()}); the agent needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root), "
                    "or --pod-network inside 127.0.0.0/8 (then no Service lists the pods)"
                )
        self._netns = (ns, host_if)

    def argv_in_pod_network(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the pod network namespace (``ip netns exec``
        execs in place: the process, its pid and its signals are the server's)."""
        if self._netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self._netns[0], *argv]

    async def _teardown_pod_namespace(self, ns: str, host_if: str) -> None:
        await _ip("netns", "del", ns)  # takes the veth pair with it
        await _ip("link", "del", host_if)

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        for sub in ("pods", "logs/pods"):
            (self.config.workdir / sub).mkdir(parents=True, exist_ok=True)
        prefer = None
        with contextlib.suppress(KubeError, ValueError):
            node = await self.kube.get(
                f"/api/v1/nodes/{plan.live_node_name(self.config.first_node)}"
            )
            if node is not None and node.get("spec", {}).get("podCIDR"):
                prefer = ipaddress.IPv4Network(node["spec"]["podCIDR"])
        self.network, self._network_lock = claim_pod_network(
            self.config.pod_network, self.config.lock_dir, prefer
        )
        await self._setup_pod_namespace()
        for attempt in range(60):
            try:
                await self.register_nodes()
                break
            except KubeError as exc:
                if attempt == 59:
                    raise
                log.warning("registering the nodes failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        for i in self.config.indices:
            self._tasks.append(asyncio.create_task(self._watch_node(i), name=f"watch-{i}"))
        log.info(
            "node agent up: nodes %s, pod network %s, at most %d server processes",
            ", ".join(plan.live_node_name(i) for i in self.config.indices),
            self.network,
            self.config.max_processes,
        )
        await stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop watching, then stop every process: SIGTERM, SIGKILL after the grace."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self.workers.values())
        await asyncio.gather(*(w.stop_for_shutdown() for w in workers), return_exceptions=True)
        if self._netns is not None:
            await self._teardown_pod_namespace(*self._netns)
        log.info("node agent stopped (%d pods' processes ended)", len(workers))

    # ---- nodes -----------------------------------------------------------------------

    async def register_nodes(self) -> None:
        for i in self.config.indices:
            node = plan.build_live_node(i, self.config.gpus_per_node, self.network)
            name = node["metadata"]["name"]
            created = await self.kube.create("/api/v1/nodes", node)
            if created is None:
                await self.kube.merge_patch(
                    f"/api/v1/nodes/{name}",
                    {
                        "metadata": {"labels": node["metadata"]["labels"]},
                        "spec": {"taints": node["spec"]["taints"]},
                    },
                )
            await self._patch_node_status(i)
            try:
                await self._renew_lease(i)
            except KubeError as exc:  # the heartbeat retries
                log.warning("lease of %s not written yet: %s", name, exc)

    async def _patch_node_status(self, index: int) -> None:
        status = plan.build_node_status(
            index,
            self.config.gpus_per_node,
            rfc3339(),
            self.config.kubelet_version,
            self.network,
        )
        await self.kube.merge_patch(
            f"/api/v1/nodes/{plan.live_node_name(index)}/status", {"status": status}
        )

    async def _renew_lease(self, index: int) -> None:
        name = plan.live_node_name(index)
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_time()}
        try:
            await self.kube.merge_patch(f"{path}/{name}", {"spec": spec})
        except KubeError as exc:
            if exc.status != 404:
                raise
            await self.kube.create(
                path,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": spec,
                },
            )

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(10)
            beats += 1
            for i in self.config.indices:
                try:
                    await self._renew_lease(i)
                    if beats % 6 == 0:
                        await self._patch_node_status(i)
                except KubeError as exc:
                    log.warning("heartbeat of %s failed: %s", plan.live_node_name(i), exc)

    # ---- pods ------------------------------------------------------------------------

    async def _watch_node(self, index: int) -> None:
        node = plan.live_node_name(index)
        params = {"fieldSelector": f"spec.nodeName={node}"}
        while True:
            try:
                listing = await self.kube.request("GET", "/api/v1/pods", params=params)
                rv = str(listing["metadata"]["resourceVersion"])
                seen = set()
                for pod in listing.get("items") or []:
                    seen.add(pod["metadata"]["uid"])
                    self._on_pod(pod, index)
                for uid, worker in list(self.workers.items()):
                    if worker.node_index == index and uid not in seen:
                        worker.vanish()
                while True:
                    async for event in self.kube.watch("/api/v1/pods", params, rv):
                        obj = event["object"]
                        rv = str(obj.get("metadata", {}).get("resourceVersion", rv))
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            gone = self.workers.get(obj["metadata"]["uid"])
                            if gone is not None:
                                gone.vanish()
                        else:
                            self._on_pod(obj, index)
            except WatchExpired:
                log.info("watch of %s expired; listing again", node)
            except KubeError as exc:
                log.warning("watch of %s failed: %s; retrying", node, exc)
                await asyncio.sleep(1.0)

    def _on_pod(self, pod: Manifest, index: int) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod[
                "metadata"
            ].get("deletionTimestamp"):
                return  # finished before we saw it (e.g. an agent restart): nothing to run
            existing = pod.get("status", {}).get("podIP")
            if existing:  # (an agent restart) reserved before any new pod is given one
                self._ips[index].setdefault(existing, uid)
            worker = PodWorker(self, pod, index)
            self.workers[uid] = worker
            worker.task = asyncio.create_task(worker.run(), name=f"pod-{uid}")
        else:
            worker.update(pod)

    def forget(self, worker: PodWorker) -> None:
        self.workers.pop(worker.uid, None)
        ips = self._ips[worker.node_index]
        for ip, uid in list(ips.items()):
            if uid == worker.uid:
                del ips[ip]

    def allocate_ip(self, index: int, uid: str, existing: str | None) -> str:
        ips = self._ips[index]
        cidr = plan.compute_pod_cidr(index, self.network)
        owner = ips.get(existing) if existing else None
        if existing and owner in (None, uid) and ipaddress.IPv4Address(existing) in cidr:
            ips[existing] = uid
            return existing
        ip = plan.allocate_pod_ip(cidr, ips.keys(), self._last_ip[index])
        ips[ip] = uid
        self._last_ip[index] = ip
        return ip

    # ---- the process cap -------------------------------------------------------------

    def try_acquire_slot(self) -> bool:
        if self.live_processes >= self.config.max_processes:
            return False
        self.live_processes += 1
        return True

    def release_slot(self) -> None:
        self.live_processes -= 1
        self.slot_freed.set()
        self.slot_freed = asyncio.Event()

    # ---- events ----------------------------------------------------------------------

    async def emit(
        self, pod: Manifest, type_: str, reason: str, message: str, field_path: str = ""
    ) -> None:
        meta = pod["metadata"]
        now = rfc3339()
        involved: Manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        }
        if field_path:
            involved["fieldPath"] = field_path
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": plan.AGENT_NAME, "host": pod["spec"].get("nodeName", "")},
            "reportingComponent": plan.AGENT_NAME,
            "reportingInstance": pod["spec"].get("nodeName", ""),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.kube.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except KubeError as exc:
            log.warning(
                "event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], exc
            )


class PodWorker:
    """One pod: its IP, volumes, containers, status and deletion."""

    def __init__(self, agent: NodeAgent, pod: Manifest, node_index: int) -> None:
        self.agent = agent
        self.pod = pod
        self.node_index = node_index
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.ns}_{self.name}_{self.uid}"
        self.dir = agent.config.workdir / "pods" / self.key
        self.log_dir = agent.config.workdir / "logs" / "pods" / self.key
        self.deleting = asyncio.Event()
        self.gone = False
        self.stopping = False  # the agent is shutting down: no restarts, no writes
        self.ip: str | None = None
        self.start_time = pod.get("status", {}).get("startTime") or rfc3339()
        self.containers = [
            ContainerWorker(self, c, pod.get("status", {}))
            for c in pod["spec"].get("containers") or []
        ]
        self.volumes: dict[str, plan.VolumePlan] = {}
        self.task: asyncio.Task[None] | None = None
        self._written: Manifest | None = None
        self._publish_lock = asyncio.Lock()
        self._terminal_phase: str | None = None
        if meta.get("deletionTimestamp"):
            self.deleting.set()

    def update(self, pod: Manifest) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def vanish(self) -> None:
        """The pod object is gone (force-deleted): stop its processes, write nothing."""
        self.gone = True
        self.deleting.set()

    @property
    def grace_s(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return float(grace)

    # ---- run -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s: worker failed", self.ns, self.name)
        finally:
            self.agent.forget(self)

    async def _run(self) -> None:
        if self.deleting.is_set() and not any(c.has_run for c in self.containers):
            await self._finalize()
            return
        existing = self.pod.get("status", {}).get("podIP")
        self.ip = self.agent.allocate_ip(self.node_index, self.uid, existing)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "home").mkdir(exist_ok=True)
        log.info("pod %s/%s: IP %s", self.ns, self.name, self.ip)
        await self.publish()
        tasks = [asyncio.create_task(c.run(), name=f"{self.key}/{c.name}") for c in self.containers]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        if not self.deleting.is_set():
            # restartPolicy Never/OnFailure: everything finished. Keep the pod.
            codes = [c.exit_code for c in self.containers]
            self._terminal_phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
            await self.publish()
            await self.deleting.wait()
        await self._finalize()

    async def _finalize(self) -> None:
        """All processes are gone: write the final status, then remove the pod
        (delete with grace 0, as the kubelet does once the containers stopped)."""
        if not self.gone:
            if self._terminal_phase is None:
                codes = [c.exit_code for c in self.containers]
                self._terminal_phase = (
                    "Succeeded" if all(c in (0, None) for c in codes) else "Failed"
                )
            with contextlib.suppress(KubeError):
                await self.publish()
            try:
                await self.agent.kube.delete(
                    pod_path(self.ns, self.name),
                    {
                        "apiVersion": "v1",
                        "kind": "DeleteOptions",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": self.uid},
                    },
                )
            except KubeError as exc:
                log.warning("pod %s/%s: final delete failed: %s", self.ns, self.name, exc)
        shutil.rmtree(self.dir, ignore_errors=True)
        log.info("pod %s/%s: removed", self.ns, self.name)

    async def stop_for_shutdown(self) -> None:
        """The agent is stopping: SIGTERM the processes, SIGKILL after the agent's
        grace (at most the pod's); the pod objects are left as they are."""
        self.stopping = True
        grace = min(self.grace_s, self.agent.config.shutdown_grace_s)
        await asyncio.gather(*(c.terminate(grace) for c in self.containers))
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # ---- volumes ---------------------------------------------------------------------

    async def prepare_volumes(self) -> dict[str, plan.VolumePlan]:
        """Create or refresh the pod's volumes (ConfigMaps and Secrets are re-read)."""
        plans = plan.plan_volumes(self.pod, self.dir, self.agent.config.models)
        for vol in plans:
            if vol.kind in ("configMap", "secret"):
                await self._write_keyed_volume(vol)
            elif vol.kind == "emptyDir":
                vol.local.mkdir(parents=True, exist_ok=True)
        self.volumes = {v.name: v for v in plans}
        return self.volumes

    async def _write_keyed_volume(self, vol: plan.VolumePlan) -> None:
        resource = "configmaps" if vol.kind == "configMap" else "secrets"
        obj = await self.agent.kube.get(
            f"/api/v1/namespaces/{self.ns}/{resource}/{vol.source_name}"
        )
        if obj is None:
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f'{resource[:-1]} "{vol.source_name}" not found',
            )
        files: dict[str, bytes] = {}
        if vol.kind == "configMap":
            files.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
            files.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            files.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        if vol.items:
            files = {path: files[key] for key, path in vol.items if key in files}
        if vol.local.exists():
            shutil.rmtree(vol.local)
        vol.local.mkdir(parents=True)
        for rel, content in files.items():
            target = vol.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)

    # ---- status ----------------------------------------------------------------------

    def view(self) -> PodView:
        views = tuple(c.view() for c in self.containers)
        phase: Any = "Pending"
        if self._terminal_phase is not None:
            phase = self._terminal_phase
        elif any(c.has_run for c in self.containers):
            phase = "Running"
        return PodView(
            phase=phase,
            host_ip=plan.compute_node_ip(self.node_index, self.agent.network),
            pod_ip=self.ip,
            start_time=self.start_time,
            containers=views,
            sandbox_ready=self.ip is not None,
        )

    async def publish(self) -> None:
        """Write the pod's status if it changed (JSON merge patch of ``status``)."""
        if self.gone or self.stopping:
            return
        async with self._publish_lock:
            previous = self._written or self.pod.get("status", {})
            status = plan.build_pod_status(previous, self.view(), rfc3339())
            if not plan.compute_status_changed(previous, status):
                return
            try:
                await self.agent.kube.merge_patch(
                    pod_path(self.ns, self.name, "status"),
                    {"metadata": {"uid": self.uid}, "status": status},
                )
                self._written = status
            except KubeError as exc:
                if exc.status == 404:
                    self.vanish()
                    return
                log.warning("pod %s/%s: status not written: %s", self.ns, self.name, exc)


class ContainerWorker:
    """One container as a process: start, probe, restart with back-off, stop."""

    def __init__(self, pod: PodWorker, spec: Manifest, status: Manifest) -> None:
        self.podw = pod
        self.spec = spec
        self.name: str = spec["name"]
        prior: Manifest = next(
            (s for s in status.get("containerStatuses") or [] if s.get("name") == self.name), {}
        )
        # An agent restart continues the count (its processes died with it).
        self.restart_count: int = int(prior.get("restartCount", 0))
        self.state: Manifest = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Manifest = prior.get("lastState") or {}
        self.ready = False
        self.started = False
        self.has_run = bool(prior.get("state", {}).get("running")) or self.restart_count > 0
        if prior.get("state", {}).get("running"):
            # Its process died with an earlier agent (PR_SET_PDEATHSIG): a restart.
            self.restart_count += 1
            self.last_state = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "Error",
                    "message": "killed with the node agent that ran it",
                    "startedAt": prior["state"]["running"].get("startedAt", ""),
                    "finishedAt": rfc3339(),
                }
            }
        self.proc: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None
        self.failures = 0
        self._holding_slot = False
        self._started_mono = 0.0
        self._started_at = ""
        self._log_path: Path | None = None

    @property
    def agent(self) -> NodeAgent:
        return self.podw.agent

    @property
    def field_path(self) -> str:
        return f"spec.containers{{{self.name}}}"

    def view(self) -> ContainerView:
        return ContainerView(
            name=self.name,
            image=str(self.spec.get("image", "")),
            state=self.state,
            last_state=self.last_state,
            ready=self.ready,
            started=self.started,
            restart_count=self.restart_count,
        )

    async def _wait_deleting(self, seconds: float | None) -> bool:
        """Wait up to ``seconds`` for the pod's deletion; True when it came."""
        try:
            await asyncio.wait_for(self.podw.deleting.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _set_waiting(self, reason: str, message: str) -> None:
        self.state = {"waiting": {"reason": reason, "message": message}}
        self.ready = self.started = False
        await self.podw.publish()

    # ---- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        pod = self.podw
        cap_event_sent = False
        try:
            while not pod.deleting.is_set():
                try:
                    volumes = await pod.prepare_volumes()
                    mounts = plan.compute_mounts(self.spec, volumes)
                    assert pod.ip is not None
                    proc_plan = plan.plan_process(
                        self.spec, pod.ip, mounts, pod.dir / "home", self.agent.ctx
                    )
                except ContainerConfigError as exc:
                    if self.state.get("waiting", {}).get("message") != exc.message:
                        await self.agent.emit(
                            pod.pod, "Warning", "Failed", exc.message, self.field_path
                        )
                    await self._set_waiting(exc.reason, exc.message)
                    await self._wait_deleting(10.0)  # a missing ConfigMap may come
                    continue
                if not self.agent.try_acquire_slot():
                    cap = self.agent.config.max_processes
                    msg = (
                        f"the node agent already runs {cap} server processes (its cap, "
                        "--max-processes); this container starts when one ends"
                    )
                    await self._set_waiting("ProcessCapReached", msg)
                    if not cap_event_sent:
                        await self.agent.emit(
                            pod.pod, "Warning", "ProcessCapReached", msg, self.field_path
                        )
                        cap_event_sent = True
                    slot = self.agent.slot_freed
                    waiter = asyncio.ensure_future(slot.wait())
                    deleting = asyncio.ensure_future(pod.deleting.wait())
                    await asyncio.wait((waiter, deleting), return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    deleting.cancel()
                    continue
                self._holding_slot = True
                cap_event_sent = False
                outcome = await self._run_once(proc_plan)
                if outcome == "deleting":
                    break
                if pod.stopping:
                    return
                if not plan.compute_should_restart(
                    str(pod.pod["spec"].get("restartPolicy", "Always")), self.exit_code or 0
                ):
                    return
                self.restart_count += 1
                ran_s = time.monotonic() - self._started_mono
                self.failures = (
                    1 if ran_s >= self.agent.config.backoff_reset_s else self.failures + 1
                )
                delay = plan.compute_backoff(
                    self.failures,
                    self.agent.config.backoff_initial_s,
                    self.agent.config.backoff_max_s,
                )
                msg = (
                    f"back-off {delay:.0f}s restarting failed container={self.name} "
                    f"pod={pod.name}_{pod.ns}({pod.uid})"
                )
                await self._set_waiting("CrashLoopBackOff", msg)
                await self.agent.emit(
                    pod.pod,
                    "Warning",
                    "BackOff",
                    "Back-off restarting failed container " + self.name,
                    self.field_path,
                )
                await self._wait_deleting(delay)
            # The pod is being deleted.
            if self.proc is not None and self.proc.returncode is None:
                await self.terminate(pod.grace_s)
                self._record_exit()
            self.ready = False
        finally:
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.proc.wait()
                self._release_slot()

    async def _run_once(self, proc_plan: plan.ProcessPlan) -> str:
        """Start the process and watch it: returns "exited" or "deleting"."""
        pod = self.podw
        log_dir = pod.log_dir / self.name
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = log_dir / f"{self.restart_count}.log"
        for key, (old, new) in proc_plan.substituted.items():
            log.info("pod %s/%s: %s %r -> %r", pod.ns, pod.name, key, old, new)
        try:
            with self._log_path.open("wb") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.agent.argv_in_pod_network(proc_plan.argv),
                    env=proc_plan.env,
                    cwd=pod.dir / "home",
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_agent,
                )
        except OSError as exc:
            self._release_slot()
            self.exit_code = 128
            now = rfc3339()
            self.last_state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(exc),
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
            return "exited"
        self._started_mono = time.monotonic()
        self._started_at = rfc3339()
        self.has_run = True
        self.exit_code = None
        self.state = {"running": {"startedAt": self._started_at}}
        log.info(
            "pod %s/%s: started %s (pid %d, %s, log %s)",
            pod.ns,
            pod.name,
            self.name,
            self.proc.pid,
            " ".join(proc_plan.argv),
            self._log_path,
        )
        await pod.publish()
        await self.agent.emit(
            pod.pod,
            "Normal",
            "Started",
            f"Started container {self.name} (pid {self.proc.pid})",
            self.field_path,
        )
        outcome = await self._supervise()
        if outcome == "deleting":
            self.ready = False
            await pod.publish()
            await self.agent.emit(
                pod.pod, "Normal", "Killing", f"Stopping container {self.name}", self.field_path
            )
            await self.stop_container(pod.grace_s)
            self._record_exit()
            return "deleting"
        if outcome == "unhealthy":
            await self.agent.emit(
                pod.pod,
                "Normal",
                "Killing",
                f"Container {self.name} failed its probe, will be restarted",
                self.field_path,
            )
            await self.stop_container(
                float(pod.pod["spec"].get("terminationGracePeriodSeconds", 30))
            )
        self._record_exit()
        return "exited"

    def _record_exit(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is None:
            return
        code = plan.compute_exit_code(proc.returncode)
        self.exit_code = code
        message = ""
        if self._log_path is not None and code != 0:
            message = plan.compute_termination_message(_tail_bytes(self._log_path))
        terminated = {
            "exitCode": code,
            "reason": plan.compute_exit_reason(code),
            "startedAt": self._started_at,
            "finishedAt": rfc3339(),
        }
        if message:
            terminated["message"] = message
        self.last_state = {"terminated": terminated}
        self.state = {"terminated": terminated}
        self.ready = self.started = False
        self.proc = None
        self._release_slot()
        log.info("pod %s/%s: %s exited with code %d", self.podw.ns, self.podw.name, self.name, code)

    def _release_slot(self) -> None:
        if self._holding_slot:
            self._holding_slot = False
            self.agent.release_slot()

    async def stop_container(self, grace_s: float) -> None:
        """As the kubelet kills a container: the preStop hook (``sleep`` or
        ``httpGet``; ``exec`` can't run here and is skipped), then SIGTERM with
        what is left of the grace period (at least 2 s), then SIGKILL."""
        started = time.monotonic()
        hook = (self.spec.get("lifecycle") or {}).get("preStop") or {}
        proc = self.proc
        if hook and proc is not None and proc.returncode is None:
            if "sleep" in hook:
                seconds = min(float(hook["sleep"].get("seconds", 0)), grace_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), seconds)
            elif "httpGet" in hook and self.podw.ip is not None:
                probe = plan.plan_probe(
                    {"httpGet": hook["httpGet"], "timeoutSeconds": grace_s},
                    self.spec,
                    self.podw.ip,
                )
                if probe is not None:
                    await run_probe(probe)
            else:
                log.warning(
                    "pod %s/%s: preStop exec hooks are not run", self.podw.ns, self.podw.name
                )
        await self.terminate(max(2.0, grace_s - (time.monotonic() - started)))

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; reaps the process."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace_s)
        if proc.returncode is None:
            log.warning(
                "pod %s/%s: %s still running %.0fs after SIGTERM; SIGKILL",
                self.podw.ns,
                self.podw.name,
                self.name,
                grace_s,
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # ---- probes ----------------------------------------------------------------------

    async def _supervise(self) -> str:
        """Run the probes until the process exits ("exited"), a liveness or
        startup probe gives up ("unhealthy") or the pod is deleted ("deleting")."""
        pod, proc = self.podw, self.proc
        assert proc is not None and pod.ip is not None
        startup = plan.plan_probe(self.spec.get("startupProbe"), self.spec, pod.ip)
        liveness = plan.plan_probe(self.spec.get("livenessProbe"), self.spec, pod.ip)
        readiness = plan.plan_probe(self.spec.get("readinessProbe"), self.spec, pod.ip)
        t0 = time.monotonic()
        trackers = {
            "Startup": _ProbeTracker(startup, t0) if startup else None,
            "Liveness": _ProbeTracker(liveness, t0) if liveness else None,
            "Readiness": _ProbeTracker(readiness, t0) if readiness else None,
        }
        if startup is None:
            self.started = True
            if readiness is None:
                self.ready = True
            await pod.publish()
        while True:
            if proc.returncode is not None:
                return "exited"
            if pod.deleting.is_set():
                return "deleting"
            now = time.monotonic()
            if not self.started:
                tr = trackers["Startup"]
                assert tr is not None
                if tr.due(now):
                    verdict = await tr.run(now)
                    if verdict is True:
                        self.started = True
                        ready_tr, live_tr = trackers["Readiness"], trackers["Liveness"]
                        if ready_tr is None:
                            self.ready = True
                        else:
                            ready_tr.next_at = time.monotonic()
                        if live_tr is not None:
                            live_tr.next_at = time.monotonic() + live_tr.probe.period_s
                        await pod.publish()
                    elif verdict is False:
                        await self._unhealthy("Startup", tr)
                        return "unhealthy"
            else:
                live = trackers["Liveness"]
                if live is not None and live.due(now) and await live.run(now) is False:
                    await self._unhealthy("Liveness", live)
                    return "unhealthy"
                ready = trackers["Readiness"]
                if ready is not None and ready.due(now):
                    verdict = await ready.run(now)
                    if verdict is not None and verdict != self.ready:
                        self.ready = verdict
                        if not verdict:
                            await self.agent.emit(
                                pod.pod,
                                "Warning",
                                "Unhealthy",
                                f"Readiness probe failed: {ready.last_error}",
                                self.field_path,
                            )
                        await pod.publish()
            await asyncio.sleep(POLL_S)

    async def _unhealthy(self, which: str, tracker: _ProbeTracker) -> None:
        await self.agent.emit(
            self.podw.pod,
            "Warning",
            "Unhealthy",
            f"{which} probe failed {tracker.failures} times: {tracker.last_error}",
            self.field_path,
        )


@dataclass
class _ProbeTracker:
    """Thresholds over consecutive results, as the kubelet counts them."""

    probe: ProbePlan
    t0: float
    next_at: float = field(init=False)
    successes: int = 0
    failures: int = 0
    last_error: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.t0 + self.probe.initial_delay_s

    def due(self, now: float) -> bool:
        return now >= self.next_at

    async def run(self, now: float) -> bool | None:
        """Probe once; True/False when a threshold is reached, else None."""
        self.next_at = now + self.probe.period_s
        ok, error = await run_probe(self.probe)
        if ok:
            self.successes += 1
            self.failures = 0
            return True if self.successes >= self.probe.success_threshold else None
        self.last_error = error
        self.failures += 1
        self.successes = 0
        return False if self.failures >= self.probe.failure_threshold else None


async def run_probe(probe: ProbePlan) -> tuple[bool, str]:
    """One probe against the process: (success, why not)."""
    try:
        return await asyncio.wait_for(_probe(probe), probe.timeout_s)
    except TimeoutError:
        return False, f"timeout after {probe.timeout_s:.0f}s"


async def _probe(probe: ProbePlan) -> tuple[bool, str]:
    target = f"{probe.host}:{probe.port}"
    if probe.kind == "grpc":
        # A fresh channel per probe, as the kubelet does: no reconnect back-off carried over.
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=probe.service))
            except grpc.aio.AioRpcError as exc:
                return False, f"{target}: {exc.code().name} {exc.details() or ''}".strip()
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"
    if probe.kind == "http":
        url = f"{probe.scheme.lower()}://{target}{probe.path}"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                return 200 <= resp.status < 400, f"HTTP probe failed with statuscode: {resp.status}"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"{url}: {exc!r}"
    if probe.kind == "tcp":
        try:
            _, writer = await asyncio.open_connection(probe.host, probe.port)
        except OSError as exc:
            return False, f"dial tcp {target}: {exc.strerror}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, ""
    return True, "exec probes are not run on a live node (counted as success)"


def install_signal_handlers(stop: asyncio.Event, on: Callable[[], None] | None = None) -> None:
    loop = asyncio.get_running_loop()

    def handler(name: str) -> None:
        log.info("%s: stopping", name)
        stop.set()
        if on is not None:
            on()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, signal.Signals(sig).name)
