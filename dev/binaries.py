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

The add-ons of a live cluster (``autoglm_dev.addons``): Prometheus,
prometheus-adapter and Traefik, each from its own wrapper module under
``hack/`` (``hack/prometheus``, ``hack/adapter``, ``hack/traefik``) that pins
the upstream module with a ``tool`` directive and a committed go.sum. Traefik's
wrapper repeats the replace directives of Traefik's own go.mod. Each add-on is
cached in its own folder keyed on its version, ``bin/<name>-<version>_linux-<arch>/``,
so bumping one rebuilds only that one, and none of them is built by a plain
``cluster up``.
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
# Add-ons; each must equal the version its hack/<dir>/go.mod pins (checked at build).
PROMETHEUS_VERSION = "v0.316.0"  # the Go module's version of ...
PROMETHEUS_RELEASE = "3.16.0"  # ... this Prometheus release (stamped into the binary)
PROMETHEUS_ADAPTER_VERSION = "v0.12.0"
TRAEFIK_VERSION = "v3.6.12"  # v3.7 does not build from the proxy (refused dependencies)
# The Gateway API release Traefik v3.6.12 is built against (its go.mod); CRDs come from it.
GATEWAY_API_VERSION = "v1.4.0"

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

HACK_DIR = K8S_MODULE_DIR.parent


@dataclass(frozen=True, slots=True)
class AddonBuild:
    """One add-on binary: its wrapper module (under hack/), the upstream module it
    pins and the main package built from it."""

    module_dir: str
    module: str
    version: str
    package: str
    ldflags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # build tags; part of the cache folder's name


ADDONS: dict[str, AddonBuild] = {
    "prometheus": AddonBuild(
        "prometheus",
        "github.com/prometheus/prometheus",
        PROMETHEUS_VERSION,
        "github.com/prometheus/prometheus/cmd/prometheus",
        (f"-X github.com/prometheus/common/version.Version={PROMETHEUS_RELEASE}",),
        # Only Kubernetes service discovery (Prometheus' own build tags): the
        # cloud SDKs of the other mechanisms were 45% of the build's CPU time.
        ("remove_all_sd", "enable_kubernetes_sd"),
    ),
    "prometheus-adapter": AddonBuild(
        "adapter",
        "sigs.k8s.io/prometheus-adapter",
        PROMETHEUS_ADAPTER_VERSION,
        "sigs.k8s.io/prometheus-adapter/cmd/adapter",
    ),
    "traefik": AddonBuild(
        "traefik",
        "github.com/traefik/traefik/v3",
        TRAEFIK_VERSION,
        "github.com/traefik/traefik/v3/cmd/traefik",
        (f"-X github.com/traefik/traefik/v3/pkg/version.Version={TRAEFIK_VERSION}",),
    ),
}
ADDON_BINARIES = tuple(ADDONS)


class BinaryError(RuntimeError):
    """A binary is missing and could not be built."""


def cache_root() -> Path:
    env = os.environ.get("AUTOGLM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "autoglm"


def cache_key() -> str:
    return (
        f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}_kwok-{KWOK_VERSION}"
        f"_helm-{HELM_VERSION}_linux-{_arch()}"
    )


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def bin_dir(name: str | None = None) -> Path:
    """The cache folder of ``name``: the control plane's shared folder, or an
    add-on's own folder keyed on its version."""
    if name in ADDONS:
        spec = ADDONS[name]
        flavour = "".join(f"+{t}" for t in spec.tags)
        return cache_root() / "bin" / f"{name}-{spec.version}{flavour}_linux-{_arch()}"
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
    cached = bin_dir(name) / name
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


def go_mod_version(module_dir: Path, module: str) -> str | None:
    """The version of ``module`` that the go.mod in ``module_dir`` requires."""
    for line in (module_dir / "go.mod").read_text().splitlines():
        parts = line.strip().removeprefix("require").split()
        if len(parts) >= 2 and parts[0] == module:
            return parts[1]
    return None


def _build_addon(name: str, out: Path, env: dict[str, str]) -> None:
    spec = ADDONS[name]
    module_dir = HACK_DIR / spec.module_dir
    pinned = go_mod_version(module_dir, spec.module)
    if pinned != spec.version:
        raise BinaryError(
            f"{name}: {module_dir / 'go.mod'} pins {spec.module} {pinned}, but "
            f"autoglm_dev.binaries asks for {spec.version}; change both together"
        )
    ldflags = " ".join(["-s", "-w", *spec.ldflags])
    _run_go(
        [
            "go",
            "build",
            "-trimpath",
            f"-tags={','.join(spec.tags)}",
            "-ldflags",
            ldflags,
            "-o",
            str(out / name),
            spec.package,
        ],
        cwd=module_dir,
        env=env,
    )


def build_binaries(names: tuple[str, ...] = ALL_BINARIES) -> dict[str, float]:
    """Build the missing binaries into the cache. Returns seconds spent per step.

    Builds go to a temporary folder inside the cache and are renamed into place,
    so an interrupted build never leaves a half-written binary behind. One
    ``go build`` runs at a time (a lock across processes): on 2 cores two at once
    only add memory pressure.
    """
    if shutil.which("go") is None:
        raise BinaryError(
            "the Go toolchain is needed to build the control plane: install Go >= 1.26.7"
        )
    timings: dict[str, float] = {}
    with _build_lock():
        missing = [n for n in names if not (bin_dir(n) / n).is_file()]
        if not missing:
            return timings
        env = _go_env()
        (cache_root() / "bin").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_root() / "bin", prefix=".build-") as tmp:
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
                start = time.monotonic()
                if name in GO_INSTALL_BINARIES:
                    _run_go(
                        [
                            "go",
                            "install",
                            "-trimpath",
                            "-ldflags",
                            "-s -w",
                            GO_INSTALL_BINARIES[name],
                        ],
                        cwd=None,
                        env={**env, "GOBIN": str(out)},
                    )
                elif name in ADDONS:
                    _build_addon(name, out, env)
                else:
                    continue
                timings[name] = time.monotonic() - start
            for name in missing:
                target = bin_dir(name)
                target.mkdir(parents=True, exist_ok=True)
                os.replace(out / name, target / name)
    return timings


def ensure_binaries(names: tuple[str, ...] = ALL_BINARIES) -> dict[str, Path]:
    """Resolve every binary, building into the cache what is found nowhere."""
    found = {n: find_binary(n) for n in names}
    to_build = tuple(n for n, r in found.items() if r is None)
    if to_build:
        log.info(
            "building %s into %s (a cold build takes 10 to 40 minutes on 2 cores)",
            to_build,
            cache_root() / "bin",
        )
        build_binaries(to_build)
    paths: dict[str, Path] = {}
    for name in names:
        resolved = found[name] or find_binary(name)
        if resolved is None or not resolved.path.is_file():
            raise BinaryError(
                f"{name}: not found at {resolved.path if resolved else bin_dir(name)}"
            )
        paths[name] = resolved.path
    return paths
