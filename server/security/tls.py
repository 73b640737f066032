"""TLS for the gRPC and HTTP listeners from a ``kubernetes.io/tls`` Secret mount.

The Secret's ``tls.crt`` and ``tls.key`` (cert-manager writes the same keys,
with ``ca.crt``) are read from files. With a client CA, clients must present
a certificate it signed (mTLS). Rotation needs no restart:

- gRPC uses dynamic server credentials: before each new handshake, gRPC asks
  for the current certificate, and gets new files' contents when their
  ``stat`` changed (a Secret update swaps the ``..data`` symlink);
- HTTP's ``ssl.SSLContext`` loads the new chain in place
  (:meth:`ReloadingTls.maybe_reload`, called every second by the app), which
  applies to every later handshake.

A rotation to files that can't be loaded keeps the old certificate and logs
why. Connections already open keep their session.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str  # PEM chain (tls.crt)
    key: str  # PEM private key (tls.key)
    client_ca: str | None = None  # PEM CA bundle: clients must present a cert it signed

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert, self.key, self.client_ca):
            if path is None:
                continue
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        def load(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        ca = load(self.client_ca) if self.client_ca else None
        return load(self.cert), load(self.key), ca


def check_files(files: TlsFiles) -> None:
    """ValueError naming the flag when the files can't make a server context."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for flag, path in (("tls_cert_file", files.cert), ("tls_key_file", files.key)):
        if not os.path.isfile(path):
            raise ValueError(f"{flag}: {path} does not exist")
    try:
        context.load_cert_chain(files.cert, files.key)
        if files.client_ca:
            context.load_verify_locations(files.client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"tls: cannot load {files.cert} / {files.key}: {exc}") from None


def grpc_credentials(files: TlsFiles) -> Any:
    """Dynamic gRPC server credentials that follow the files."""
    import grpc

    def config() -> Any:
        cert, key, ca = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    seen = [files.stamp()]

    def fetch() -> Any:
        try:
            stamp = files.stamp()
        except OSError:
            return None
        if stamp == seen[0]:
            return None
        seen[0] = stamp
        try:
            check_files(files)
            new = config()
        except Exception as exc:
            logger.error("TLS files changed but cannot be loaded (%s); keeping the old ones", exc)
            return None
        logger.info("TLS certificate reloaded (gRPC)")
        return new

    return grpc.dynamic_ssl_server_credentials(
        config(), fetch, require_client_authentication=files.client_ca is not None
    )


class ReloadingTls:
    """An ``ssl.SSLContext`` for the HTTP listeners that reloads the files in place."""

    def __init__(self, files: TlsFiles) -> None:
        check_files(files)
        self.files = files
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._stamp = files.stamp()
        self.context.load_cert_chain(files.cert, files.key)
        if files.client_ca:
            self.context.load_verify_locations(files.client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED

    def maybe_reload(self) -> bool:
        """Load the files again if they changed; True if they were loaded."""
        try:
            stamp = self.files.stamp()
        except OSError:
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            check_files(self.files)
            self.context.load_cert_chain(self.files.cert, self.files.key)
            if self.files.client_ca:
                self.context.load_verify_locations(self.files.client_ca)
        except ValueError as exc:
            logger.error("TLS files changed but cannot be loaded (%s); keeping the old ones", exc)
            return False
        logger.info("TLS certificate reloaded (HTTP)")
        return True
