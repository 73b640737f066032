"""The node agent: the kubelet of the local cluster's *live* GPU nodes.

kwok's nodes simulate pods (they go Ready and run nothing); that stays, for
the operator's tests and the scale benchmark. Next to them, the agent
registers ``gpu-live-<i>`` nodes and plays their kubelet for server pods:

- **Which pods.** It watches the pods bound to its nodes
  (``fieldSelector=spec.nodeName=gpu-live-<i>``). Live nodes carry the taint
  ``autoglm.dev/live=true:NoSchedule`` and the GPU product
  ``AutoGLM-Local-CPU``, so only pods that ask for them land there: in an
  AutoGLMDeployment, ``spec.resources`` from :func:`build_live_placement`.
- **Only kubelet, no kwok.** kwok manages only nodes annotated
  ``kwok.x-k8s.io/node=fake``; live nodes are not, so kwok never touches their
  pods. The agent registers the Node, keeps its Lease (every 10 s) and Ready
  condition fresh, and owns the whole pod lifecycle (status, probes, restarts,
  deletion). One owner per pod, and no stage has to be taught to stay away.
- **Processes.** Each container runs as a local process with the container's
  command/args and env (see :func:`plan.plan_process` for the documented
  substitutions: ``AUTOGLM_HOST`` = pod IP, ``cuda`` -> ``cpu``, model source,
  volume paths, ``HF_HUB_OFFLINE=1``). The image is ignored; its entrypoint
  ``autoglm-server`` is the installed script. Volumes: ``emptyDir`` and
  ``configMap``/``secret`` (written from the API) under the pod's directory, a
  PVC is ``<workdir>/models/pvc/<claim>``. Security contexts and resource
  limits are not enforced.
- **Models.** ``hf://org/name`` -> ``<workdir>/models/hf/org/name``; a path in
  the image -> ``<workdir>/models/image/<path>``; ``pvc://claim/p`` ->
  ``<workdir>/models/pvc/claim/p``. :func:`install_tiny_model` puts a tiny
  model there. A source with no local copy stays as it is, so the server fails
  to start as it would on a node without it; SHA-256 files, dtype and batching
  flags reach the server unchanged.
- **Pod IPs, in a network namespace of the cluster's own.** Node ``i`` has
  podCIDR ``198.18.<i+1>.0/24`` (its own address is ``.1``); each pod gets the
  next free address, written to ``status.podIP(s)``, and its server binds
  there. EndpointSlices, Prometheus and the Gateway therefore point at
  addresses that answer. Why not 127.0.0.0/8: EndpointSlice validation
  (``ValidateEndpointIP``) refuses loopback addresses, so the endpointslice
  controller could never list such a pod. Instead the agent makes a network
  namespace for its block and runs the servers in it (``ip netns exec``); a
  ``local`` route per node /24 on the namespace's ``lo`` makes the pod
  addresses bindable, and a veth pair with the gateway ``198.18.0.1`` on the
  host end routes the block from the host. So every address connected to is a
  test host inside a namespace the cluster made, and nothing leaves the
  machine. This needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); without it the agent
  stops with that message (``--pod-network 127.1.0.0/16`` runs anyway, with
  pods that no Service lists). Several clusters share one machine (tests, the
  demo, other checkouts), so each agent claims its own /20 of 198.18.0.0/15
  (the first one whose lock file under ``$TMPDIR/autoglm-pod-networks`` no
  running agent holds; a restarted agent takes the block its nodes already
  have): the ``198.18.<i+1>`` above is the first block's; read a node's
  ``spec.podCIDR``.
- **Probes** are the pod's own (gRPC health, HTTP GET, TCP; exec is not run and
  counts as success), with initialDelaySeconds, periodSeconds, timeoutSeconds
  and the thresholds honoured; liveness and readiness start once the startup
  probe passed. Results go to ``containerStatuses[].started/ready`` and the
  pod's ContainersReady/Ready conditions.
- **Restarts.** A process that exits is restarted per ``restartPolicy`` after
  10 s, 20 s, 40 s, ... capped at 300 s (reset after 10 min of running);
  ``restartCount`` goes up, the state is ``waiting: CrashLoopBackOff`` and
  ``lastState.terminated`` has the exit code and, as with
  ``terminationMessagePolicy: FallbackToLogsOnError`` (there is no
  /dev/termination-log here), the last 80 lines / 2 KiB of the process's log.
- **Deletion.** The preStop hook (``sleep`` or ``httpGet``; ``exec`` is
  skipped), SIGTERM, up to the pod's deletion grace period
  (``terminationGracePeriodSeconds``, at least 2 s after the hook), then SIGKILL; the final status is
  written and the pod deleted with grace 0, as the kubelet does. The server's
  drain runs in between.
- **A cap** on live processes across the agent's nodes (``--max-processes``,
  default 6): a container over the cap waits (``ProcessCapReached``) with a
  Warning event on its pod, and starts when another process ends.
- **Files.** The agent logs to ``<workdir>/logs/agent.log``; each process to
  ``<workdir>/logs/pods/<ns>_<pod>_<uid>/<container>/<restart>.log``.
- **Stopping.** SIGTERM stops the agent: every process gets SIGTERM and, after
  at most 10 s, SIGKILL. Each process also has PR_SET_PDEATHSIG=SIGKILL, so a
  killed agent leaves nothing behind. ``autoglm-dev cluster down`` stops the
  agent with the rest of the cluster.
"""

from __future__ import annotations

from pathlib import Path

from .plan import (
    LIVE_GPU_PRODUCT,
    LIVE_TAINT_KEY,
    build_live_placement,
    compute_model_dir,
    compute_pod_cidr,
    live_node_name,
)

__all__ = [
    "LIVE_GPU_PRODUCT",
    "LIVE_TAINT_KEY",
    "build_live_placement",
    "compute_model_dir",
    "compute_pod_cidr",
    "install_tiny_model",
    "live_node_name",
]


def install_tiny_model(workdir: Path, source: str, arch: str = "glm4") -> Path:
    """Build a tiny random model (server/testing.py) where the agent maps ``source``."""
    from autoglm_server.testing import build_tiny_model

    target = compute_model_dir(workdir / "models", source)
    if target is None:
        raise ValueError(f"source: {source!r} is not hf://, pvc:// or an absolute path")
    if not (target / "config.json").is_file():
        build_tiny_model(target, arch)  # type: ignore[arg-type]
    return target
