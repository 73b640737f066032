"""Issue 11, server side, against real server processes: API keys on gRPC and HTTP
(codes per case), per-key limits, keys rotated without a restart, TLS with mTLS
and certificate rotation, signed models, and no prompt or output text in the log."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2, status_pb2
from server_helpers import ServerProcess, serving

from autoglm_server.client import AutoGLMClient

KEYS = {
    "keys": [
        {"name": "full", "key": "k-full", "scopes": ["generate", "read", "metrics"]},
        {"name": "reader", "key": "k-reader", "scopes": ["read"]},
        {"name": "rpm", "key": "k-rpm", "requests_per_minute": 2},
        {"name": "tpm", "key": "k-tpm", "tokens_per_minute": 2},
        {"name": "conc", "key": "k-conc", "max_concurrency": 1},
    ]
}


def _write_keys(path: Path, doc: dict[str, Any]) -> None:
    """Replace the file as a Secret update does (a new inode, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def secured(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    workdir = tmp_path_factory.mktemp("secured")
    keys = workdir / "keys.json"
    _write_keys(keys, KEYS)
    proc = ServerProcess(
        tiny_model, workdir, "--served-model-name", "tiny", "--api-keys-file", str(keys),
        "--log-level", "debug", "--http-max-body-bytes", "65536",
    )  # fmt: skip
    with serving(proc):
        yield proc, keys


def _grpc_code(proc: ServerProcess, key: str | None, method: str = "generate") -> str:
    with AutoGLMClient(proc.target, timeout=60, api_key=key) as client:
        try:
            if method == "generate":
                client.generate("Hi", max_new_tokens=2, ignore_eos=True)
            else:
                client.model_info()
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def _http(proc: ServerProcess, key: str | None, path: str = "/v1/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if path == "/v1/completions":
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
        return proc.http.post(path, json=body, headers=headers)
    return proc.http.get(path, headers=headers)


def test_auth_cases_and_their_codes(secured: tuple[ServerProcess, Path]) -> None:
    proc, _ = secured
    assert _grpc_code(proc, None) == "UNAUTHENTICATED"
    assert _grpc_code(proc, "wrong") == "UNAUTHENTICATED"
    assert _grpc_code(proc, "k-reader") == "PERMISSION_DENIED"
    assert _grpc_code(proc, "k-reader", "info") == "OK"
    assert _grpc_code(proc, "k-full") == "OK"
    assert proc.health() == "SERVING"  # health is open
    none = _http(proc, None)
    assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Bearer")
    assert none.json()["error"]["type"] == "authentication_error"
    assert _http(proc, "wrong").status_code == 401
    assert _http(proc, "k-reader").status_code == 403
    assert _http(proc, "k-reader", "/v1/models").status_code == 200
    assert _http(proc, "k-full").status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert _http(proc, None, open_path).status_code == 200, open_path
    assert proc.metric("autoglm_api_key_requests_total", key="full", code="OK") >= 2
    assert (
        proc.metric("autoglm_api_key_requests_total", key="reader", code="PERMISSION_DENIED") == 2
    )
    assert proc.metric("autoglm_requests_total", code="UNAUTHENTICATED") >= 4


def test_the_autoglm_command_sends_the_key(secured: tuple[ServerProcess, Path]) -> None:
    proc, _ = secured
    base = [sys.executable, "-m", "autoglm_server.client", "--target", proc.target]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env.pop("AUTOGLM_API_KEY", None)
    refused = subprocess.run([*base, "info"], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    ok = subprocess.run(
        [*base, "info"], capture_output=True, text=True, timeout=60,
        env={**env, "AUTOGLM_API_KEY": "k-reader"},
    )  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "tiny"


def test_limits_and_their_effect(secured: tuple[ServerProcess, Path]) -> None:
    proc, _ = secured
    # requests per minute: 2, then 429 / RESOURCE_EXHAUSTED with a retry hint
    assert _http(proc, "k-rpm").status_code == 200
    assert _grpc_code(proc, "k-rpm") == "OK"
    refused = _http(proc, "k-rpm")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "requests_per_minute" in refused.json()["error"]["message"]
    with AutoGLMClient(proc.target, timeout=60, api_key="k-rpm") as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("Hi", max_new_tokens=1)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(info.value.trailing_metadata() or ())
        assert float(trailers["retry-after"]) > 0
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        retry = error_details_pb2.RetryInfo()
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert status.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() > 0
    # tokens per minute: 2; the first request (prompt + 2 tokens > 2) puts the bucket in debt
    assert _http(proc, "k-tpm").status_code == 200
    refused = _http(proc, "k-tpm")
    assert refused.status_code == 429 and "tokens_per_minute" in refused.json()["error"]["message"]
    assert proc.metric("autoglm_api_key_tokens_total", key="tpm") > 2
    # concurrency: 1 stream open, the second request is refused
    with AutoGLMClient(proc.target, timeout=60, api_key="k-conc") as client:
        stream = client.generate_stream("Hi", max_new_tokens=1500, ignore_eos=True)
        next(stream)
        assert _http(proc, "k-conc").status_code == 429
        stream.close()
    assert (
        proc.metric("autoglm_api_key_rate_limited_total", key="conc", limit="max_concurrency") == 1
    )


def test_keys_rotate_without_a_restart(secured: tuple[ServerProcess, Path]) -> None:
    proc, keys = secured
    assert _http(proc, "k-new").status_code == 401
    rotated = {"keys": [*KEYS["keys"][1:], {"name": "full", "key": "k-new"}]}
    _write_keys(keys, rotated)
    assert _http(proc, "k-new").status_code == 200
    assert _http(proc, "k-full").status_code == 401
    _write_keys(keys, {"keys": "broken"})  # a bad file keeps the last keys
    assert _http(proc, "k-new").status_code == 200
    _write_keys(keys, KEYS)
    assert _http(proc, "k-full").status_code == 200


def test_body_cap(secured: tuple[ServerProcess, Path]) -> None:
    proc, _ = secured
    big = {"model": "tiny", "prompt": "x" * 70000, "max_tokens": 1}
    resp = proc.http.post("/v1/completions", json=big, headers={"Authorization": "Bearer k-full"})
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "body"


def test_no_prompt_or_output_text_in_the_log(secured: tuple[ServerProcess, Path]) -> None:
    """Debug logging on; a unique marker goes in through every API and must appear nowhere."""
    proc, _ = secured
    marker = f"MARKER{uuid.uuid4().hex}"
    auth = {"Authorization": "Bearer k-full"}
    proc.http.post(
        "/v1/completions", json={"model": "tiny", "prompt": marker, "max_tokens": 3}, headers=auth
    )
    proc.http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": marker}], "max_tokens": 3},
        headers=auth,
    )
    proc.http.post(
        "/v1/completions", json={"model": "tiny", "prompt": marker, "max_tokens": -1}, headers=auth
    )
    proc.http.post("/v1/completions", json={"model": marker, "prompt": marker}, headers=auth)
    with AutoGLMClient(proc.target, timeout=60, api_key="k-full") as client:
        client.generate(marker, max_new_tokens=3)
        out = client.generate(messages=[("user", marker)], max_new_tokens=3).text
        with pytest.raises(grpc.RpcError):
            client.generate(marker, max_new_tokens=0)
    assert _grpc_code(proc, marker) == "UNAUTHENTICATED"  # the key text is not logged either
    log = proc.log()
    assert "DEBUG" in log  # debug lines were written
    assert marker not in log
    if len(out) > 8:
        assert out not in log


# --------------------------------------------------------------------------- TLS


def _cert(
    name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _install(dir_: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    for name, data in (("tls.crt", _pem(cert)), ("tls.key", _key_pem(key))):
        (dir_ / f"{name}.tmp").write_bytes(data)
        os.replace(dir_ / f"{name}.tmp", dir_ / name)


def test_tls_with_mtls_and_rotation(start_server: Any, tmp_path: Path) -> None:
    ca = _cert("test-ca", None, ca=True)
    server_cert = _cert("server-1", ca, ca=False)
    client_cert = _cert("client", ca, ca=False)
    (tmp_path / "ca.crt").write_bytes(_pem(ca[0]))
    _install(tmp_path, *server_cert)
    proc = start_server(
        "--tls-cert-file", str(tmp_path / "tls.crt"), "--tls-key-file", str(tmp_path / "tls.key"),
        "--tls-client-ca-file", str(tmp_path / "ca.crt"),
    )  # fmt: skip
    # Probes: the plain metrics port answers /readyz while the API ports need client certs.
    deadline = time.monotonic() + 120
    while True:
        try:
            if (
                httpx.get(f"http://127.0.0.1:{proc.metrics_port}/readyz", timeout=5).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            pass
        assert proc.proc.poll() is None, proc.log()[-3000:]
        assert time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.2)
    mtls = dict(
        root_certificates=_pem(ca[0]),
        certificate_chain=_pem(client_cert[0]),
        private_key=_key_pem(client_cert[1]),
    )
    with AutoGLMClient(proc.target, timeout=60, **mtls) as client:  # type: ignore[arg-type]
        assert client.generate("Hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
    no_cert = AutoGLMClient(proc.target, timeout=10, root_certificates=_pem(ca[0]))
    with no_cert as client, pytest.raises(grpc.RpcError):  # no client certificate
        client.model_info()
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    (tmp_path / "client.crt").write_bytes(_pem(client_cert[0]))
    (tmp_path / "client.key").write_bytes(_key_pem(client_cert[1]))
    ctx.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
    url = f"https://127.0.0.1:{proc.http_port}"
    assert httpx.get(f"{url}/v1/models", verify=ctx, timeout=10).status_code == 200
    bare = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v1/models", verify=bare, timeout=10).raise_for_status()
    # Rotation: a new server certificate is served to new connections, no restart.
    _install(tmp_path, *_cert("server-2", ca, ca=False))

    def served_cn() -> str:
        with (
            socket.create_connection(("127.0.0.1", proc.http_port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    deadline = time.monotonic() + 30
    while served_cn() != "server-2":
        assert time.monotonic() < deadline, "the HTTP listener kept the old certificate"
        time.sleep(0.2)
    with AutoGLMClient(proc.target, timeout=60, **mtls) as client:  # type: ignore[arg-type]
        assert client.health() == "SERVING"


# --------------------------------------------------------------------------- signed models


def test_signed_model_loads_and_a_tampered_one_is_refused(
    tiny_model: Path, start_server: Any, tmp_path: Path
) -> None:
    from model_signing import hashing, signing

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "priv.pem").write_bytes(_key_pem(key))
    (tmp_path / "pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    sig = model / "model.sig"
    signing.Config().use_elliptic_key_signer(private_key=tmp_path / "priv.pem").set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[sig])
    ).sign(model, sig)
    flags = ("--model-signing-public-key", str(tmp_path / "pub.pem"))
    good = start_server(*flags, model=model)
    good.wait_serving()
    assert "model signature verified" in good.log()
    good.stop()
    weights = next(model.glob("*.safetensors"))
    with weights.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    bad = start_server(*flags, model=model)
    assert bad.proc.wait(timeout=120) == 2
    line = next(x for x in bad.log().splitlines() if "model load failed" in x)
    assert "does not verify" in line and "Hash mismatch" in line and weights.name in line
    sig.unlink()
    missing = start_server(*flags, model=model)
    assert missing.proc.wait(timeout=120) == 2
    assert f"{sig} is missing" in missing.log()
