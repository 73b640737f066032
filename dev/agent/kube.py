"""The node agent's only door to the API server: a small asyncio client.

It reads a kubeconfig (embedded client certificate and CA, or a token), and
offers JSON requests, list-then-watch streams and the few writes a kubelet
makes. HTTP errors become :class:`KubeError` with the status code; a 404 on a
read or a delete is "absent", a 409 on a create is "exists".
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import yaml

log = logging.getLogger(__name__)

Json = dict[str, Any]


class KubeError(Exception):
    """An API request failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class WatchExpired(KubeError):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def _write_secret(path: Path, data: str) -> Path:
    path.write_bytes(base64.b64decode(data))
    path.chmod(0o600)
    return path


def load_kubeconfig(kubeconfig: Path, certdir: Path) -> tuple[str, ssl.SSLContext, str | None]:
    """(server URL, TLS context, bearer token) of the current context."""
    config = yaml.safe_load(kubeconfig.read_text())
    ctx_name = config.get("current-context")
    contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
    context = contexts[ctx_name] if ctx_name in contexts else next(iter(contexts.values()))
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config.get("users") or []}.get(context.get("user"), {})
    certdir.mkdir(parents=True, exist_ok=True)
    certdir.chmod(0o700)
    tls = ssl.create_default_context()
    if "certificate-authority-data" in cluster:
        tls.load_verify_locations(
            cafile=str(_write_secret(certdir / "ca.crt", cluster["certificate-authority-data"]))
        )
    elif "certificate-authority" in cluster:
        tls.load_verify_locations(cafile=cluster["certificate-authority"])
    if cluster.get("insecure-skip-tls-verify"):
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    if "client-certificate-data" in user:
        cert = _write_secret(certdir / "client.crt", user["client-certificate-data"])
        key = _write_secret(certdir / "client.key", user["client-key-data"])
        tls.load_cert_chain(str(cert), str(key))
    elif "client-certificate" in user:
        tls.load_cert_chain(user["client-certificate"], user["client-key"])
    return str(cluster["server"]).rstrip("/"), tls, user.get("token")


class KubeClient:
    """JSON over HTTPS to the API server, with one connection pool."""

    def __init__(self, server: str, tls: ssl.SSLContext, token: str | None = None) -> None:
        self.server = server
        self._tls = tls
        self._headers = {"Accept": "application/json", "User-Agent": "autoglm-node-agent"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path, certdir: Path) -> KubeClient:
        return cls(*load_kubeconfig(kubeconfig, certdir))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=16),
                headers=self._headers,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
    ) -> Json:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with self._http().request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise KubeError(resp.status, _message(text))
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, f"{method} {path}: {exc!r}") from exc

    async def get(self, path: str, params: dict[str, str] | None = None) -> Json | None:
        try:
            return await self.request("GET", path, params=params)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Json) -> Json | None:
        """POST; None when it already exists."""
        try:
            return await self.request("POST", path, body=body)
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def merge_patch(self, path: str, body: Json) -> Json:
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str, body: Json | None = None) -> bool:
        """DELETE; False when it was already gone."""
        try:
            await self.request("DELETE", path, body=body)
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def watch(
        self, path: str, params: dict[str, str], resource_version: str
    ) -> AsyncIterator[Json]:
        """The events of one watch request, until the server ends it.

        Raises WatchExpired when ``resource_version`` is too old.
        """
        query = {
            **params,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "240",
        }
        url = f"{self.server}{path}?{urlencode(query)}"
        try:
            async with self._http().get(
                url, timeout=aiohttp.ClientTimeout(total=None, sock_read=300)
            ) as resp:
                if resp.status == 410:
                    raise WatchExpired(410, "resourceVersion too old")
                if resp.status >= 400:
                    raise KubeError(resp.status, _message(await resp.text()))
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event: Json = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        if status.get("code") == 410:
                            raise WatchExpired(410, str(status.get("message", "")))
                        raise KubeError(int(status.get("code", 0)), str(status.get("message")))
                    yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, f"watch {path}: {exc!r}") from exc


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return text[:500]


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
    return f"{path}/{sub}" if sub else path
