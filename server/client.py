"""The AutoGLM gRPC client and the ``autoglm`` command.

Works with the base install (grpcio, protobuf, pydantic): nothing on this
path imports torch or the engine, so a client container stays small.

    from autoglm_server.client import AutoGLMClient

    with AutoGLMClient("localhost:8001") as client:
        print(client.generate("Hello", max_new_tokens=16).text)
        for chunk in client.generate_stream("Hello"):
            print(chunk.text, end="", flush=True)

``AsyncAutoGLMClient`` is the same over ``grpc.aio`` (the load generator uses
it). Failures surface as ``grpc.RpcError`` with the server's status code.

The command:

    autoglm generate "Hello" --stream --max-new-tokens 32
    autoglm health
    autoglm info
    autoglm bench --concurrency 8 --requests 64 --prompt-len 32 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:8001"
# Per-request balancing over every address the target resolves to: an
# ``ipv4:a:p,b:p`` list, or ``dns:///svc.ns:8001`` of a headless Service (one A
# record per ready pod). gRPC's default (pick_first) would send every request
# of a channel to one backend.
LB_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_FINISH_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_TOOL_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


@dataclass(frozen=True, slots=True)
class Logprob:
    """One generated token's logprob and its most likely alternatives ((id, logprob), ...)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made; ``arguments`` is a JSON object as text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed piece of call ``index``: id and name on its first piece, then arguments."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "tool_calls" | "abort" | "error"
    logprobs: list[Logprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """Choice 0 at the top level; ``choices`` has all n (usage counts all of them)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "tool_calls" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    model: str
    logprobs: list[Logprob] | None = None  # when the request asked for logprobs
    tool_calls: list[ToolCall] = field(default_factory=list)  # choice 0's calls (text is "")
    choices: list[Choice] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # set on each choice's last chunk only
    prompt_tokens: int | None  # set on the stream's last chunk only
    completion_tokens: int | None
    logprobs: list[Logprob] | None = None  # when the request asked for logprobs
    index: int = 0  # the choice (n > 1)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelDescription:
    name: str
    version: str
    max_model_len: int
    dtype: str
    device: str
    vocab_size: int
    architecture: str


Message = tuple[str, str] | Mapping[str, Any]


def _message_pb(message: Message) -> pb.ChatMessage:
    """``(role, content)``, or a mapping with role, content and tool fields (OpenAI's
    names: ``tool_calls`` as ``{"id", "name", "arguments"}`` or OpenAI's nested
    ``function``, ``tool_call_id``, ``name``)."""
    if isinstance(message, tuple):
        role, content = message
        return pb.ChatMessage(role=role, content=content)
    out = pb.ChatMessage(role=message["role"], content=message.get("content") or "")
    if message.get("name"):
        out.name = message["name"]
    if message.get("tool_call_id"):
        out.tool_call_id = message["tool_call_id"]
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call)
        arguments = fn.get("arguments", "{}")
        out.tool_calls.add(
            id=call.get("id", ""),
            name=fn["name"],
            arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
        )
    return out


def _tool_pb(tool: Mapping[str, Any]) -> pb.Tool:
    """OpenAI's ``{"type": "function", "function": {...}}`` or the flat ``{"name", ...}``."""
    fn = tool.get("function", tool)
    parameters = fn.get("parameters")
    return pb.Tool(
        name=fn["name"],
        description=fn.get("description") or "",
        parameters=""
        if parameters is None
        else parameters
        if isinstance(parameters, str)
        else json.dumps(parameters),
    )


def _tool_choice_pb(choice: str | Mapping[str, Any]) -> pb.ToolChoice:
    """``"auto"``, ``"none"``, ``"required"``, or a function: ``{"function": "name"}`` or
    OpenAI's ``{"type": "function", "function": {"name": ...}}``."""
    if isinstance(choice, str):
        if choice not in _TOOL_MODES:
            raise ValueError(f"tool_choice: one of {sorted(_TOOL_MODES)} or a function")
        return pb.ToolChoice(mode=_TOOL_MODES[choice])
    fn = choice["function"]
    return pb.ToolChoice(function=fn if isinstance(fn, str) else fn["name"])


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    priority: int = 0,
    ignore_eos: bool = False,
    request_id: str = "",
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    logprobs: int | None = None,
    json_schema: Mapping[str, Any] | str | None = None,
    n: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; unset knobs stay unset so the server's defaults apply.

    ``json_schema={}`` asks for any JSON object (OpenAI's ``json_object``);
    ``tools`` need ``messages``.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    req = pb.GenerateRequest(
        stop=list(stop), priority=priority, ignore_eos=ignore_eos, request_id=request_id
    )
    if prompt is not None:
        req.prompt = prompt
    else:
        assert messages is not None
        req.chat.messages.extend(_message_pb(m) for m in messages)
    optional: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "logprobs": logprobs,
        "json_schema": json_schema
        if json_schema is None or isinstance(json_schema, str)
        else json.dumps(json_schema),
        "n": n,
        "parallel_tool_calls": parallel_tool_calls,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(req, name, value)
    for token, bias in (logit_bias or {}).items():
        req.logit_bias[int(token)] = float(bias)
    req.tools.extend(_tool_pb(t) for t in tools or ())
    if tool_choice is not None:
        req.tool_choice.CopyFrom(_tool_choice_pb(tool_choice))
    return req


def _logprobs(entries: Any) -> list[Logprob] | None:
    if not entries:
        return None
    return [
        Logprob(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top]) for e in entries
    ]


def _calls(entries: Any) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments) for c in entries]


def _result(resp: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        request_id=resp.request_id,
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=_FINISH_NAMES.get(resp.finish_reason),
        prompt_tokens=resp.usage.prompt_tokens,
        completion_tokens=resp.usage.completion_tokens,
        model=resp.model,
        logprobs=_logprobs(resp.logprobs),
        tool_calls=_calls(resp.tool_calls),
        choices=[
            Choice(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                finish_reason=_FINISH_NAMES.get(c.finish_reason),
                logprobs=_logprobs(c.logprobs),
                tool_calls=_calls(c.tool_calls),
            )
            for c in resp.choices
        ],
    )


def _chunk(resp: pb.GenerateStreamResponse) -> StreamChunk:
    last = resp.HasField("usage")
    return StreamChunk(
        request_id=resp.request_id,
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=_FINISH_NAMES.get(resp.finish_reason),
        prompt_tokens=resp.usage.prompt_tokens if last else None,
        completion_tokens=resp.usage.completion_tokens if last else None,
        logprobs=_logprobs(resp.logprobs),
        index=resp.index,
        tool_calls=[ToolCallDelta(d.index, d.id, d.name, d.arguments) for d in resp.tool_calls],
    )


def _model(resp: pb.ModelInfoResponse) -> ModelDescription:
    return ModelDescription(
        name=resp.name,
        version=resp.version,
        max_model_len=resp.max_model_len,
        dtype=resp.dtype,
        device=resp.device,
        vocab_size=resp.vocab_size,
        architecture=resp.architecture,
    )


def _health_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def wait_until_serving(target: str, timeout_s: float = 300.0, service: str = "") -> None:
    """Block until ``target`` answers SERVING; TimeoutError after ``timeout_s``.

    Each attempt uses a fresh channel. A channel whose first connection was
    refused backs off before it tries again (up to minutes), and on grpcio
    1.68 to 1.72.1 a channel that failed once may never reconnect at all (the
    backup-poller bug, grpc/grpc#38290): a wait that reuses one channel can
    hang although the server is up.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with grpc.insecure_channel(target) as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2.0
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target} is not SERVING after {timeout_s:g} s")
        time.sleep(0.1)


def channel_options(
    extra: Sequence[tuple[str, Any]] = (), *, balance: bool = True
) -> list[tuple[str, Any]]:
    """The client's channel options: round_robin over the resolved backends (unless ``balance`` is off).

    The service config is the channel's default; a resolver that supplies its
    own (a DNS TXT record) would override it, which Kubernetes DNS does not do.
    """
    options: list[tuple[str, Any]] = []
    if balance:
        options.append(("grpc.service_config", LB_SERVICE_CONFIG))
    options.extend(extra)
    return options


def _channel(
    target: str,
    options: list[tuple[str, Any]],
    aio: bool,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    tls: bool,
) -> Any:
    if not (tls or root_certificates or certificate_chain):
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(
            target, options=options
        )
    creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(target, creds, options=options)


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class _ClientBase:
    """What both clients share: the channel and its stubs, and each call's options.

    The call helpers return what the stub returns: the response (blocking) or an
    awaitable call (``grpc.aio``); each client converts it with the same function.
    """

    _aio: ClassVar[bool] = False  # grpc.aio channels

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        balance: bool = True,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        self._channel = _channel(
            target, channel_options(balance=balance), self._aio,
            root_certificates, certificate_chain, private_key, tls,
        )  # fmt: skip
        self._md = _auth(api_key)
        self._stub = pb_grpc.AutoGLMStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """``method`` of autoglm.v1 with the call's timeout (else the client's) and the key."""
        stub_method = getattr(self._stub, method)
        return stub_method(request, timeout=timeout or self.timeout, metadata=self._md)

    def _generate(
        self, method: str, prompt: str | None, timeout: float | None, kwargs: dict[str, Any]
    ) -> Any:
        """A Generate or GenerateStream call; ``kwargs`` as for :func:`build_generate_request`."""
        return self._call(method, build_generate_request(prompt, **kwargs), timeout)

    def _check(self, service: str) -> Any:
        """Health is open: no key, and a 5 s deadline when the client has none."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._health.Check(request, timeout=self.timeout or 5.0)


class AutoGLMClient(_ClientBase):
    """Blocking client for autoglm.v1 and grpc.health.v1 over one channel.

    ``api_key`` is sent as ``authorization: Bearer <key>``; ``tls=True`` (or
    ``root_certificates``) uses TLS, with ``certificate_chain`` and
    ``private_key`` (PEM bytes) for mTLS.

    ``target`` is anything gRPC resolves: ``host:port``, ``ipv4:10.0.0.1:8001,10.0.0.2:8001``
    or ``dns:///autoglm-headless.ns.svc:8001``; requests are balanced round-robin
    over every address (``balance=False`` keeps gRPC's pick_first).
    """

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> GenerateResult:
        """Keyword arguments are those of :func:`build_generate_request`."""
        return _result(self._generate("Generate", prompt, timeout, kwargs))

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[StreamChunk]:
        """Chunks as they come; leaving the loop early cancels the request on the server."""
        call = self._generate("GenerateStream", prompt, timeout, kwargs)
        try:
            for resp in call:
                yield _chunk(resp)
        finally:
            call.cancel()

    def tokenize(self, text: str) -> list[int]:
        return list(self._call("Tokenize", pb.TokenizeRequest(text=text)).token_ids)

    def model_info(self) -> ModelDescription:
        return _model(self._call("ModelInfo", pb.ModelInfoRequest()))

    def health(self, service: str = "") -> str:
        """``SERVING`` or ``NOT_SERVING`` (or ``SERVICE_UNKNOWN``)."""
        return _health_name(self._check(service).status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AutoGLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAutoGLMClient(_ClientBase):
    """The same over grpc.aio, for many concurrent requests from one thread.

    ``deadline`` (seconds) is the gRPC deadline the server enforces. Targets
    and balancing as for :class:`AutoGLMClient`.
    """

    _aio = True

    async def generate(
        self, prompt: str | None = None, *, deadline: float | None = None, **kwargs: Any
    ) -> GenerateResult:
        return _result(await self._generate("Generate", prompt, deadline, kwargs))

    async def generate_stream(
        self, prompt: str | None = None, *, deadline: float | None = None, **kwargs: Any
    ) -> AsyncIterator[StreamChunk]:
        call = self._generate("GenerateStream", prompt, deadline, kwargs)
        try:
            async for resp in call:
                yield _chunk(resp)
        finally:
            call.cancel()

    async def tokenize(self, text: str) -> list[int]:
        return list((await self._call("Tokenize", pb.TokenizeRequest(text=text))).token_ids)

    async def model_info(self) -> ModelDescription:
        return _model(await self._call("ModelInfo", pb.ModelInfoRequest()))

    async def health(self, service: str = "") -> str:
        return _health_name((await self._check(service)).status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAutoGLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------- the command


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--logprobs", type=int, help="logprobs of each token and this many alternatives")
    p.add_argument("--json-schema", help="file with a JSON schema the output must validate against")
    p.add_argument("-n", type=int, dest="n", help="choices to generate (1..16)")
    p.add_argument("--tools", help="file with a JSON list of tools (OpenAI's shape); needs --chat")
    p.add_argument("--tool-choice", help="auto, none, required, or function:NAME (with --tools)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm", description="AutoGLM gRPC client.")
    parser.add_argument(
        "--target",
        default=os.environ.get("AUTOGLM_TARGET", DEFAULT_TARGET),
        help="host:port of the gRPC server [env AUTOGLM_TARGET; default %(default)s]",
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("AUTOGLM_API_KEY"),
        help="sent as authorization: Bearer <key> [env AUTOGLM_API_KEY]",
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    parser.add_argument("--ca-file", help="PEM CA to trust (implies --tls)")
    parser.add_argument("--cert-file", help="PEM client certificate for mTLS")
    parser.add_argument("--key-file", help="PEM client key for mTLS")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user message")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON")
    _add_sampling(gen)

    health = sub.add_parser("health", help="gRPC health check; exit 0 only when SERVING")
    health.add_argument("--service", default="", help='service name ("" is the whole server)')

    sub.add_parser("info", help="describe the served model (JSON)")

    bench = sub.add_parser("bench", help="closed-loop load test; prints one JSON line")
    bench.add_argument("--concurrency", type=int, default=8)
    bench.add_argument("--requests", type=int, default=64)
    bench.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens")
    bench.add_argument("--max-new-tokens", type=int, default=32)
    return parser


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "priority": args.priority,
        "ignore_eos": args.ignore_eos,
        "presence_penalty": getattr(args, "presence_penalty", None),
        "frequency_penalty": getattr(args, "frequency_penalty", None),
        "logprobs": getattr(args, "logprobs", None),
        "json_schema": _read_schema(getattr(args, "json_schema", None)),
        "n": getattr(args, "n", None),
        "tools": _read_tools(getattr(args, "tools", None)),
        "tool_choice": _cli_tool_choice(getattr(args, "tool_choice", None)),
    }


def _read_tools(path: str | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        tools = json.load(f)
    if not isinstance(tools, list):
        raise ValueError(f"--tools: {path} must hold a JSON list")
    return tools


def _cli_tool_choice(value: str | None) -> str | dict[str, str] | None:
    if value is not None and value.startswith("function:"):
        return {"function": value.removeprefix("function:")}
    return value


def _read_schema(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _run_generate(client: AutoGLMClient, args: argparse.Namespace) -> int:
    kwargs = _sampling_kwargs(args)
    if args.chat:
        kwargs["messages"] = [("user", args.prompt)]
        prompt = None
    else:
        prompt = args.prompt
    if args.stream:
        last: StreamChunk | None = None
        for chunk in client.generate_stream(prompt, **kwargs):
            if args.json:
                print(json.dumps(asdict(chunk)), flush=True)
            else:
                print(chunk.text, end="", flush=True)
            last = chunk
        if not args.json:
            print()
            if last is not None:
                print(
                    f"[finish={last.finish_reason} prompt_tokens={last.prompt_tokens} "
                    f"completion_tokens={last.completion_tokens}]",
                    file=sys.stderr,
                )
        return 0
    result = client.generate(prompt, **kwargs)
    print(json.dumps(asdict(result)) if args.json or result.tool_calls else result.text)
    return 0


def _security_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return {
        "api_key": args.api_key,
        "tls": args.tls,
        "root_certificates": read(args.ca_file),
        "certificate_chain": read(args.cert_file),
        "private_key": read(args.key_file),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from autoglm_server.loadgen import LoadSpec, run_load

            spec = LoadSpec(
                concurrency=args.concurrency,
                requests=args.requests,
                prompt_len=args.prompt_len,
                max_new_tokens=args.max_new_tokens,
            )
            print(json.dumps(asyncio.run(run_load(args.target, spec))))
            return 0
        with AutoGLMClient(args.target, timeout=args.timeout, **_security_kwargs(args)) as client:
            if args.command == "generate":
                return _run_generate(client, args)
            if args.command == "health":
                status = client.health(args.service)
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "info":
                print(json.dumps(asdict(client.model_info())))
                return 0
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"autoglm: {code}: {details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
