"""``autoglm-server``: flags, each with an ``AUTOGLM_<FLAG>`` environment variable.

The operator configures pods only through environment variables
(``docs/architecture.md`` has the table), people use flags; a flag given on the
command line wins over its variable. Flags map mechanically onto
``EngineConfig`` / ``BatchingConfig`` fields of the same name, so adding a
batching knob is one line in :data:`FLAGS`.

Nothing here imports torch: ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

ENV_PREFIX = "AUTOGLM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _optional_int(value: str) -> int | None:
    return None if value.strip() in ("", "none", "auto") else int(value)


@dataclass(frozen=True, slots=True)
class Flag:
    """One setting: its flag, type, default and where it lands."""

    name: str  # flag without dashes, e.g. "max-batch-size"
    type: Callable[[str], Any]
    default: Any
    help: str
    target: str  # "engine", "batching", "serve" or "log"
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("model", str, None, "local model directory or hf://org/name@revision (required)", "engine"),
    Flag("served-model-name", str, None, "model name in APIs and metrics (default: directory name)", "engine"),
    Flag("model-version", str, "local", "revision label in APIs and metrics", "engine"),
    Flag("dtype", str, "auto", "weight dtype", "engine", ("auto", "float32", "float16", "bfloat16")),
    Flag("device", str, "auto", "cpu, cuda, cuda:N or auto", "engine"),
    Flag("max-model-len", _optional_int, None, "context limit, prompt + output (default: model config)", "engine"),
    Flag("trust-remote-code", parse_bool, False, "allow code shipped with the model", "engine"),
    Flag("sha256-file", str, None, 'JSON {"file": "<hex>"}; every listed file is verified', "engine"),
    Flag("host", str, "0.0.0.0", "bind address", "serve"),
    Flag("grpc-port", int, 8001, "gRPC: autoglm.v1, KServe v2, health, reflection", "serve"),
    Flag("http-port", int, 8000, "OpenAI HTTP API, /healthz, /readyz, /metrics", "serve"),
    Flag("metrics-port", int, 8002, "Prometheus /metrics only (0: only on the HTTP port)", "serve"),
    Flag("max-batch-size", int, 64, "running requests per step", "batching"),
    Flag("max-batch-tokens", int, 8192, "tokens per step (prefill budget)", "batching"),
    Flag("max-queue-delay-ms", float, 0.0, "how long the first waiting request may wait for company", "batching"),
    Flag("max-queue-length", int, 1024, "waiting requests before RESOURCE_EXHAUSTED", "batching"),
    Flag("priority-levels", int, 1, "number of priorities, 0 the most urgent", "batching"),
    Flag("chunked-prefill", parse_bool, True, "split long prompts across steps", "batching"),
    Flag("kv-cache-memory-fraction", float, 0.9, "CUDA: share of GPU memory for weights, KV cache and work", "engine"),
    Flag("kv-block-size", int, 16, "tokens per KV cache block", "engine"),
    Flag("prefix-caching", parse_bool, True, "reuse the KV cache of shared prompt prefixes", "engine"),
    Flag("quantization", str, "none", "weight quantisation through torchao; auto: the highest precision whose weights and KV cache fit the GPU", "engine", ("none", "fp8", "int8", "int4", "auto")),
    Flag("tensor-parallel-size", int, 1, "GPUs to shard the model over, one process each (1, 2, 4 or 8)", "engine"),
    Flag("compile", parse_bool, True, "torch.compile the model on CUDA (warm-up takes longer)", "engine"),
    Flag("compile-cache-dir", str, None, "compiled-kernel cache, reused across restarts (a volume)", "engine"),
    Flag("shutdown-grace-seconds", float, 30.0, "drain time after SIGTERM", "serve"),
    Flag("chat-template", str, None, "Jinja chat template file; replaces the tokenizer's own", "serve"),
    Flag("tool-call-parser", str, None, "tool-call format: glm4 or llama3_json (default: from the chat template)", "serve"),
    Flag("api-keys-file", str, None, "JSON file of API keys and their limits (a mounted Secret; re-read when it changes); unset: no keys needed", "serve"),
    Flag("metrics-auth", parse_bool, False, "/metrics needs a key with the metrics scope", "serve"),
    Flag("tls-cert-file", str, None, "PEM certificate chain for gRPC and HTTP (tls.crt; reloaded on change)", "serve"),
    Flag("tls-key-file", str, None, "PEM private key (tls.key)", "serve"),
    Flag("tls-client-ca-file", str, None, "PEM CA: clients must present a certificate it signed (mTLS)", "serve"),
    Flag("model-signature", str, None, "model-signing signature of the model (default: <model>/model.sig)", "serve"),
    Flag("model-signing-public-key", str, None, "PEM public key; the model loads only if its signature verifies", "serve"),
    Flag("http-max-body-bytes", int, 4 * 1024 * 1024, "largest HTTP request body (413 above)", "serve"),
    Flag("http-request-timeout-seconds", float, 0.0, "HTTP request deadline, streams included (504; 0: none)", "serve"),
    Flag("log-format", str, "plain", "log line format", "log", ("plain", "json")),
    Flag("log-level", str, "info", "log level", "log", ("debug", "info", "warning", "error")),
)  # fmt: skip


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser, with each default taken from the environment when set there."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="autoglm-server",
        description="Serve one LLM over gRPC (autoglm.v1, KServe v2) and OpenAI-compatible HTTP. "
        "Every flag can also be set as the environment variable shown.",
    )
    for flag in FLAGS:
        raw = env.get(flag.env)
        kwargs: dict[str, Any] = {
            "dest": flag.dest,
            "help": f"{flag.help} [env {flag.env}; default {flag.default}]",
        }
        default = flag.default
        if raw is not None:
            # Converted here, not by argparse, so that a bad value names the
            # variable the operator set rather than a flag nobody typed.
            try:
                default = flag.type(raw)
            except (ValueError, argparse.ArgumentTypeError):
                parser.error(f"{flag.env}: invalid value {raw!r}")
            if flag.choices and default not in flag.choices:
                parser.error(f"{flag.env}: {raw!r} is not one of {', '.join(flag.choices)}")
        kwargs["default"] = default
        if flag.type is parse_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = flag.type
            if flag.choices:
                kwargs["choices"] = flag.choices
            if flag.name == "model" and raw is None:
                kwargs["required"] = True
        parser.add_argument(f"--{flag.name}", **kwargs)
    return parser


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(EngineConfig, ServeOptions) from parsed flags. Raises ValueError naming the field."""
    from autoglm_server.app import ServeOptions
    from autoglm_server.engine.config import BatchingConfig, EngineConfig

    def pick(target: str) -> dict[str, Any]:
        return {f.dest: getattr(args, f.dest) for f in FLAGS if f.target == target}

    batching = BatchingConfig(**pick("batching"))
    engine = EngineConfig(**pick("engine"), batching=batching)
    serve = pick("serve")
    options = ServeOptions(
        host=serve["host"],
        grpc_port=serve["grpc_port"],
        http_port=serve["http_port"],
        metrics_port=serve["metrics_port"],
        shutdown_grace_s=serve["shutdown_grace_seconds"],
        chat_template=_chat_template(serve["chat_template"]),
        tool_call_parser=_tool_call_parser(serve["tool_call_parser"]),
        api_keys_file=serve["api_keys_file"],
        metrics_auth=serve["metrics_auth"],
        tls_cert_file=serve["tls_cert_file"],
        tls_key_file=serve["tls_key_file"],
        tls_client_ca_file=serve["tls_client_ca_file"],
        model_signature=serve["model_signature"],
        model_signing_public_key=serve["model_signing_public_key"],
        http_max_body_bytes=serve["http_max_body_bytes"],
        http_request_timeout_s=serve["http_request_timeout_seconds"],
    )
    if options.shutdown_grace_s < 0:
        raise ValueError("shutdown_grace_seconds: must be >= 0")
    return engine, options


def _chat_template(path: str | None) -> str | None:
    """The template text of --chat-template (read once, at start-up)."""
    if not path:
        return None
    from autoglm_server.frontends.chat import read_template

    return read_template(path)


def _tool_call_parser(name: str | None) -> str | None:
    if not name:
        return None
    from autoglm_server.frontends.tools import PARSERS

    if name not in PARSERS:
        raise ValueError(f"tool_call_parser: must be one of {', '.join(sorted(PARSERS))}")
    return name


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines. Messages never carry prompts or outputs."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _json_line(text: str) -> bytes:
    record = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "level": "warning",
        "logger": "stderr",
        "msg": text,
    }
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def capture_stderr_as_json() -> TextIO:
    """Under ``--log-format json``, make every line written to stderr a JSON record.

    Libraries write to stderr behind logging's back: transformers' own handler,
    tqdm progress bars, and native code (xgrammar's C++, the tokenizers' Rust)
    that writes to file descriptor 2 directly. fd 2 becomes a pipe; a daemon
    thread turns each line of it (``\r`` ends a progress bar's line too) into
    ``{"level": "warning", "logger": "stderr", ...}`` on the real stderr, and
    passes lines that are JSON objects already. Returns a stream on the real
    stderr for our own log handler.
    """
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = io.TextIOWrapper(
        os.fdopen(2, "wb", closefd=False), encoding="utf-8", errors="replace", line_buffering=True
    )

    def pump() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)
                for raw in lines:
                    text = raw.decode("utf-8", "replace").rstrip()
                    if not text.strip():
                        continue
                    if text.startswith("{") and text.endswith("}"):
                        os.write(real, text.encode() + b"\n")
                    else:
                        os.write(real, _json_line(text))

    thread = threading.Thread(target=pump, name="stderr-json", daemon=True)
    thread.start()

    def drain() -> None:
        # At exit (after any uncaught traceback was printed): close the pipe's
        # last write end so the thread reads to the end, and let it finish.
        sys.stderr.flush()
        os.dup2(real, 2)
        thread.join(timeout=2.0)

    atexit.register(drain)
    return os.fdopen(os.dup(real), "w", encoding="utf-8", errors="replace", buffering=1)


def configure_logging(fmt: str, level: str) -> None:
    if fmt == "json":
        # Progress bars are for terminals; Python warnings go through logging.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning is Rust's
        logging.captureWarnings(True)
        handler = logging.StreamHandler(capture_stderr_as_json())
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's start-up chatter repeats once per listener; our own line says it all.
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        engine_config, options = build_configs(args)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        parser.error(f"--{field.replace('_', '-')}: {message or exc}")
    from autoglm_server.app import run_server

    return run_server(engine_config, options)


if __name__ == "__main__":
    sys.exit(main())
