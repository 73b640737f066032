"""The node agent's pure core: no clock, no API, no processes.

Everything the agent decides from a pod spec lives here, so it is unit-tested
without a cluster: the node objects it registers, the pod IPs it hands out,
the process it starts for a container (argv, environment, working paths), the
model-source substitution, the restart back-off, the termination message and
the pod status it writes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

Manifest = dict[str, Any]

AGENT_NAME = "autoglm-node-agent"
# Every live node carries this label and taint, and its own GPU product, so
# that only pods that ask for it (a toleration plus resources.gpuProduct) land
# on a node that really runs processes; kwok's simulated nodes keep the rest.
LIVE_NODE_LABEL = "autoglm.dev/node-agent"
LIVE_TAINT_KEY = "autoglm.dev/live"
LIVE_GPU_PRODUCT = "AutoGLM-Local-CPU"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
# Node i's pods get addresses from 198.18.<i+1>.0/24; .1 is the node itself. The
# range (RFC 2544, benchmarking; never routed) lives in a network namespace the
# agent makes (see runtime.NodeAgent._setup_pod_namespace). 127.0.0.0/8 can't be used:
# EndpointSlice validation (ValidateEndpointIP) refuses loopback addresses, so no
# Service would ever list such a pod.
POD_NETWORK = ipaddress.IPv4Network("198.18.0.0/20")
LOOPBACK_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")
# Several clusters may run on one machine (tests, the demo, other checkouts):
# each agent claims one /20 of 198.18.0.0/15 (15 nodes of /24) for itself.
POD_NETWORK_POOL = ipaddress.IPv4Network("198.18.0.0/15")
POD_NETWORK_PREFIX = 20


def plan_pod_network_blocks(
    pool: ipaddress.IPv4Network = POD_NETWORK_POOL, prefix: int = POD_NETWORK_PREFIX
) -> list[ipaddress.IPv4Network]:
    """The pod networks an agent may claim, in the order it tries them."""
    return list(pool.subnets(new_prefix=prefix))


# The server image's entrypoint and environment (Dockerfile.server).
SERVER_ENTRYPOINT = "autoglm-server"
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1", "HF_HOME": "/var/cache/huggingface"}

# kubelet's defaults: FallbackToLogsOnError reads this much of the log.
TERMINATION_MESSAGE_MAX_LINES = 80
TERMINATION_MESSAGE_MAX_BYTES = 2048

OWN_POD_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


class ContainerConfigError(ValueError):
    """A container the agent can't run (kubelet's CreateContainerConfigError)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---- nodes ---------------------------------------------------------------------------


def live_node_name(index: int) -> str:
    return f"gpu-live-{index}"


def compute_pod_cidr(
    index: int, network: ipaddress.IPv4Network = POD_NETWORK
) -> ipaddress.IPv4Network:
    """Node ``index``'s pod network: the (index+1)-th /24 of ``network``."""
    if not 0 <= index < min(254, network.num_addresses // 256 - 1):
        raise ValueError(f"node index: must be 0..253 and fit in {network}, got {index}")
    base = int(network.network_address) + ((index + 1) << 8)
    return ipaddress.IPv4Network((base, 24))


def compute_node_ip(index: int, network: ipaddress.IPv4Network = POD_NETWORK) -> str:
    return str(compute_pod_cidr(index, network).network_address + 1)


def compute_pod_gateway(network: ipaddress.IPv4Network = POD_NETWORK) -> str:
    """The host end of the pod network's veth pair: the block's first address
    (its first /24 is never a node's; node ``i`` has the ``(i+1)``-th)."""
    return str(network.network_address + 1)


def pod_namespace_name(network: ipaddress.IPv4Network = POD_NETWORK) -> str:
    """The network namespace holding the pods of the agent that owns ``network``."""
    return "autoglm-pods-" + str(network.network_address).replace(".", "-")


def pod_veth_name(network: ipaddress.IPv4Network = POD_NETWORK) -> str:
    """The host end of the namespace's veth pair (at most 15 characters)."""
    a, b, c, _ = network.network_address.packed
    return f"agp{a:02x}{b:02x}{c:02x}"


def build_live_node(
    index: int, gpus: int, network: ipaddress.IPv4Network = POD_NETWORK
) -> Manifest:
    """The Node object of live node ``index`` (metadata and spec; status is patched after)."""
    name = live_node_name(index)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LIVE_NODE_LABEL: "true",
                "nvidia.com/gpu.present": "true",
                GPU_PRODUCT_LABEL: LIVE_GPU_PRODUCT,
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "spec": {
            "podCIDR": str(compute_pod_cidr(index, network)),
            "podCIDRs": [str(compute_pod_cidr(index, network))],
            "taints": [
                {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"},
                {"key": LIVE_TAINT_KEY, "value": "true", "effect": "NoSchedule"},
            ],
        },
    }


def build_node_status(
    index: int, gpus: int, now: str, version: str, network: ipaddress.IPv4Network = POD_NETWORK
) -> Manifest:
    """The node's status: Ready, its address and capacity. The cap on live
    processes is the agent's, across its nodes, not the node's pod capacity."""
    name = live_node_name(index)
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", GPU_RESOURCE: str(gpus)}
    conditions = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    return {
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": compute_node_ip(index, network)},
            {"type": "Hostname", "address": name},
        ],
        "conditions": [
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": f"{AGENT_NAME}: {reason}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for ctype, status, reason in conditions
        ],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": version,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": f"{AGENT_NAME}://local-process",
            "kernelVersion": "",
            "osImage": "local processes",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    }


def build_live_placement() -> Manifest:
    """The ``spec.resources`` fields that put an AutoGLMDeployment's pods on live nodes."""
    return {
        "gpuProduct": LIVE_GPU_PRODUCT,
        "tolerations": [{"key": LIVE_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }


# ---- pod IPs ---------------------------------------------------------------------------


def allocate_pod_ip(cidr: ipaddress.IPv4Network, used: Iterable[str], after: str | None) -> str:
    """The next free address in ``cidr`` after ``after`` (round robin, so a freed
    address is reused last), skipping the network, the node (.1) and broadcast."""
    taken = set(used)
    hosts = [str(h) for h in cidr.hosts()][1:]  # .1 is the node
    start = hosts.index(after) + 1 if after in hosts else 0
    for i in range(len(hosts)):
        candidate = hosts[(start + i) % len(hosts)]
        if candidate not in taken:
            return candidate
    raise ContainerConfigError("PodIPsExhausted", f"no free pod IP left in {cidr}")


# ---- model sources and volumes -------------------------------------------------------------


_HF = re.compile(r"^hf://([^/@]+)/([^/@]+)(?:@(.+))?$")


def compute_model_dir(models_root: Path, source: str) -> Path | None:
    """Where a model source is found on this machine, by the substitution rule:

    - ``hf://org/name[@rev]`` -> ``<models>/hf/org/name`` (the revision is not
      looked at: there is one local copy per repository);
    - ``pvc://claim/path`` -> ``<models>/pvc/claim/path`` (the claim's content);
    - ``/abs/path`` (a path in the image) -> ``<models>/image/abs/path``.

    Returns None for a source of another form.
    """
    m = _HF.match(source)
    if m:
        return models_root / "hf" / m.group(1) / m.group(2)
    if source.startswith("pvc://"):
        rest = source.removeprefix("pvc://").strip("/")
        return models_root / "pvc" / rest
    if source.startswith("/"):
        return models_root / "image" / source.lstrip("/")
    return None


@dataclass(frozen=True, slots=True)
class VolumePlan:
    """One pod volume and its local directory."""

    name: str
    kind: Literal["emptyDir", "configMap", "persistentVolumeClaim", "secret"]
    local: Path
    source_name: str = ""  # the ConfigMap, Secret or claim name
    items: tuple[tuple[str, str], ...] = ()  # configMap/secret (key, path) pairs, () = all keys


def plan_volumes(pod: Manifest, pod_dir: Path, models_root: Path) -> list[VolumePlan]:
    """Local directories for the pod's volumes. A PVC is ``<models>/pvc/<claim>``."""
    plans: list[VolumePlan] = []
    for vol in pod.get("spec", {}).get("volumes") or []:
        name = str(vol["name"])
        local = pod_dir / "volumes" / name
        if "emptyDir" in vol:
            plans.append(VolumePlan(name, "emptyDir", local))
        elif "configMap" in vol:
            cm = vol["configMap"]
            items = tuple((str(i["key"]), str(i["path"])) for i in cm.get("items") or [])
            plans.append(VolumePlan(name, "configMap", local, str(cm.get("name", "")), items))
        elif "secret" in vol:
            sec = vol["secret"]
            items = tuple((str(i["key"]), str(i["path"])) for i in sec.get("items") or [])
            plans.append(VolumePlan(name, "secret", local, str(sec.get("secretName", "")), items))
        elif "persistentVolumeClaim" in vol:
            claim = str(vol["persistentVolumeClaim"]["claimName"])
            plans.append(
                VolumePlan(name, "persistentVolumeClaim", models_root / "pvc" / claim, claim)
            )
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f"volume {name}: {', '.join(kinds)} volumes are not supported on a live node",
            )
    return plans


def compute_mounts(
    container: Manifest, volumes: Mapping[str, VolumePlan]
) -> list[tuple[str, Path]]:
    """(mountPath, local dir) for each of the container's mounts, longest path first."""
    mounts: list[tuple[str, Path]] = []
    for m in container.get("volumeMounts") or []:
        vol = volumes.get(str(m["name"]))
        if vol is None:
            raise ContainerConfigError(
                "CreateContainerConfigError", f"volumeMount {m['name']}: no such volume"
            )
        local = vol.local / m["subPath"] if m.get("subPath") else vol.local
        mounts.append((str(PurePosixPath(m["mountPath"])), local))
    return sorted(mounts, key=lambda item: -len(item[0]))


def map_container_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    """A container path under a mount, as its local path; anything else unchanged."""
    for mount_path, local in mounts:
        if value == mount_path:
            return str(local)
        prefix = mount_path.rstrip("/") + "/"
        if value.startswith(prefix):
            return str(local / value[len(prefix) :])
    return value


# ---- the process for a container --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessPlan:
    """What the agent runs for one container."""

    argv: tuple[str, ...]
    env: dict[str, str]
    # what was substituted, for the log: variable -> (pod value, local value)
    substituted: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeContext:
    """Machine facts the process plan depends on."""

    server_bin: str  # .venv/bin/autoglm-server
    path: str  # PATH for the processes
    models_root: Path
    threads: int = 1  # OMP/MKL threads per process: the machine is small and shared


def plan_process(
    container: Manifest,
    pod_ip: str,
    mounts: list[tuple[str, Path]],
    home: Path,
    ctx: NodeContext,
) -> ProcessPlan:
    """The container's command, args and env as a local process.

    The image is ignored; its entrypoint (``autoglm-server``) maps to the
    installed script. Env comes from the image defaults plus the container's
    ``env`` (literal values only), then these substitutions:

    - ``AUTOGLM_HOST``: the pod IP (0.0.0.0 inside a pod means the pod's own
      network, which here is its loopback address);
    - ``AUTOGLM_DEVICE``: ``cuda`` -> ``cpu`` (the node's GPUs are simulated);
    - ``AUTOGLM_MODEL``: the model source through :func:`compute_model_dir`
      (left as it is when the local copy does not exist, so the server fails
      to start exactly as it would on a node without the model);
    - any value that is a path under a volume mount: the volume's local path;
    - ``HF_HUB_OFFLINE=1``: nothing may be downloaded here.
    """
    name = container.get("name", "?")
    command = list(container.get("command") or [])
    args = [str(a) for a in container.get("args") or []]
    if not command:
        command = [SERVER_ENTRYPOINT]
    if PurePosixPath(str(command[0])).name != SERVER_ENTRYPOINT:
        raise ContainerConfigError(
            "RunContainerError",
            f"container {name}: only the {SERVER_ENTRYPOINT} entrypoint runs on a live node "
            f"(command {command!r})",
        )
    argv = (ctx.server_bin, *[str(c) for c in command[1:]], *args)

    env: dict[str, str] = dict(IMAGE_ENV)
    for item in container.get("env") or []:
        if "value" not in item and "valueFrom" in item:
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f"container {name}: env {item['name']}: valueFrom is not supported on a live node",
            )
        env[str(item["name"])] = str(item.get("value", ""))
    substituted: dict[str, tuple[str, str]] = {}

    def sub(key: str, value: str) -> None:
        old = env.get(key)
        if old != value:
            substituted[key] = (old or "", value)
            env[key] = value

    for key, value in list(env.items()):
        mapped = map_container_path(value, mounts)
        if mapped != value:
            sub(key, mapped)
    sub("AUTOGLM_HOST", pod_ip)
    device = env.get("AUTOGLM_DEVICE")
    if device is not None and device.split(":", 1)[0] == "cuda":
        sub("AUTOGLM_DEVICE", "cpu")
    model = env.get("AUTOGLM_MODEL")
    if model is not None and model.startswith("hf://"):
        local = compute_model_dir(ctx.models_root, model)
        if local is not None and local.is_dir():
            sub("AUTOGLM_MODEL", str(local))
    elif model is not None and model.startswith("/") and not _under_any_mount(model, mounts):
        local = compute_model_dir(ctx.models_root, model)
        if local is not None:
            sub("AUTOGLM_MODEL", str(local))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(ctx.threads))
    env["PATH"] = ctx.path
    env["HOME"] = str(home)
    env.setdefault("LANG", "C.UTF-8")
    return ProcessPlan(argv, env, substituted)


def _under_any_mount(value: str, mounts: list[tuple[str, Path]]) -> bool:
    return any(str(local) == value or value.startswith(str(local) + "/") for _, local in mounts)


# ---- restarts and termination --------------------------------------------------------------


def compute_backoff(failures: int, initial_s: float = 10.0, cap_s: float = 300.0) -> float:
    """kubelet's restart delay after the ``failures``-th consecutive failure (1-based):
    10 s, 20 s, 40 s, ... capped."""
    if failures <= 0:
        return 0.0
    return float(min(cap_s, initial_s * (2 ** (failures - 1))))


def compute_termination_message(log_tail: bytes) -> str:
    """FallbackToLogsOnError: the last 80 lines, at most 2048 bytes, of the container's log."""
    lines = log_tail.splitlines()[-TERMINATION_MESSAGE_MAX_LINES:]
    text = b"\n".join(lines)[-TERMINATION_MESSAGE_MAX_BYTES:]
    return text.decode("utf-8", errors="replace").strip()


def compute_exit_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def compute_exit_code(returncode: int) -> int:
    """A container's exit code as Kubernetes shows it: 128+N for a signal N."""
    return 128 - returncode if returncode < 0 else returncode


def compute_should_restart(policy: str, exit_code: int) -> bool:
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return exit_code != 0
    return True


# ---- probes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """A probe from the pod spec, resolved to an address."""

    kind: Literal["grpc", "http", "tcp", "exec"]
    host: str
    port: int
    service: str = ""  # grpc
    path: str = "/"  # http
    scheme: str = "HTTP"
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def plan_probe(probe: Manifest | None, container: Manifest, pod_ip: str) -> ProbePlan | None:
    """A probe with Kubernetes' defaults (period 10 s, timeout 1 s, thresholds 1 and 3)."""
    if not probe:
        return None
    common: dict[str, Any] = {
        "initial_delay_s": float(probe.get("initialDelaySeconds", 0)),
        "period_s": float(probe.get("periodSeconds", 10)),
        "timeout_s": float(probe.get("timeoutSeconds", 1)),
        "success_threshold": int(probe.get("successThreshold", 1)),
        "failure_threshold": int(probe.get("failureThreshold", 3)),
    }
    if "grpc" in probe:
        g = probe["grpc"]
        return ProbePlan(
            "grpc", pod_ip, int(g["port"]), service=str(g.get("service") or ""), **common
        )
    if "httpGet" in probe:
        h = probe["httpGet"]
        return ProbePlan(
            "http",
            str(h.get("host") or pod_ip),
            _resolve_port(h["port"], container),
            path=str(h.get("path") or "/"),
            scheme=str(h.get("scheme") or "HTTP"),
            **common,
        )
    if "tcpSocket" in probe:
        t = probe["tcpSocket"]
        return ProbePlan(
            "tcp", str(t.get("host") or pod_ip), _resolve_port(t["port"], container), **common
        )
    return ProbePlan("exec", pod_ip, 0, **common)


def _resolve_port(port: int | str, container: Manifest) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ContainerConfigError(
        "CreateContainerConfigError", f"probe port {port!r}: no container port of that name"
    )


# ---- pod status -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerView:
    """One container's state, as the agent knows it."""

    name: str
    image: str
    state: Manifest  # {"waiting": {...}} | {"running": {...}} | {"terminated": {...}}
    last_state: Manifest = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    restart_count: int = 0


@dataclass(frozen=True, slots=True)
class PodView:
    phase: Literal["Pending", "Running", "Succeeded", "Failed"]
    host_ip: str
    pod_ip: str | None
    start_time: str
    containers: tuple[ContainerView, ...]
    sandbox_ready: bool = True


def build_pod_status(previous: Manifest, view: PodView, now: str) -> Manifest:
    """The pod's status. A condition keeps its lastTransitionTime while its
    status holds, and conditions the agent does not own (PodScheduled, and
    readiness gates' types) are kept, so an unchanged pod gives an equal status."""
    prev_conds = {c.get("type"): c for c in previous.get("conditions") or []}
    all_ready = bool(view.containers) and all(c.ready for c in view.containers)
    unready = [c.name for c in view.containers if not c.ready]
    wanted: list[tuple[str, bool, str, str]] = [
        ("PodReadyToStartContainers", view.sandbox_ready, "", ""),
        ("Initialized", True, "", ""),
        (
            "ContainersReady",
            all_ready,
            "" if all_ready else "ContainersNotReady",
            "" if all_ready else f"containers with unready status: [{' '.join(unready)}]",
        ),
        (
            "Ready",
            all_ready,
            "" if all_ready else "ContainersNotReady",
            "" if all_ready else f"containers with unready status: [{' '.join(unready)}]",
        ),
    ]
    if view.phase in ("Succeeded", "Failed"):
        wanted[0] = ("PodReadyToStartContainers", False, "", "")
        if view.phase == "Succeeded":
            wanted[2] = ("ContainersReady", False, "PodCompleted", "")
            wanted[3] = ("Ready", False, "PodCompleted", "")
    conditions: list[Manifest] = [
        dict(c) for t, c in prev_conds.items() if t not in OWN_POD_CONDITIONS and t is not None
    ]
    for ctype, ok, reason, message in wanted:
        value = "True" if ok else "False"
        old = prev_conds.get(ctype)
        since = (
            old["lastTransitionTime"]
            if old and old.get("status") == value and old.get("lastTransitionTime")
            else now
        )
        cond: Manifest = {
            "type": ctype,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": since,
        }
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        conditions.append(cond)
    status: Manifest = {
        "phase": view.phase,
        "conditions": conditions,
        "hostIP": view.host_ip,
        "hostIPs": [{"ip": view.host_ip}],
        "startTime": previous.get("startTime") or view.start_time,
        "containerStatuses": [
            {
                "name": c.name,
                "image": c.image,
                "imageID": "",
                "containerID": f"{AGENT_NAME}://{c.name}-{c.restart_count}",
                "state": c.state,
                "lastState": c.last_state,
                "ready": c.ready,
                "started": c.started,
                "restartCount": c.restart_count,
            }
            for c in view.containers
        ],
        "qosClass": previous.get("qosClass") or "Burstable",
    }
    if view.pod_ip:
        status["podIP"] = view.pod_ip
        status["podIPs"] = [{"ip": view.pod_ip}]
    return status


def compute_status_changed(previous: Manifest, new: Manifest) -> bool:
    """Whether writing ``new`` would change the pod's status."""
    return any(previous.get(k) != v for k, v in new.items())
