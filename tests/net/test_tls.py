"""TLS on both listeners, with certificates made by the openssl command for each run: a CA, a
server certificate for localhost/127.0.0.1 and a client certificate. With a CA configured, a
client without a certificate is refused; a client that connects and says nothing must not hold
up anyone else's handshake."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from bridge.net.client import MLLPClient, ack_summary, worklist_query
from tests.conftest import ROOT, RunningBridge, start_bridge
from tests.messages import orm
from tests.peers import require_tool


@dataclass
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, with_certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if with_certificate:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> PKI:
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=wlbridge test CA", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    issued = {}
    for name, extensions in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
        ext = folder / f"{name}.ext"
        ext.write_text(extensions)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(key), "-out", str(csr))  # fmt: skip
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                "-out", str(cert))  # fmt: skip
        issued[name] = (cert, key)
    return PKI(ca, *issued["server"], *issued["client"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_bridge(pki, tmp_path_factory) -> Iterator[RunningBridge]:
    options = []
    for side in ("mllp", "dicom"):
        options += [f"--{side}-tls-cert", str(pki.server_cert), f"--{side}-tls-key",
                    str(pki.server_key), f"--{side}-tls-ca", str(pki.ca)]  # fmt: skip
    running = start_bridge(tmp_path_factory.mktemp("tls"), *options)
    yield running
    assert running.stop() == 0, "".join(running.stderr_lines)


def tls_find(bridge: RunningBridge, context: ssl.SSLContext, timeout: float = 10.0):
    """A C-FIND over TLS: (established, answers)."""
    ae = AE(ae_title="TLS-SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout  # bounds the TLS handshake too
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", bridge.dicom_port, ae_title=bridge.ae_title,
                         tls_args=(context, "localhost"))  # fmt: skip
    if not assoc.is_established:
        return False, []
    answers = []
    try:
        for status, identifier in assoc.send_c_find(
            worklist_query(), ModalityWorklistInformationFind
        ):
            assert status is not None, "no answer to C-FIND"
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
    finally:
        assoc.release()
    return True, answers


def test_order_over_mllp_tls_then_query_over_dicom_tls(tls_bridge, pki):
    message = orm(control_id="TLS-1", accession="ACCTLS1").encode()
    with MLLPClient("localhost", tls_bridge.mllp_port, tls_context=pki.client_context()) as client:
        assert ack_summary(client.send(message))[:2] == ("AA", "TLS-1")
    established, answers = tls_find(tls_bridge, pki.client_context())
    assert established
    assert "ACCTLS1" in [a.AccessionNumber for a in answers]


def test_plain_tcp_gets_nothing_from_the_tls_listeners(tls_bridge):
    with socket.create_connection(("127.0.0.1", tls_bridge.mllp_port), timeout=10) as sock:
        sock.sendall(b"\x0b" + orm(control_id="PLAIN-1").encode() + b"\x1c\r")
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
    assert b"MSA" not in data
    assert "PLAIN-1" not in {r.get("control_id") for r in tls_bridge.log_records()}


def test_mllp_client_without_certificate_is_refused(tls_bridge, pki):
    message = orm(control_id="NOCERT-1").encode()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with MLLPClient(
            "localhost", tls_bridge.mllp_port, tls_context=pki.client_context(False)
        ) as client:
            client.send(message)  # TLS 1.3: the refusal arrives on the first read
    assert "NOCERT-1" not in {r.get("control_id") for r in tls_bridge.log_records()}


def test_dicom_client_without_certificate_is_refused(tls_bridge, pki):
    established, _ = tls_find(tls_bridge, pki.client_context(with_certificate=False))
    assert not established


def test_a_silent_client_does_not_block_other_tls_associations(tls_bridge, pki):
    silent = [socket.create_connection(("127.0.0.1", tls_bridge.dicom_port)) for _ in range(3)]
    try:
        started = time.monotonic()
        established, _ = tls_find(tls_bridge, pki.client_context(), timeout=5)
        assert established
        assert time.monotonic() - started < 3.0
        with MLLPClient("localhost", tls_bridge.mllp_port, tls_context=pki.client_context()):
            pass
    finally:
        for sock in silent:
            sock.close()


def test_replay_over_tls_with_a_client_certificate(tls_bridge, pki, tmp_path):
    kept = tmp_path / "kept" / "20261127T101500000000-TLSREPLAY-0a1b2c3d.hl7"
    kept.parent.mkdir()
    kept.write_bytes(orm(control_id="TLSREPLAY", accession="ACCTLS2").encode())
    kept.with_suffix(".reason").write_text("AE 102 PID^1^5 (fixed since)\n")
    command = [sys.executable, "-m", "bridge", "replay", "--host", "localhost",
               "--port", str(tls_bridge.mllp_port), "--tls-ca", str(pki.ca)]  # fmt: skip
    refused = subprocess.run(
        [*command, str(kept)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert refused.returncode == 2 and kept.exists()  # no client certificate: refused
    command += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    result = subprocess.run(
        [*command, str(kept)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{kept.name}: AA TLSREPLAY" in result.stdout
    assert (kept.parent / "replayed" / kept.name).is_file() and not kept.exists()
    assert (kept.parent / "replayed" / kept.with_suffix(".reason").name).is_file()


def test_send_over_tls_with_a_client_certificate(tls_bridge, pki, tmp_path):
    order = tmp_path / "order.hl7"
    order.write_bytes(orm(control_id="TLSSEND", accession="ACCTLS3").encode())
    command = [sys.executable, "-m", "bridge", "send", "--host", "localhost",
               "--port", str(tls_bridge.mllp_port), "--tls-ca", str(pki.ca),
               "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
               str(order)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "order.hl7: AA TLSSEND" in result.stdout


def tls12_context(pki: PKI, ciphers: str) -> ssl.SSLContext:
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


@pytest.mark.parametrize("port", ["mllp_port", "dicom_port"])
def test_tls_listeners_offer_forward_secret_aead_suites_only(tls_bridge, pki, port):
    address = ("127.0.0.1", getattr(tls_bridge, port))
    # static-RSA key exchange and CBC with SHA-1 MACs: refused
    for weak in ("AES128-SHA", "AES256-SHA256", "ECDHE-RSA-AES128-SHA"):
        with socket.create_connection(address, timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls12_context(pki, weak).wrap_socket(raw, server_hostname="localhost")
    with socket.create_connection(address, timeout=10) as raw:
        context = tls12_context(pki, "ECDHE-RSA-AES128-GCM-SHA256")
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2" and "GCM" in tls.cipher()[0]


def test_a_failed_tls_handshake_on_mllp_gets_a_log_line(tls_bridge, pki):
    with socket.create_connection(("127.0.0.1", tls_bridge.mllp_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls12_context(pki, "AES128-SHA").wrap_socket(raw, server_hostname="localhost")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        refused = [r for r in tls_bridge.log_records() if r.get("outcome") == "connection-refused"]
        if any("TLS failure" in r.get("reason", "") for r in refused):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no log line for the failed handshake: {tls_bridge.log_records()}")
