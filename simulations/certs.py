"""Self-signed TLS certificates and SuperNode authentication keys for a Flower deployment.

A deployment needs three TLS files: a certificate authority (CA) that every SuperNode and
the ``flwr`` CLI trust (``--root-certificates``), and the SuperLink's certificate and key
signed by that CA (``--ssl-certfile``, ``--ssl-keyfile``, with the CA as
``--ssl-ca-certfile``). The server certificate must name every address clients dial in
its subjectAltName (SAN), because TLS clients match the dialled host against the SAN.

SuperNode authentication (``--enable-supernode-auth``) uses one elliptic-curve key pair
per SuperNode in OpenSSH format: the SuperNode signs with the private key
(``--auth-supernode-private-key``) and the operator registers the public key with
``flwr supernode register``. Flower 1.42 accepts only NIST curves there; P-384 is used.

Everything is generated with the ``cryptography`` package, which Flower depends on.
Private keys are written with mode 0600, certificates and public keys with 0644.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import atomic

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
CA_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # start validity a little earlier than now
_TLS_CURVE = ec.SECP256R1()  # P-256, supported by the TLS libraries Flower's clients use
_AUTH_CURVE = ec.SECP384R1()  # P-384, the curve `flwr supernode register --help` names


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a CA certificate and the server certificate and key it signed (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    """Paths of one SuperNode's authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def generate_tls(
    folder: str | os.PathLike,
    *,
    hosts: Sequence[str] = LOOPBACK_HOSTS,
    days: int = DEFAULT_DAYS,
) -> TlsFiles:
    """Create a CA and a server certificate for ``hosts`` in ``folder``; return the paths.

    Each host that parses as an IP address becomes an ``IP`` SAN entry, every other host a
    ``DNS`` entry. The server certificate is valid for ``days`` days from now (minus five
    minutes for clock skew) and carries the serverAuth extended key usage.
    """
    if not hosts:
        raise ValueError("hosts is empty; give the addresses SuperNodes dial, e.g. 127.0.0.1")
    if days < 1:
        raise ValueError(f"days must be at least 1; got {days!r}")
    folder = Path(folder)
    ca_key = ec.generate_private_key(_TLS_CURVE)
    ca_cert = _ca_certificate(ca_key, days=days)
    server_key = ec.generate_private_key(_TLS_CURVE)
    server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts=hosts, days=days)
    files = TlsFiles(folder / CA_FILE, folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE)
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_private(server_key))
    return files


def generate_node_key(folder: str | os.PathLike, name: str) -> NodeKeyFiles:
    """Create the SuperNode key pair ``<name>`` and ``<name>.pub`` in ``folder``.

    Both files use the OpenSSH format that ``ssh-keygen -t ecdsa -b 384`` writes, which is
    what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    read.
    """
    folder = Path(folder)
    key = ec.generate_private_key(_AUTH_CURVE)
    files = NodeKeyFiles(folder / name, folder / f"{name}.pub")
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(files.private_key, private)
    _write_public(files.public_key, public + b"\n")
    return files


def san_entries(cert: x509.Certificate) -> list[str]:
    """Return a certificate's SAN entries as ``IP:<address>`` and ``DNS:<name>`` strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [f"IP:{address}" for address in san.get_values_for_type(x509.IPAddress)]
    names = [f"DNS:{name}" for name in san.get_values_for_type(x509.DNSName)]
    return ips + names


def _ca_certificate(key: ec.EllipticCurvePrivateKey, *, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpfedseg deployment CA")])
    identifier = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _dated_builder(days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(identifier, critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    hosts: Sequence[str],
    days: int,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    ca_identifier = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _dated_builder(days)
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_names(hosts)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_identifier),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def _dated_builder(days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    # Not common.atomic: it gives files the umask's permissions, and a private key must be
    # 0600 from its first byte. The file is created 0600 beside ``path`` and renamed over it.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply when the file already existed
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    # Certificates and public keys are handed to other hosts, so anyone may read them.
    atomic.write_bytes(path, data)
    os.chmod(path, 0o644)
