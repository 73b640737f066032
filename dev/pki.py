"""Certificates for a local control plane: a serving CA, a client CA with an
admin certificate, the service-account signing key, and the aggregation
layer's front-proxy CA with the apiserver's proxy client certificate. Written
as PEM files. ``write_serving_cert`` signs more serving certificates with the
serving CA (the metrics adapter's, which the apiserver verifies)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True, slots=True)
class PKIPaths:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    client_ca_cert: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path  # private, signs service-account tokens
    sa_pub: Path  # public, verifies them
    # The aggregation layer: the apiserver proxies to extension apiservers with
    # this client certificate, and they trust the X-Remote-* headers it sends.
    front_proxy_ca_cert: Path
    front_proxy_client_cert: Path
    front_proxy_client_key: Path
    ca_key: Path  # signs the serving certificates of extension apiservers


FRONT_PROXY_CLIENT_CN = "front-proxy-client"


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    subject: x509.Name,
    *,
    server: bool,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = (
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        if server
        else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def write_serving_cert(
    pki: PKIPaths, name: str, dns_names: list[str], ips: list[str]
) -> tuple[Path, Path]:
    """A serving certificate signed by the cluster CA, written beside it as
    ``<name>.crt`` / ``<name>.key``. Returns (cert, key)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.ca_key}: expected an EC key")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert, key = _leaf((ca_cert, ca_key), _name(name), server=True, sans=sans)
    cert_path, key_path = pki.ca_cert.parent / f"{name}.crt", pki.ca_cert.parent / f"{name}.key"
    write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    write(key_path, _pem_key(key))
    return cert_path, key_path


def pki_paths(directory: Path) -> PKIPaths:
    """Where ``write_pki(directory)`` puts each file."""
    return PKIPaths(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        client_ca_cert=directory / "client-ca.crt",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
        front_proxy_ca_cert=directory / "front-proxy-ca.crt",
        front_proxy_client_cert=directory / "front-proxy-client.crt",
        front_proxy_client_key=directory / "front-proxy-client.key",
        ca_key=directory / "ca.key",
    )


def write_pki(directory: Path) -> PKIPaths:
    """Generate a fresh PKI under ``directory`` (mode 0700)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = pki_paths(directory)
    ca = _ca("autoglm-local-ca")
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    serving = _leaf(ca, _name("kube-apiserver"), server=True, sans=sans)
    client_ca = _ca("autoglm-local-client-ca")
    admin = _leaf(client_ca, _name("admin", "system:masters"), server=False)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    front_proxy_ca = _ca("autoglm-local-front-proxy-ca")
    front_proxy_client = _leaf(front_proxy_ca, _name(FRONT_PROXY_CLIENT_CN), server=False)

    write(paths.ca_cert, ca[0].public_bytes(serialization.Encoding.PEM))
    write(paths.ca_key, _pem_key(ca[1]))
    write(paths.front_proxy_ca_cert, front_proxy_ca[0].public_bytes(serialization.Encoding.PEM))
    write(
        paths.front_proxy_client_cert,
        front_proxy_client[0].public_bytes(serialization.Encoding.PEM),
    )
    write(paths.front_proxy_client_key, _pem_key(front_proxy_client[1]))
    write(paths.serving_cert, serving[0].public_bytes(serialization.Encoding.PEM))
    write(paths.serving_key, _pem_key(serving[1]))
    write(paths.client_ca_cert, client_ca[0].public_bytes(serialization.Encoding.PEM))
    write(paths.admin_cert, admin[0].public_bytes(serialization.Encoding.PEM))
    write(paths.admin_key, _pem_key(admin[1]))
    write(paths.sa_key, _pem_key(sa))
    write(
        paths.sa_pub,
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return paths


def aggregation_layer_args(pki: PKIPaths) -> list[str]:
    """kube-apiserver flags for the aggregation layer (APIServices such as
    custom.metrics.k8s.io served by prometheus-adapter).

    Aggregator routing stays off: with it on, the apiserver dials an address from
    the Service's EndpointSlices, and EndpointSlices may not hold loopback
    addresses, while everything here listens on 127.0.0.0/8. The adapter's
    Service is an ExternalName one instead (``autoglm_dev.addons``), which the
    apiserver dials by name, and there is no kube-proxy that a ClusterIP would need.
    """
    return [
        f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
        f"--proxy-client-key-file={pki.front_proxy_client_key}",
        "--enable-aggregator-routing=false",
    ]
