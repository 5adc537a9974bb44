"""TLS to PostgreSQL for real: a throwaway CA, a server certificate it signed, and a
PostgreSQL (the embedded package's binaries) that accepts only TLS connections.

verify-full must succeed with the right CA and host name and fail, as a chatkeep error,
with a wrong CA or a host name the certificate does not name.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatkeep.config import Settings
from chatkeep.embedded import embedded_postgres_bin_dir
from chatkeep.errors import ConfigurationError
from chatkeep.storage.database import connect
from chatkeep.storage.security import connection_failures, reset_connection_failures
from tests.servers import free_port

# The embedded package refuses to run PostgreSQL as root, and so does PostgreSQL; it makes
# this system user for the purpose, and so do we when the tests run as root.
SERVER_USER = "embedded_postgres"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, dns_name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        # The name clients check; deliberately no IP address, so 127.0.0.1 does not match.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca_file: Path
    wrong_ca_file: Path
    host_name: str

    def url(self, host: str | None = None, sslmode: str | None = None) -> str:
        query = f"?sslmode={sslmode}" if sslmode else ""
        return f"postgresql://postgres@{host or self.host_name}:{self.port}/postgres{query}"


def server_bin_dirs() -> list[Path]:
    """PostgreSQL builds to try, newest first: the machine's own (Debian's are built with
    OpenSSL), then the embedded package's (built without SSL support today)."""
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    embedded = embedded_postgres_bin_dir()
    return [*system, *([embedded] if embedded else [])]


def start_tls_server(bin_dir: Path, base: Path, run_as: dict[str, Any]) -> int | None:
    """Start a TLS-only server from ``bin_dir`` in ``base``; its port, or None if the build
    has no SSL support."""
    data = base / "data"
    ca_key, ca_cert = make_ca("chatkeep test CA")
    _, wrong_ca = make_ca("someone else's CA")
    server_key, server_cert = make_server_cert(ca_key, ca_cert, "localhost")
    (base / "ca.pem").write_bytes(pem_cert(ca_cert))
    (base / "wrong-ca.pem").write_bytes(pem_cert(wrong_ca))
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        **run_as,
    )
    (data / "server.crt").write_bytes(pem_cert(server_cert))
    (data / "server.key").write_bytes(pem_key(server_key))
    (data / "server.key").chmod(0o600)
    # TLS or nothing over TCP: a plaintext connection has no pg_hba line to match.
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        encoding="utf-8",
    )
    if run_as:
        for path in (data / "server.crt", data / "server.key", data / "pg_hba.conf"):
            shutil.chown(path, SERVER_USER, SERVER_USER)
    port = free_port()
    log = base / "log"
    started = subprocess.run(
        [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-t",
            "60",
            "-l",
            str(log),
            "-o",
            f"-c ssl=on -c listen_addresses=localhost -p {port} -k {base}",
            "start",
        ],
        check=False,
        capture_output=True,
        **run_as,
    )
    if started.returncode != 0:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        if "SSL is not supported by this build" in text:
            return None
        raise AssertionError(f"the TLS test server did not start: {text[-2000:]}")
    return port


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(SERVER_USER)
        run_as = {"user": SERVER_USER}
    for bin_dir in server_bin_dirs():
        # Not under pytest's tmp_path: its root-only parent folders would keep the
        # server's user out.
        base = Path(tempfile.mkdtemp(prefix="chatkeep-tls-"))
        base.chmod(0o755)
        if run_as:
            shutil.chown(base, SERVER_USER)
        try:
            port = start_tls_server(bin_dir, base, run_as)
            if port is None:
                continue
            try:
                yield TlsServer(port, base / "ca.pem", base / "wrong-ca.pem", "localhost")
            finally:
                subprocess.run(
                    [str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "stop"],
                    check=False,
                    capture_output=True,
                    **run_as,
                )
            return
        finally:
            shutil.rmtree(base, ignore_errors=True)
    pytest.skip("no PostgreSQL build with SSL support on this machine (tried /usr/lib/postgresql)")


def settings(mode: str, ca_file: Path | None) -> Settings:
    return Settings(ssl_mode=mode, ssl_ca_file=ca_file, connect_timeout=10)


async def test_verify_full_with_the_right_ca_and_host(tls_server: TlsServer) -> None:
    conn = await connect(tls_server.url(), settings("verify-full", tls_server.ca_file))
    try:
        row = await conn.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert row is not None
        assert row["ssl"] is True
        assert row["version"].startswith("TLSv1.")
    finally:
        await conn.close()


async def test_verify_full_refuses_a_certificate_from_another_ca(tls_server: TlsServer) -> None:
    reset_connection_failures()
    with pytest.raises(ConfigurationError) as caught:
        await connect(tls_server.url(), settings("verify-full", tls_server.wrong_ca_file))
    assert caught.value.field == "ssl_ca_file"
    assert "unable to get local issuer certificate" in str(caught.value)
    [failure] = connection_failures()
    assert (failure.host, failure.role, failure.count) == (
        f"localhost:{tls_server.port}",
        "postgres",
        1,
    )
    assert failure.reason.startswith("TLS certificate verification failed")


async def test_verify_full_refuses_a_host_name_the_certificate_does_not_name(
    tls_server: TlsServer,
) -> None:
    with pytest.raises(ConfigurationError, match="mismatch, certificate is not valid") as caught:
        await connect(tls_server.url("127.0.0.1"), settings("verify-full", tls_server.ca_file))
    assert caught.value.field == "ssl_ca_file"


async def test_verify_ca_checks_the_chain_but_not_the_name(tls_server: TlsServer) -> None:
    conn = await connect(tls_server.url("127.0.0.1"), settings("verify-ca", tls_server.ca_file))
    await conn.close()
    with pytest.raises(ConfigurationError):
        await connect(tls_server.url("127.0.0.1"), settings("verify-ca", tls_server.wrong_ca_file))


async def test_plaintext_is_refused_by_the_server(tls_server: TlsServer) -> None:
    with pytest.raises(ConfigurationError, match="refused the credentials"):
        await connect(tls_server.url(sslmode="disable"), Settings())
