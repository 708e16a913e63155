"""``gpushare certs`` and the command line of ``gpushare webhook``."""

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gpushare import cli


def test_certs_writes_a_ca_and_a_serving_pair_for_every_name(tmp_path: Path) -> None:
    out = tmp_path / "pair"
    argv = ["certs", "--out", str(out), "--dns", "gpushare-webhook.gpushare-system.svc"]
    assert cli.main([*argv, "--dns", "127.0.0.1"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gpushare-webhook.gpushare-system.svc"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600


def test_certs_needs_a_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.main(["certs", "--out", str(tmp_path)])
    assert "--dns" in capsys.readouterr().err


def test_certs_refuses_a_validity_under_a_day(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["certs", "--out", str(tmp_path), "--dns", "x", "--days", "0"]) == 2
    assert "--days must be at least 1" in capsys.readouterr().err


def test_webhook_refuses_missing_certificate_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [
        "webhook",
        "--tls-cert",
        str(tmp_path / "no.crt"),
        "--tls-key",
        str(tmp_path / "no.key"),
    ]
    assert cli.main(argv) == 2
    assert "is not a readable file (make a pair: gpushare certs)" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "not: [a kubeconfig", "apiVersion: v1\nkind: Config\n"])
def test_webhook_refuses_an_unusable_kubeconfig(
    capsys: pytest.CaptureFixture[str], pair: Path, tmp_path: Path, content: str | None
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_text(content)
    argv = ["webhook", "--tls-cert", str(pair / "tls.crt"), "--tls-key", str(pair / "tls.key")]
    assert cli.main([*argv, "--kubeconfig", str(kubeconfig), "--listen", "127.0.0.1:0"]) == 2
    assert f"cannot use kubeconfig {kubeconfig}" in capsys.readouterr().err
