"""The server process: start-up order, signals, drain and exit codes.

Order matters for Kubernetes:

1. gRPC and HTTP listen first, answering NOT_SERVING / ``/readyz`` 503 (and
   ``/healthz`` 200), so liveness probes pass while a large model loads.
2. The engine loads, warms up and starts its step loop; then SERVING.
3. SIGTERM (or SIGINT): NOT_SERVING at once, so endpoints drop the pod;
   new requests are refused with UNAVAILABLE (clients retry elsewhere);
   admitted requests run to completion for up to ``shutdown_grace_s``; what
   is left then is aborted; the listeners close; exit 0. A second signal
   cuts the grace short. A signal while the model is still loading abandons
   the load (it runs on a daemon thread that can't be interrupted) and exits
   0 at once.
4. If the engine's step loop dies, NOT_SERVING and exit 1, so the kubelet
   restarts the container. A model that can't be loaded exits 2 with one
   line naming the cause (e.g. the file whose digest does not match).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn

from autoglm_server.errors import ModelLoadError
from autoglm_server.frontend import Phase, ServerState
from autoglm_server.grpc_server import build_grpc_server
from autoglm_server.http_server import build_http_app, build_metrics_app
from autoglm_server.security.keys import KeyGuard
from autoglm_server.security.signing import verify_model
from autoglm_server.security.tls import ReloadingTls, TlsFiles, grpc_credentials
from autoglm_server.threads import run_in_daemon_thread

if TYPE_CHECKING:
    from autoglm_server.engine.config import EngineConfig
    from autoglm_server.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ENGINE_DIED = 1
EXIT_START_FAILED = 2  # the model can't be loaded, or a port can't be bound


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Process-level settings (the engine's are in EngineConfig)."""

    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002  # 0: metrics only on the HTTP port
    shutdown_grace_s: float = 30.0
    chat_template: str | None = None  # --chat-template: the template text
    tool_call_parser: str | None = None  # --tool-call-parser: glm4, llama3_json
    api_keys_file: str | None = None  # --api-keys-file: keys and limits (security/keys.py)
    metrics_auth: bool = False  # --metrics-auth: /metrics needs a key with the metrics scope
    tls_cert_file: str | None = None  # --tls-cert-file / --tls-key-file: TLS on gRPC and HTTP
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # --tls-client-ca-file: mTLS
    model_signature: str | None = None  # --model-signature (default <model>/model.sig)
    model_signing_public_key: str | None = None  # --model-signing-public-key: verify first
    http_max_body_bytes: int = 4 * 1024 * 1024  # --http-max-body-bytes
    http_request_timeout_s: float = 0.0  # --http-request-timeout-seconds (0: none)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: signals are ours, so it must not install its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a busy port fails start-up with a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


EngineFactory = Callable[["EngineConfig", Callable[[BaseException], None]], "LLMEngine"]


def _real_engine_factory(
    config: EngineConfig, on_fatal: Callable[[BaseException], None]
) -> LLMEngine:
    from autoglm_server.engine.engine import build_engine

    return build_engine(config, on_fatal=on_fatal)


class ServerProcess:
    """One serving process: the state, the listeners and the engine.

    ``engine_factory`` exists for tests, which drive the whole lifecycle
    with a fake engine; the default builds the real one.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        options: ServeOptions,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.engine_config = engine_config
        self.options = options
        self._engine_factory = engine_factory
        self.state = ServerState()
        self.state.chat_template = options.chat_template
        self.state.tool_parser = options.tool_call_parser
        self.engine: LLMEngine | None = None  # anything with LLMEngine's interface
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._exit_code = EXIT_OK
        self._uvicorns: list[tuple[_EmbeddedUvicorn, asyncio.Task[None]]] = []
        self._grpc: Any = None
        self.ports: dict[str, int] = {}  # bound ports by listener: grpc, http, metrics
        self.listening = asyncio.Event()
        # Stopped while the engine was still loading: a loader thread may still run.
        self.startup_abandoned = False
        self.keys: KeyGuard | None = None
        self._tls: ReloadingTls | None = None
        self._tls_task: asyncio.Task[None] | None = None

    # -- signals -----------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """First call: begin the drain. Later calls: skip what is left of the grace."""
        if self._stop.is_set():
            logger.warning("%s again: cutting the drain short", reason)
            self._hurry.set()
            return
        logger.info("%s: draining", reason)
        if self.state.phase in (Phase.STARTING, Phase.SERVING):
            self.state.set_phase(Phase.DRAINING)
        self._stop.set()

    def _on_engine_fatal(self, exc: BaseException) -> None:
        logger.critical("engine loop died; exiting so the container restarts")
        self._exit_code = EXIT_ENGINE_DIED
        self.state.set_phase(Phase.STOPPED)
        self._stop.set()
        self._hurry.set()

    # -- run -----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        try:
            try:
                await self._start_listeners()
            except OSError as exc:
                logger.error("start-up failed: %s", exc)
                return EXIT_START_FAILED
            if not await self._start_engine():
                return self._exit_code
            if not self._stop.is_set():
                self.state.set_phase(Phase.SERVING)
            await self._stop.wait()
            await self._drain()
        finally:
            await self._close_listeners()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        logger.info("exiting with code %d", self._exit_code)
        return self._exit_code

    def _security(self) -> Any:
        """API keys and TLS from the options (ValueError naming the flag if unusable)."""
        opts = self.options
        if opts.api_keys_file:
            self.keys = KeyGuard(opts.api_keys_file, protect_metrics=opts.metrics_auth)
        elif opts.metrics_auth:
            raise ValueError("metrics_auth: needs api_keys_file")
        if bool(opts.tls_cert_file) != bool(opts.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        if opts.tls_client_ca_file and not opts.tls_cert_file:
            raise ValueError("tls_client_ca_file: needs tls_cert_file and tls_key_file")
        if not opts.tls_cert_file or not opts.tls_key_file:
            return None
        files = TlsFiles(opts.tls_cert_file, opts.tls_key_file, opts.tls_client_ca_file)
        self._tls = ReloadingTls(files)
        return grpc_credentials(files)

    async def _reload_tls(self) -> None:
        assert self._tls is not None
        while True:
            await asyncio.sleep(1.0)
            self._tls.maybe_reload()

    async def _start_listeners(self) -> None:
        opts = self.options
        try:
            credentials = self._security()
        except ValueError as exc:
            raise OSError(str(exc)) from None
        server, grpc_port = build_grpc_server(
            self.state, opts.host, opts.grpc_port, keys=self.keys, credentials=credentials
        )
        self._grpc = server
        await server.start()
        self.ports["grpc"] = grpc_port
        metrics = self._render_metrics
        http_app = build_http_app(
            self.state,
            metrics,
            keys=self.keys,
            max_body_bytes=opts.http_max_body_bytes,
            request_timeout_s=opts.http_request_timeout_s or None,
        )
        apps = [("http", http_app, opts.http_port)]
        if opts.metrics_port:
            metrics_app = build_metrics_app(metrics, self.state, self.keys)
            apps.append(("metrics", metrics_app, opts.metrics_port))
        if self._tls is not None:
            self._tls_task = asyncio.create_task(self._reload_tls(), name="tls-reload")
        for name, app, app_port in apps:
            sock = _listen(opts.host, app_port)
            self.ports[name] = sock.getsockname()[1]
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=5,
                ws="none",
            )
            if name == "http" and self._tls is not None:
                config.load()
                config.ssl = self._tls.context  # reloaded in place on rotation
            server_ = _EmbeddedUvicorn(config)
            task = asyncio.create_task(server_.serve(sockets=[sock]), name=f"uvicorn-{name}")
            self._uvicorns.append((server_, task))
        while not all(s.started for s, _ in self._uvicorns):
            for _, task in self._uvicorns:
                if task.done():
                    task.result()  # surfaces the start-up error
                    raise RuntimeError("an HTTP listener exited during start-up")
            await asyncio.sleep(0.01)
        self.listening.set()
        logger.info(
            "listening on %s: %s",
            opts.host,
            ", ".join(f"{name} {port}" for name, port in self.ports.items()),
        )

    def _render_metrics(self) -> bytes:
        engine = self.engine
        out = engine.metrics.render() if engine is not None else b""
        if self.keys is not None:
            out += self.keys.render()
        return out

    async def _load_engine(self) -> None:
        opts = self.options
        if opts.model_signing_public_key:
            # Before any weight is read; ModelLoadError names the file and the reason.
            await run_in_daemon_thread(
                verify_model,
                str(self.engine_config.model),
                opts.model_signature,
                opts.model_signing_public_key,
            )
            logger.info("model signature verified")
        factory = self._engine_factory
        if factory is None:
            # Importing torch takes seconds; do it off the loop so probes keep answering.
            await run_in_daemon_thread(importlib.import_module, "autoglm_server.engine.engine")
            factory = _real_engine_factory
        engine = factory(self.engine_config, self._on_engine_fatal)
        self.engine = engine
        self.state.engine = engine
        self.state.on_rejected = engine.metrics.on_rejected
        await engine.start()

    async def _start_engine(self) -> bool:
        t0 = time.monotonic()
        try:
            starting = asyncio.create_task(self._load_engine())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                # The import/load threads can't be interrupted; they are daemon
                # threads, abandoned here (run_server then exits without them).
                logger.info("stopped during start-up")
                self.startup_abandoned = True
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
                self.state.set_phase(Phase.STOPPED)
                return False
            stopping.cancel()
            starting.result()
        except ModelLoadError as exc:
            logger.error("model load failed: %s", exc)
            self._exit_code = EXIT_START_FAILED
            self.state.set_phase(Phase.STOPPED)
            return False
        except Exception:
            logger.exception("engine start-up failed")
            self._exit_code = EXIT_START_FAILED
            self.state.set_phase(Phase.STOPPED)
            return False
        logger.info("engine started in %.1f s", time.monotonic() - t0)
        return True

    async def _drain(self) -> None:
        grace = self.options.shutdown_grace_s
        deadline = time.monotonic() + grace
        if self.state.phase is not Phase.STOPPED:
            idle = asyncio.create_task(self.state.wait_idle(grace))
            hurry = asyncio.create_task(self._hurry.wait())
            await asyncio.wait((idle, hurry), return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if not idle.done():
                idle.cancel()
            logger.info("drain: %d requests still in flight", self.state.in_flight)
        engine = self.engine
        if engine is not None:
            left = 0.0 if self._hurry.is_set() else max(0.0, deadline - time.monotonic())
            await engine.shutdown(left)
        # Aborted streams need a moment to send their last message.
        await self.state.wait_idle(1.0)
        self.state.set_phase(Phase.STOPPED)

    async def _close_listeners(self) -> None:
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for server_, _ in self._uvicorns:
            server_.should_exit = True
        for _, task in self._uvicorns:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10)


def run_server(engine_config: EngineConfig, options: ServeOptions) -> int:
    """Run until stopped; return the process exit code.

    If the process was stopped while the model was still loading, this does
    not return: the loader thread can't be interrupted, so once the listeners
    are closed and the logs flushed the process ends at once with
    ``os._exit(0)`` instead of finalising the interpreter around it.
    """
    process: ServerProcess | None = None

    async def main() -> int:
        nonlocal process
        process = ServerProcess(engine_config, options)
        return await process.run()

    code = asyncio.run(main())
    if process is not None and process.startup_abandoned:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
