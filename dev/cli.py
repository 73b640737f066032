"""``autoglm-dev``: the local control plane and the demo.

autoglm-dev cluster build            build the pinned binaries (and the add-ons') into the cache
autoglm-dev cluster up [--nodes N]   start it (idempotent) and print KUBECONFIG
        [--addons]                   with Prometheus, prometheus-adapter, Gateway API + Traefik
autoglm-dev cluster status           one line per component; exit 1 if any is down
autoglm-dev cluster down             stop every process it started
autoglm-dev kubectl ARGS...          kubectl against the local cluster
autoglm-dev demo                     cluster + operator + server + one request
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .binaries import (
    ADDON_BINARIES,
    ALL_BINARIES,
    build_binaries,
    cache_root,
    ensure_binaries,
    find_binary,
)
from .cluster import ClusterError, LocalCluster, default_workdir
from .waiting import WaitTimeout


def _cluster(args: argparse.Namespace) -> LocalCluster:
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.name)
    return LocalCluster(
        workdir,
        nodes=getattr(args, "nodes", 4),
        gpus_per_node=getattr(args, "gpus", 8),
        live_nodes=getattr(args, "live_nodes", 0),
    )


def cmd_build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    names = ALL_BINARIES if args.no_addons else (*ALL_BINARIES, *ADDON_BINARIES)
    missing = tuple(n for n in names if find_binary(n) is None)
    if missing:
        print(f"building {', '.join(missing)} into {cache_root() / 'bin'} ...", flush=True)
        timings = build_binaries(missing)
        for step, secs in timings.items():
            print(f"  {step}: {secs:.0f}s")
    for name in names:
        found = find_binary(name)
        print(f"{name:26s} {found.path if found else 'MISSING'} ({found.source if found else '-'})")
    print(f"done in {time.monotonic() - start:.1f}s")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    start = time.monotonic()
    ensure_binaries((*ALL_BINARIES, *ADDON_BINARIES) if args.addons else ALL_BINARIES)
    built = time.monotonic()
    try:
        state = cluster.start()
        if args.addons:
            cluster.start_addons()  # when the cluster ran already without them
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    now = time.monotonic()
    print(f"control plane up: {state.server} ({args.nodes} GPU nodes)")
    if args.addons:
        from .addons import ADDONS_NAMESPACE, GATEWAY_NAME, endpoints

        running = cluster.load_state()
        assert running is not None
        ends = endpoints(running)
        print(f"Prometheus: {ends.prometheus}")
        print(f"Gateway {ADDONS_NAMESPACE}/{GATEWAY_NAME} (Traefik): {ends.gateway}")
        print("custom metrics: kubectl get --raw /apis/custom.metrics.k8s.io/v1beta1")
    print(f"binaries ready in {built - start:.1f}s, cluster started in {now - built:.1f}s")
    print(f"export KUBECONFIG={state.kubeconfig}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    had = cluster.load_state() is not None
    cluster.stop()
    print("control plane stopped" if had else "no control plane was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    statuses = cluster.status()
    if not statuses:
        print("not running")
        return 1
    state = cluster.load_state()
    if state is not None:
        print(f"server {state.server}, KUBECONFIG={state.kubeconfig}")
    ok = True
    for s in statuses:
        print(f"{s.name:26s} pid {s.pid:<8d} {'running' if s.alive else 'DEAD'}")
        if not s.alive:
            ok = False
            print("  last lines of its log:\n    " + s.log_tail.replace("\n", "\n    "))
    return 0 if ok else 1


def cmd_kubectl(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    kubectl = ensure_binaries(("kubectl",))["kubectl"]
    return subprocess.call([str(kubectl), "--kubeconfig", str(cluster.kubeconfig), *args.rest])


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        rc: int = run_demo(_cluster(args), keep=args.keep)
    except (ClusterError, WaitTimeout, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    return rc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm-dev",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--name",
        default=os.environ.get("AUTOGLM_CLUSTER_NAME", "default"),
        help="cluster name (work directory under the cache)",
    )
    parser.add_argument("--workdir", default=None, help="work directory (overrides --name)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    cluster = sub.add_parser("cluster", help="the local control plane")
    csub = cluster.add_subparsers(dest="action", required=True)
    build = csub.add_parser("build", help="build the pinned binaries")
    build.add_argument(
        "--no-addons",
        action="store_true",
        help="only the control plane (not Prometheus, prometheus-adapter, Traefik)",
    )
    build.set_defaults(func=cmd_build)
    up = csub.add_parser("up", help="start the control plane and GPU nodes")
    up.add_argument("--nodes", type=int, default=4, help="kwok GPU nodes to create")
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node")
    up.add_argument(
        "--addons",
        action="store_true",
        help="also Prometheus, prometheus-adapter, Gateway API CRDs and Traefik (a Gateway)",
    )
    up.add_argument(
        "--live-nodes",
        type=int,
        default=0,
        help="GPU nodes whose pods run real server processes (the node agent; dev/README.md)",
    )
    up.set_defaults(func=cmd_up)
    csub.add_parser("down", help="stop it").set_defaults(func=cmd_down)
    csub.add_parser("status", help="component health").set_defaults(func=cmd_status)

    kubectl = sub.add_parser("kubectl", help="kubectl against the local cluster")
    kubectl.add_argument("rest", nargs=argparse.REMAINDER)
    kubectl.set_defaults(func=cmd_kubectl)

    demo = sub.add_parser("demo", help="cluster, operator, server on a tiny model, one request")
    demo.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
