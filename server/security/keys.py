"""API keys and per-key limits, shared by the gRPC and HTTP front ends.

The keys file (a Kubernetes Secret mounted as a file) is JSON::

    {"keys": [
      {"name": "team-a", "key": "<secret>",          # or "sha256": "<hex of the key>"
       "tenant": "a",                                 # optional, for the operator's books
       "scopes": ["generate", "read"],                # default; "metrics" reads /metrics
       "priority_cap": 1,                             # most urgent priority it may ask for
       "requests_per_minute": 600, "tokens_per_minute": 100000, "max_concurrency": 8}
    ]}

It is re-read on the first request after it changes (a ``stat`` per request:
a Secret update swaps the ``..data`` symlink, which changes the file's inode
and mtime), so keys rotate without a restart. A file that can't be read or
parsed keeps the last good keys and logs why (never the keys themselves).

Checks, in order: a missing or unknown key is UNAUTHENTICATED / 401; a key
without the scope of the method is PERMISSION_DENIED / 403; over a limit is
RESOURCE_EXHAUSTED / 429 with the seconds to wait (``retry-after``). Limits
are token buckets refilled continuously: requests per minute (one token per
request), tokens per minute (prompt and generated tokens, charged as they are
used: a request is admitted while the bucket is not in debt) and concurrent
requests. The bucket state lives under the key's name, so it survives a
reload. Per-key metrics are labelled by key name, at most
:data:`MAX_KEY_LABELS` names (later ones count as ``_other``).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from autoglm_server.errors import AutoGLMError, QueueFullError

logger = logging.getLogger(__name__)

SCOPES = frozenset({"generate", "read", "metrics"})
DEFAULT_SCOPES = frozenset({"generate", "read"})
MAX_KEY_LABELS = 64
MAX_KEYS = 10_000


class UnauthenticatedError(AutoGLMError):
    """No key, or a key this server does not know."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDeniedError(AutoGLMError):
    """A known key without the right for this method."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class RateLimitedError(QueueFullError):
    """A key over one of its limits; ``retry_after_s`` says when it may try again."""

    def __init__(self, key: str, limit: str, retry_after_s: float) -> None:
        super().__init__(f"key {key!r} is over its {limit}", retry_after_s)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key
    tenant: str | None = None
    scopes: frozenset[str] = DEFAULT_SCOPES
    priority_cap: int | None = None  # requests asking for a more urgent priority get this one
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrency: int | None = None


def _positive(entry: dict[str, Any], name: str, where: str) -> float | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{where}.{name}: must be a positive number")
    return float(value)


def parse_keys(text: str) -> dict[bytes, ApiKey]:
    """The keys of a keys file, by digest; ValueError naming the entry and field."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_KEYS:
        raise ValueError(f'keys: must be a list of at most {MAX_KEYS} entries under "keys"')
    out: dict[bytes, ApiKey] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = set(entry) - {
            "name", "key", "sha256", "tenant", "scopes", "priority_cap",
            "requests_per_minute", "tokens_per_minute", "max_concurrency",
        }  # fmt: skip
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown field")
        name = entry.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise ValueError(f"{where}.name: must be 1 to 64 printable characters")
        if name in names:
            raise ValueError(f"{where}.name: {name!r} is used twice")
        names.add(name)
        if isinstance(entry.get("key"), str) and entry["key"]:
            digest = hashlib.sha256(entry["key"].encode()).digest()
        elif isinstance(entry.get("sha256"), str):
            try:
                digest = bytes.fromhex(entry["sha256"])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{where}.sha256: must be 64 hex digits")
        else:
            raise ValueError(f"{where}: needs key or sha256")
        scopes = entry.get("scopes", sorted(DEFAULT_SCOPES))
        if not isinstance(scopes, list) or not set(scopes) <= SCOPES:
            raise ValueError(f"{where}.scopes: a list of {', '.join(sorted(SCOPES))}")
        cap = entry.get("priority_cap")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"{where}.priority_cap: must be an integer >= 0")
        tenant = entry.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError(f"{where}.tenant: must be a string")
        concurrency = _positive(entry, "max_concurrency", where)
        out[digest] = ApiKey(
            name=name,
            digest=digest,
            tenant=tenant,
            scopes=frozenset(scopes),
            priority_cap=cap,
            requests_per_minute=_positive(entry, "requests_per_minute", where),
            tokens_per_minute=_positive(entry, "tokens_per_minute", where),
            max_concurrency=None if concurrency is None else int(concurrency),
        )
    return out


@dataclass(slots=True)
class _Bucket:
    """A token bucket of ``capacity`` refilled at ``capacity`` per minute; may go into debt."""

    capacity: float
    level: float
    at: float

    def refill(self, now: float, capacity: float) -> None:
        self.capacity = capacity
        self.level = min(capacity, self.level + (now - self.at) * capacity / 60.0)
        self.at = now

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches ``need``."""
        return max(0.0, (need - self.level) * 60.0 / self.capacity)


@dataclass(slots=True)
class _KeyState:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: int = 0


@dataclass(slots=True)
class Ticket:
    """One admitted request of one key: charge its tokens, release it when it ends."""

    guard: KeyGuard
    key: ApiKey
    released: bool = False
    tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def charge(self, tokens: int) -> None:
        if tokens > 0:
            self.tokens += tokens
            self.guard._charge(self.key, tokens)

    def cap_priority(self, priority: int) -> int:
        cap = self.key.priority_cap
        return priority if cap is None else max(priority, cap)

    def release(self, code: str) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        self.guard._release(self.key, code)


# The ticket of the request being handled (set by the front ends' guards, read
# by frontends.choices when it makes and streams the engine requests).
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "autoglm_ticket", default=None
)


def cap_priority(priority: int) -> int:
    ticket = current_ticket.get()
    return priority if ticket is None else ticket.cap_priority(priority)


def charge_tokens(tokens: int) -> None:
    ticket = current_ticket.get()
    if ticket is not None:
        ticket.charge(tokens)


class KeyGuard:
    """The keys of one file, their limits and metrics."""

    def __init__(
        self,
        path: str,
        *,
        protect_metrics: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.protect_metrics = protect_metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[bytes, ApiKey] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._states: dict[str, _KeyState] = {}
        self._labels: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "autoglm_api_key_requests_total",
            "Requests by API key name and gRPC status code (auth and limit refusals included).",
            ("key", "code"),
            registry=self.registry,
        )
        self._tokens = Counter(
            "autoglm_api_key_tokens_total",
            "Prompt and generated tokens charged to an API key.",
            ("key",),
            registry=self.registry,
        )
        self._limited = Counter(
            "autoglm_api_key_rate_limited_total",
            "Requests refused because a key was over a limit.",
            ("key", "limit"),
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "autoglm_api_key_in_flight", "Requests in flight per API key.", ("key",),
            registry=self.registry,
        )  # fmt: skip
        self._reloads = Counter(
            "autoglm_api_keys_reloads_total",
            "Reads of the keys file by result (ok, error).",
            ("result",),
            registry=self.registry,
        )
        self.reload()
        if not self._keys and self._stamp is None:
            raise ValueError(f"api_keys_file: cannot read {path}")

    # -- the file ------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the file if it changed since the last read."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None:
                logger.warning("keys file %s: %s; keeping the last keys", self.path, exc.strerror)
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                keys = parse_keys(f.read())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._reloads.labels("error").inc()
            logger.error("keys file %s is not usable (%s); keeping the last keys", self.path, exc)
            if self._stamp is None:
                raise ValueError(f"api_keys_file: {self.path}: {exc}") from None
            self._stamp = stamp
            return
        with self._lock:
            self._keys = keys
            self._stamp = stamp
        self._reloads.labels("ok").inc()
        logger.info("keys file %s: %d keys", self.path, len(keys))

    def _label(self, name: str) -> str:
        if name in self._labels:
            return name
        if len(self._labels) < MAX_KEY_LABELS:
            self._labels.add(name)
            return name
        return "_other"

    # -- the checks -----------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> ApiKey:
        self.reload()
        if not token:
            self._requests.labels("", "UNAUTHENTICATED").inc()
            raise UnauthenticatedError("an API key is required (authorization: Bearer <key>)")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        with self._lock:
            key = self._keys.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            self._requests.labels("", "UNAUTHENTICATED").inc()
            raise UnauthenticatedError("the API key is not valid")
        return key

    def admit(self, token: str | None, scope: str) -> Ticket:
        """Authenticate, check the scope and the limits; the ticket must be released."""
        key = self.authenticate(token)
        label = self._label(key.name)
        if scope not in key.scopes:
            self._requests.labels(label, "PERMISSION_DENIED").inc()
            raise PermissionDeniedError(f"key {key.name!r} may not {scope}")
        now = self._clock()
        with self._lock:
            state = self._states.setdefault(key.name, _KeyState())
            try:
                self._check(key, state, now)
            except RateLimitedError as exc:
                self._limited.labels(label, exc.limit).inc()
                self._requests.labels(label, exc.grpc_code).inc()
                raise
            state.in_flight += 1
        self._in_flight.labels(label).inc()
        return Ticket(self, key)

    def _check(self, key: ApiKey, state: _KeyState, now: float) -> None:
        if key.max_concurrency is not None and state.in_flight >= key.max_concurrency:
            raise RateLimitedError(key.name, "max_concurrency", 1.0)
        if key.tokens_per_minute is not None:
            bucket = state.tokens = state.tokens or _Bucket(
                key.tokens_per_minute, key.tokens_per_minute, now
            )
            bucket.refill(now, key.tokens_per_minute)
            if bucket.level < 0:
                raise RateLimitedError(key.name, "tokens_per_minute", bucket.wait_s(0.0))
        if key.requests_per_minute is not None:
            bucket = state.requests = state.requests or _Bucket(
                key.requests_per_minute, key.requests_per_minute, now
            )
            bucket.refill(now, key.requests_per_minute)
            if bucket.level < 1:
                raise RateLimitedError(key.name, "requests_per_minute", bucket.wait_s(1.0))
            bucket.level -= 1

    def _charge(self, key: ApiKey, tokens: int) -> None:
        self._tokens.labels(self._label(key.name)).inc(tokens)
        if key.tokens_per_minute is None:
            return
        now = self._clock()
        with self._lock:
            state = self._states.setdefault(key.name, _KeyState())
            bucket = state.tokens = state.tokens or _Bucket(
                key.tokens_per_minute, key.tokens_per_minute, now
            )
            bucket.refill(now, key.tokens_per_minute)
            bucket.level -= tokens

    def _release(self, key: ApiKey, code: str) -> None:
        label = self._label(key.name)
        with self._lock:
            state = self._states.get(key.name)
            if state is not None:
                state.in_flight = max(0, state.in_flight - 1)
        self._in_flight.labels(label).dec()
        self._requests.labels(label, code).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def bearer(value: str | None) -> str | None:
    """The key of an ``authorization`` value: ``Bearer <key>`` (or the bare key)."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip() or None
    return value.strip() if not rest else None


def grpc_scope(method: str) -> str:
    """The scope a gRPC method needs: generation, or reading (metadata, tokenize)."""
    name = method.rsplit("/", 1)[-1]
    return "generate" if name in ("Generate", "GenerateStream", "ModelInfer") else "read"
