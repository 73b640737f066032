"""``python -m autoglm_dev.agent``: run the node agent until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
from pathlib import Path

from .kube import KubeClient
from .runtime import AgentConfig, NodeAgent, install_signal_handlers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autoglm_dev.agent", description=__doc__)
    p.add_argument("--workdir", required=True, help="the cluster's work directory")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--nodes", type=int, default=1, help="live nodes gpu-live-0..N-1")
    p.add_argument("--first-node", type=int, default=0, help="index of the first live node")
    p.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per live node")
    p.add_argument("--max-processes", type=int, default=6, help="cap on live server processes")
    p.add_argument("--backoff-initial", type=float, default=10.0, help="first restart delay, s")
    p.add_argument("--backoff-max", type=float, default=300.0, help="restart delay cap, s")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per process")
    p.add_argument("--server-bin", default=None, help="default: autoglm-server beside python")
    p.add_argument("--models", default=None, help="model root (default: <workdir>/models)")
    p.add_argument("--kubelet-version", default=None)
    p.add_argument(
        "--pod-network",
        default="auto",
        help="node i gets its (i+1)-th /24, local in the pod network namespace; auto: the "
        "first /20 of 198.18.0.0/15 that no other running agent holds",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    server_bin = args.server_bin or str(Path(sys.executable).parent / "autoglm-server")
    if not Path(server_bin).is_file():
        server_bin = shutil.which("autoglm-server") or server_bin
    version = args.kubelet_version
    if version is None:
        from autoglm_dev.binaries import KUBERNETES_VERSION

        version = KUBERNETES_VERSION
    workdir = Path(args.workdir)
    config = AgentConfig(
        workdir=workdir,
        kubeconfig=Path(args.kubeconfig),
        nodes=args.nodes,
        first_node=args.first_node,
        gpus_per_node=args.gpus,
        max_processes=args.max_processes,
        backoff_initial_s=args.backoff_initial,
        backoff_max_s=args.backoff_max,
        threads_per_process=args.threads,
        server_bin=server_bin,
        kubelet_version=version,
        models_root=Path(args.models) if args.models else None,
        pod_network=args.pod_network,
    )

    async def run() -> None:
        kube = KubeClient.from_kubeconfig(config.kubeconfig, workdir / "agent" / "certs")
        stop = asyncio.Event()
        install_signal_handlers(stop)
        try:
            await NodeAgent(config, kube).run(stop)
        finally:
            await kube.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
