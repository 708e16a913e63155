"""``gpushare certs``: a self-signed CA and a serving pair for the webhook (local runs and tests).

Writes ``ca.crt`` (the ``caBundle`` of the webhook configurations), ``tls.crt`` and ``tls.key``
(``--tls-cert``/``--tls-key``; the key names of a ``kubernetes.io/tls`` Secret) into ``--out``.
Names that are IP addresses (``127.0.0.1``) become IP SANs: the apiserver checks SANs, never the
common name. The CA's key is not kept: a new pair means a new CA and a new ``caBundle``.
"""

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpushare.core import errors

DEFAULT_DAYS: Final = 365
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
"""Backdate ``notBefore`` so an apiserver whose clock runs a little behind accepts the pair."""


@dataclass(frozen=True)
class Pair:
    """A CA certificate and a serving certificate with its key, all PEM."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``gpushare certs``."""
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--dns",
        metavar="NAME",
        action="append",
        required=True,
        help="a name (or IP address) the webhook is reached by; repeat for more",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )


def run(args: argparse.Namespace) -> int:
    """Write the pair and print where."""
    pair = make(args.dns, days=args.days)
    paths = write(pair, args.out)
    for path in paths:
        print(path)
    return 0


def make(names: list[str], *, days: int = DEFAULT_DAYS) -> Pair:
    """A fresh CA and a serving pair for ``names`` (DNS names or IP addresses)."""
    if not names:
        raise errors.ConfigError("name at least one host the webhook is reached by: --dns NAME")
    if days < 1:
        raise errors.ConfigError(f"--days must be at least 1, got {days}")
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpushare webhook CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(name) for name in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Pair(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write(pair: Pair, out: Path) -> list[Path]:
    """Write ``ca.crt``, ``tls.crt`` and ``tls.key`` (mode 0600) into ``out``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "ca.crt", out / "tls.crt", out / "tls.key"]
        paths[2].touch(mode=0o600)
        paths[2].chmod(0o600)  # also when it existed with wider rights
        for path, data in zip(paths, (pair.ca_pem, pair.cert_pem, pair.key_pem), strict=True):
            path.write_bytes(data)
    except OSError as exc:
        raise errors.ConfigError(f"cannot write the pair into {out}: {exc.strerror}") from exc
    return paths


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
