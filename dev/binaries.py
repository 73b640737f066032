"""The control-plane binaries: where they come from and how they are built.

Resolution order for each binary, the same as envtest's:
1. ``TEST_ASSET_<NAME>`` (``TEST_ASSET_KUBE_APISERVER``, ``TEST_ASSET_ETCD``, ...);
2. ``$KUBEBUILDER_ASSETS/<name>``;
3. our cache, ``$AUTOGLM_CACHE/bin/<key>/<name>``, built from Go modules on
   first use. The key names every pinned version, so a version bump builds
   afresh and never mixes binaries.

Kubernetes, etcd and kubectl are built from the wrapper module in ``hack/k8s``
(upstream's own go.mod has replace directives, so ``go install`` refuses it);
kwok and helm install with ``go install`` at pinned tags.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd server in Kubernetes' own module graph
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"

# The Go wrapper module lives in the repository (hack/k8s), not in the wheel:
# building the control plane is a developer task.
K8S_MODULE_DIR = Path(
    os.environ.get("AUTOGLM_K8S_MODULE", Path(__file__).resolve().parents[1] / "hack" / "k8s")
)

# name -> how it is built
WRAPPER_BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "etcd",
    "kubectl",
)
GO_INSTALL_BINARIES = {
    "kwok": f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}",
    "helm": f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
}
ALL_BINARIES = (*WRAPPER_BINARIES, *GO_INSTALL_BINARIES)


class BinaryError(RuntimeError):
    """A binary is missing and could not be built."""


def cache_root() -> Path:
    env = os.environ.get("AUTOGLM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "autoglm"


def cache_key() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return (
        f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}_kwok-{KWOK_VERSION}"
        f"_helm-{HELM_VERSION}_linux-{arch}"
    )


def bin_dir() -> Path:
    return cache_root() / "bin" / cache_key()


@dataclass(frozen=True, slots=True)
class ResolvedBinary:
    name: str
    path: Path
    source: str  # "TEST_ASSET_*", "KUBEBUILDER_ASSETS" or "cache"


def _env_name(name: str) -> str:
    return "TEST_ASSET_" + name.upper().replace("-", "_")


def find_binary(name: str) -> ResolvedBinary | None:
    """Locate ``name`` without building anything."""
    explicit = os.environ.get(_env_name(name))
    if explicit:
        return ResolvedBinary(name, Path(explicit), _env_name(name))
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / name).is_file():
        return ResolvedBinary(name, Path(assets) / name, "KUBEBUILDER_ASSETS")
    cached = bin_dir() / name
    if cached.is_file():
        return ResolvedBinary(name, cached, "cache")
    return None


def _ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    stamps = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        stamps += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(["-s", "-w", *stamps])


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # A toolchain mismatch must fail loudly rather than download another Go.
    env["GOTOOLCHAIN"] = "local"
    env.setdefault("CGO_ENABLED", "0")
    return env


@contextmanager
def _build_lock() -> Iterator[None]:
    """Serialise builds across processes (two pytest runs, a test and the CLI)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "build.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_go(args: list[str], cwd: Path | None, env: dict[str, str]) -> None:
    log.info("running: %s", " ".join(args))
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BinaryError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{tail}")


def build_binaries(names: tuple[str, ...] = ALL_BINARIES) -> dict[str, float]:
    """Build the missing binaries into the cache. Returns seconds spent per step.

    Builds go to a temporary folder inside the cache and are renamed into place,
    so an interrupted build never leaves a half-written binary behind.
    """
    if shutil.which("go") is None:
        raise BinaryError(
            "the Go toolchain is needed to build the control plane: install Go >= 1.26"
        )
    timings: dict[str, float] = {}
    with _build_lock():
        target = bin_dir()
        target.mkdir(parents=True, exist_ok=True)
        missing = [n for n in names if not (target / n).is_file()]
        if not missing:
            return timings
        env = _go_env()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            out = Path(tmp)
            wrapper = [n for n in missing if n in WRAPPER_BINARIES]
            if wrapper:
                start = time.monotonic()
                pkgs = [f"./cmd/{n}" for n in wrapper]
                _run_go(
                    ["go", "build", "-trimpath", "-ldflags", _ldflags(), "-o", f"{out}/", *pkgs],
                    cwd=K8S_MODULE_DIR,
                    env=env,
                )
                timings["kubernetes"] = time.monotonic() - start
            for name in missing:
                if name not in GO_INSTALL_BINARIES:
                    continue
                start = time.monotonic()
                _run_go(
                    ["go", "install", "-trimpath", "-ldflags", "-s -w", GO_INSTALL_BINARIES[name]],
                    cwd=None,
                    env={**env, "GOBIN": str(out)},
                )
                timings[name] = time.monotonic() - start
            for name in missing:
                os.replace(out / name, target / name)
    return timings


def ensure_binaries(names: tuple[str, ...] = ALL_BINARIES) -> dict[str, Path]:
    """Resolve every binary, building into the cache what is found nowhere."""
    found = {n: find_binary(n) for n in names}
    to_build = tuple(n for n, r in found.items() if r is None)
    if to_build:
        log.info(
            "building %s into %s (a cold build takes about 10 minutes on 2 cores)",
            to_build,
            bin_dir(),
        )
        build_binaries(to_build)
    paths: dict[str, Path] = {}
    for name in names:
        resolved = found[name] or find_binary(name)
        if resolved is None or not resolved.path.is_file():
            raise BinaryError(f"{name}: not found at {resolved.path if resolved else bin_dir()}")
        paths[name] = resolved.path
    return paths
