"""The outbox against a real MLLP receiver (tests/ris_receiver.py): status changes published into
a running BridgeServer (in-process, on its own reactor thread) are written durably before the
publication returns, then delivered in order, retried on AE / a dropped connection / no ACK,
parked after the bound, re-sendable; a receiver that is down gets everything once it is up; a
bridge killed with SIGKILL re-sends every message, with the same MSH-10, after its restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.threads import blockingCallFromThread

from bridge.app.server import BridgeServer
from bridge.app.settings_checks import load_settings
from bridge.config import OutboundReceiver, Settings
from bridge.core.events import StatusChange
from bridge.net.outbox import OutboxFolder, message_facts
from bridge.ops.translation_log import parse_logfmt
from tests.hl7.test_status_message import stored_item
from tests.net.test_tls import make_pki
from tests.peers import eventually, free_port
from tests.ris_receiver import RISReceiver

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0  # seconds: generous, the machine is shared


def receiver_settings(port: int, **fields) -> OutboundReceiver:
    values = dict(name="ris", message="ORM^O01", retry_initial=0.1, retry_max=0.5, max_attempts=3,
                  ack_timeout=2.0) | fields  # fmt: skip
    return OutboundReceiver(host="127.0.0.1", port=port, **values)


class Running:
    def __init__(self, tmp_path: Path, reactor, receivers: list[OutboundReceiver]) -> None:
        self.reactor = reactor
        self.log_path = tmp_path / "translation.log"
        self.settings = Settings(
            host="127.0.0.1",
            mllp_port=free_port(),
            dicom_port=free_port(),
            worklist_dir=tmp_path / "worklists",
            rejected_dir=tmp_path / "rejected",
            translation_log=str(self.log_path),
            outbox_dir=tmp_path / "outbox",
            outbound=receivers,
        )
        self.server = BridgeServer(self.settings, reactor=reactor)
        blockingCallFromThread(reactor, self.server.start)

    @property
    def outbox(self):
        return self.server.outbox

    def publish(self, accession: str, status: str, cause: str = "mpps") -> None:
        item = stored_item(accession=accession, placer=f"P-{accession}", filler=f"F-{accession}")
        event = StatusChange(item=item, old_status="SCHEDULED", new_status=status, cause=cause,
                             performed_start="20261201103000",
                             performing_station="CT01")  # fmt: skip
        blockingCallFromThread(self.reactor, self.server.events.publish, event)

    def call(self, function, *args):
        return blockingCallFromThread(self.reactor, function, *args)

    def records(self, **match) -> list[dict[str, str]]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text("utf-8").splitlines()
        records = [parse_logfmt(line) for line in lines]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def stop(self) -> None:
        if getattr(self, "stopped", False):
            return
        self.stopped = True
        blockingCallFromThread(self.reactor, self.server.stop)
        self.server.translation_log.close()


@pytest.fixture
def start(tmp_path, reactor):
    started = []

    def run(*receivers: OutboundReceiver) -> Running:
        running = Running(tmp_path, reactor, list(receivers))
        started.append(running)
        return running

    yield run
    for running in started:
        running.stop()


def summary(received) -> list[tuple[str, str]]:
    return [(r.field("OBR", 18), r.field("ORC", 5)) for r in received]


def test_started_then_completed_reach_the_ris_in_order(start, ris):
    ris.answer = "silent"  # hold the first one in flight: its file must be on disk already
    bridge = start(receiver_settings(ris.port, ack_timeout=60.0))
    bridge.publish("ACC1", "STARTED")
    files = OutboxFolder(bridge.settings.outbox_dir).pending("ris")
    assert len(files) == 1  # durable before the publication returned
    first_control = message_facts(files[0].read_bytes()).control_id
    ris.wait_for(1, accepted_only=False)
    ris.stop()  # the silent connection closes: a retry, and the RIS is down for a moment
    ris.answer = "AA"
    bridge.publish("ACC1", "COMPLETED")
    ris.start()
    got = ris.wait_for(2)
    assert summary(got) == [("ACC1", "IP"), ("ACC1", "CM")]
    assert got[0].control_id == first_control  # the re-sent message kept its MSH-10
    assert got[0].field("ORC", 1) == "SC"
    assert (got[0].field("ORC", 2), got[0].field("ORC", 3)) == ("P-ACC1", "F-ACC1")
    assert got[0].field("MSH", 12) == "2.3.1"
    sent = eventually(lambda: bridge.records(outcome="sent")[1:] and bridge.records(outcome="sent"),
                      what="two sent lines")  # fmt: skip
    assert bridge.call(bridge.outbox.depth) == 0
    assert [(r["receiver"], r["order_status"], r["accession"]) for r in sent] == [
        ("ris", "IP", "ACC1"),
        ("ris", "CM", "ACC1"),
    ]
    assert sent[0]["control_id"] == first_control and sent[0]["ack"] == "AA"
    assert len(bridge.records(outcome="queued")) == 2


def test_ae_drop_and_silence_are_retried_with_the_same_control_id(start, ris):
    ris.script.extend(["AE", "drop", "silent", "wrong-id"])
    bridge = start(receiver_settings(ris.port, max_attempts=10, ack_timeout=1.0))
    bridge.publish("ACC2", "STARTED")
    got = ris.wait_for(5, accepted_only=False)
    assert [r.answer for r in got] == ["AE", "drop", "silent", "wrong-id", "AA"]
    assert len({r.control_id for r in got}) == 1
    eventually(lambda: bridge.records(outcome="sent"), what="the sent line")
    retrying = bridge.records(outcome="retrying")
    assert [r["attempt"] for r in retrying] == ["1", "2", "3", "4"]
    assert retrying[0]["ack"] == "AE" and "unknown order" in retrying[0]["reason"]
    assert retrying[1]["reason"] == "connection closed before the ACK"
    assert retrying[2]["reason"] == "no ACK within 1 s"
    assert "control ID" in retrying[3]["reason"]
    assert bridge.records(outcome="sent")[0]["attempt"] == "5"


def test_a_parked_message_holds_its_order_but_not_the_others(start, ris):
    ris.answer = "AE"
    bridge = start(receiver_settings(ris.port, max_attempts=3))
    bridge.publish("ACC3", "STARTED")
    parked = eventually(lambda: bridge.records(outcome="parked"), what="parking")
    assert parked[0]["attempt"] == "3" and parked[0]["order_status"] == "IP"
    assert len(ris.received) == 3
    ris.answer = "AA"
    bridge.publish("ACC3", "COMPLETED")  # same order: must wait behind the parked IP
    bridge.publish("ACC4", "STARTED")  # another order: goes
    assert summary(ris.wait_for(1)) == [("ACC4", "IP")]
    entries = eventually(lambda: len(bridge.call(bridge.outbox.list)) == 2
                         and bridge.call(bridge.outbox.list), what="ACC4 leaving")  # fmt: skip
    states = sorted((e.accession, e.order_status, e.state) for e in entries)
    assert states == [("ACC3", "CM", "pending"), ("ACC3", "IP", "parked")]
    parked_entry = next(e for e in entries if e.state == "parked")
    assert "unknown order" in parked_entry.reason
    assert bridge.call(bridge.outbox.depth) == 1
    bridge.call(bridge.outbox.retry, parked_entry.id)
    got = ris.wait_for(3)
    assert summary(got) == [("ACC4", "IP"), ("ACC3", "IP"), ("ACC3", "CM")]
    assert got[1].control_id == parked_entry.control_id
    eventually(lambda: not bridge.call(bridge.outbox.list), what="the outbox emptying")


def test_a_restarted_bridge_goes_on_counting_refusals_toward_parking(start, ris):
    """max-attempts holds across a restart: the counts are kept beside the message, so a
    bridge restarted every night still parks a message its receiver refuses, instead of
    sending it again for ever."""
    ris.answer = "AE"
    receiver = receiver_settings(ris.port, max_attempts=3, retry_initial=2.0, retry_max=4.0)
    first = start(receiver)
    first.publish("ACC9", "STARTED")
    ris.wait_for(2, accepted_only=False)  # refused twice; the third try is 4 s away
    ris.stop()
    first.stop()
    [message] = OutboxFolder(first.settings.outbox_dir).pending("ris")
    assert message.with_suffix(".tries").read_text().split() == ["2", "2"]
    listed = OutboxFolder(first.settings.outbox_dir).entries()  # `wlbridge outbox`, no server
    assert [(e.accession, e.attempts) for e in listed] == [("ACC9", 2)]
    ris.start()
    second = start(receiver)  # the same folders
    parked = eventually(lambda: second.records(outcome="parked"), what="parking")
    assert parked[0]["attempt"] == "3"
    assert len(ris.received) == 3  # one more refusal, not three
    assert not list((first.settings.outbox_dir / "ris").glob("*.tries"))


def test_dropping_a_parked_message_releases_the_ones_it_held(start, ris):
    ris.answer = "AR"
    bridge = start(receiver_settings(ris.port, max_attempts=1))
    bridge.publish("ACC5", "STARTED")
    eventually(lambda: bridge.records(outcome="parked"), what="parking")
    ris.answer = "AA"
    bridge.publish("ACC5", "COMPLETED")
    assert bridge.call(bridge.outbox.depth) == 1 and bridge.call(bridge.outbox.oldest_age) >= 0
    parked = next(e for e in bridge.call(bridge.outbox.list) if e.state == "parked")
    bridge.call(bridge.outbox.drop, parked.id)
    assert summary(ris.wait_for(1)) == [("ACC5", "CM")]


def test_a_ris_that_is_down_gets_everything_once_up_and_nothing_is_parked(start, ris):
    ris.stop()
    bridge = start(receiver_settings(ris.port, max_attempts=1))  # connection failures don't count
    expected = []
    for n in range(4):
        for status, code in (("STARTED", "IP"), ("COMPLETED", "CM")):
            bridge.publish(f"ACC6{n}", status)
            expected.append((f"ACC6{n}", code))
    eventually(lambda: len(bridge.records(outcome="retrying")) >= 3, what="three failed tries")
    assert all("cannot connect" in r["reason"] for r in bridge.records(outcome="retrying"))
    ris.start()
    assert summary(ris.wait_for(8)) == expected
    assert not bridge.records(outcome="parked")
    assert len(ris.received) == 8  # once each


def test_what_is_not_reported(start, ris):
    bridge = start(
        receiver_settings(ris.port),
        receiver_settings(ris.port, name="ris-hk", send_housekeeping=True, message="OMI^O23"),
    )
    bridge.publish("ACC7", "STARTED", cause="hl7")  # the RIS's own change: not echoed
    bridge.publish("ACC7", "SCHEDULED")  # not a status the RIS hears of
    bridge.publish("ACC8", "DISCONTINUED", cause="housekeeping")  # only to ris-hk
    got = ris.wait_for(1)
    assert summary(got) == [("ACC8", "DC")] and got[0].field("MSH", 9).startswith("OMI")
    queued = bridge.records(outcome="queued")
    assert [(r["receiver"], r["accession"]) for r in queued] == [("ris-hk", "ACC8")]


def test_each_receiver_has_its_own_queue(start, ris):
    other = RISReceiver(answer="AE")
    try:
        bridge = start(
            receiver_settings(ris.port, message="OMG^O19"),
            receiver_settings(other.port, name="billing", max_attempts=100),
        )
        bridge.publish("ACC9", "STARTED")
        bridge.publish("ACC9", "COMPLETED")
        got = ris.wait_for(2)  # the refusing receiver does not hold this one back
        assert summary(got) == [("ACC9", "IP"), ("ACC9", "CM")]
        assert got[0].field("MSH", 9) == "OMG^O19^OMG_O19"
        assert other.wait_for(2, accepted_only=False)[0].field("ORC", 5) == "IP"
        assert {r.field("ORC", 5) for r in other.received} == {"IP"}  # CM waits behind IP
    finally:
        other.stop()


def test_over_tls_with_a_client_certificate(start, tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    tls_ris = RISReceiver(tls=context)
    try:
        bridge = start(
            receiver_settings(tls_ris.port, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                              tls_key=str(pki.client_key)),
            receiver_settings(tls_ris.port, name="no-cert", tls_ca=str(pki.ca), max_attempts=1),
        )  # fmt: skip
        bridge.publish("ACC12", "STARTED")
        got = tls_ris.wait_for(1)
        assert summary(got) == [("ACC12", "IP")]

        def refusals():
            found = bridge.records(receiver="no-cert", outcome="retrying")
            return found if len(found) >= 2 else None

        refused = eventually(refusals, what="two refused handshakes")
        assert refused[0]["reason"].startswith("TLS: ") and refused[1]["attempt"] == "2"
        assert not bridge.records(receiver="no-cert", outcome="parked")  # not the message's fault
        assert tls_ris.handshake_failures >= 2 and len(tls_ris.received) == 1
    finally:
        tls_ris.stop()


def test_a_message_that_cannot_be_written_fails_the_publication(start, ris):
    bridge = start(receiver_settings(ris.port))
    folder = bridge.settings.outbox_dir / "ris"
    shutil.rmtree(folder)
    folder.write_text("not a folder")  # every write into it fails
    with pytest.raises(OSError):
        bridge.publish("ACC13", "STARTED")  # the MPPS would then not be answered with success
    assert not bridge.records(outcome="queued")


# ---------------------------------------------------------------------------------------------
# kill -9


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_config(tmp_path: Path, ris_port: int, **extra) -> Path:
    """A config with one receiver; `extra` sets (or overrides) the receiver's settings."""
    config = tmp_path / "wlbridge.toml"
    top = {
        "host": "127.0.0.1",
        "mllp-port": free_port(),
        "dicom-port": free_port(),
        "worklist-dir": str(tmp_path / "worklists"),
        "rejected-dir": str(tmp_path / "rejected"),
        "translation-log": str(tmp_path / "translation.log"),
        "outbox-dir": str(tmp_path / "outbox"),
    }
    receiver = {"name": "ris", "host": "127.0.0.1", "port": ris_port, "message": "OMG^O19",
                "retry-initial": 0.1, "retry-max": 0.5, "ack-timeout": 2.0}  # fmt: skip
    receiver |= {k.replace("_", "-"): v for k, v in extra.items()}
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()] + ["[[outbound]]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in receiver.items()]
    config.write_text("\n".join(lines) + "\n")
    return config


class OutboxProcess:
    def __init__(self, config: Path) -> None:
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.outbox_process", str(config)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.expect("ready")

    def expect(self, line: str) -> None:
        got = self.process.stdout.readline().strip()  # the process answers every command
        assert got == line, f"expected {line!r}, got {got!r}"

    def publish(self, accession: str, status: str) -> None:
        self.process.stdin.write(f"{accession} {status}\n")
        self.process.stdin.flush()
        self.expect(f"queued {accession} {status}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=WAIT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=WAIT)


def queued_control_ids(outbox_dir: Path) -> list[str]:
    folder = OutboxFolder(outbox_dir)
    return [message_facts(p.read_bytes()).control_id for p in folder.pending("ris")]


def test_kill_9_with_the_ris_down_loses_nothing(tmp_path, ris):
    ris.stop()
    config = write_config(tmp_path, ris.port)
    first = OutboxProcess(config)
    expected = []
    try:
        for n in range(3):
            for status, code in (("STARTED", "IP"), ("COMPLETED", "CM")):
                first.publish(f"K{n}", status)
                expected.append((f"K{n}", code))
    finally:
        first.kill()
    control_ids = queued_control_ids(tmp_path / "outbox")
    assert len(control_ids) == 6 and len(set(control_ids)) == 6
    ris.start()
    second = OutboxProcess(config)
    try:
        got = ris.wait_for(6)
        assert summary(got) == expected
        assert [r.control_id for r in got] == control_ids  # the same MSH-10, in order
        eventually(lambda: not queued_control_ids(tmp_path / "outbox"), what="an empty outbox")
    finally:
        second.stop()


def test_kill_9_with_a_message_in_flight_resends_it_with_the_same_control_id(tmp_path, ris):
    ris.answer = "silent"
    config = write_config(tmp_path, ris.port, ack_timeout=60)
    first = OutboxProcess(config)
    try:
        first.publish("M1", "STARTED")
        first.publish("M1", "COMPLETED")
        in_flight = ris.wait_for(1, accepted_only=False)[0]  # received, never acknowledged
    finally:
        first.kill()
    ris.answer = "AA"
    second = OutboxProcess(config)
    try:
        got = ris.wait_for(2)
        assert summary(got) == [("M1", "IP"), ("M1", "CM")]
        assert got[0].control_id == in_flight.control_id
    finally:
        second.stop()


# ---------------------------------------------------------------------------------------------
# `wlbridge outbox` and the settings


def wlbridge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip


def test_the_outbox_command_lists_retries_and_drops(start, ris, tmp_path):
    ris.answer = "AE"
    bridge = start(receiver_settings(ris.port, max_attempts=1))
    bridge.publish("ACC10", "STARTED")
    bridge.publish("ACC11", "STARTED")
    eventually(lambda: len(bridge.records(outcome="parked")) == 2, what="two parked messages")
    outbox_dir = str(bridge.settings.outbox_dir)
    listed = wlbridge("outbox", "list", "--outbox-dir", outbox_dir)
    assert listed.returncode == 0 and "2 message(s), 2 parked" in listed.stdout
    assert listed.stdout.count("parked") == 3 and "accession=ACC10" in listed.stdout
    entries = sorted(bridge.call(bridge.outbox.list), key=lambda e: e.accession)
    ris.answer = "AA"
    retried = wlbridge("outbox", "retry", entries[0].control_id, "--outbox-dir", outbox_dir)
    assert retried.returncode == 0 and f"{entries[0].id}: queued again" in retried.stdout
    assert summary(ris.wait_for(1)) == [("ACC10", "IP")]  # the server's poll picked it up
    dropped = wlbridge("outbox", "drop", entries[1].id, "--outbox-dir", outbox_dir)
    assert dropped.returncode == 0 and "dropped" in dropped.stdout
    unknown = wlbridge("outbox", "drop", "ris/000000000999", "--outbox-dir", outbox_dir)
    assert unknown.returncode == 1 and "no message 'ris/000000000999'" in unknown.stderr
    assert "0 message(s)" in wlbridge("outbox", "list", "--outbox-dir", outbox_dir).stdout


def test_receivers_are_read_from_toml(tmp_path):
    config = write_config(tmp_path, 2576, receiving_application="RIS", send_housekeeping=True)
    settings = load_settings(config)
    (r,) = settings.outbound
    assert (r.name, r.port, r.message, r.receiving_application) == ("ris", 2576, "OMG^O19", "RIS")
    assert r.send_housekeeping is True and r.retry_initial == 0.1 and r.ack_timeout == 2.0
    assert settings.outbox_dir == tmp_path / "outbox"
    assert Settings().outbox_dir == Path("outbox") and Settings().outbound == []


@pytest.mark.parametrize(
    "key,value,sentence",
    [
        ("message", "ORU^R01", "outbound #1 (ris): message must be one of ORM^O01"),
        ("port", 0, "outbound #1 (ris): port must be 1 to 65535"),
        ("colour", "red", "outbound #1 (ris): unknown setting 'colour'"),
        ("charset", "EBCDIC", "outbound #1 (ris): charset 'EBCDIC' is not an HL7 charset"),
        ("max-attempts", 0, "outbound #1 (ris): max-attempts must be at least 1"),
        ("retry-max", 0.01, "retry-max must not be less than retry-initial"),
        ("ack-timeout", "soon", "outbound #1 (ris): ack-timeout must be a number"),
        ("tls-ca", "/nonexistent/ca.pem", "tls-ca '/nonexistent/ca.pem' is not a file"),
        ("name", "../etc", "name must be 1 to 64 letters"),
        ("host", "", "outbound #1 (ris): host is empty"),
    ],
)
def test_a_bad_receiver_is_a_sentence_naming_the_setting(tmp_path, key, value, sentence):
    config = write_config(tmp_path, 2576, **{key: value})
    with pytest.raises(ValueError) as raised:
        load_settings(config)
    assert sentence in str(raised.value)
    served = wlbridge("serve", "--config", str(config))
    assert served.returncode == 2 and sentence in served.stderr and "Traceback" not in served.stderr


def test_two_receivers_with_one_name_are_refused(tmp_path):
    config = write_config(tmp_path, 2576)
    config.write_text(config.read_text() + '[[outbound]]\nname = "ris"\nhost = "h"\nport = 1\n')
    with pytest.raises(ValueError, match="outbound #2 \\(ris\\): name 'ris' is used by two"):
        load_settings(config)


def test_a_certificate_that_does_not_load_is_refused_at_start(tmp_path):
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    config = write_config(tmp_path, 2576, tls_ca=str(garbage))
    with pytest.raises(
        ValueError, match=r"outbound #1 \(ris\): tls-ca, tls-cert or tls-key cannot"
    ):
        load_settings(config)


def test_a_waiting_message_is_never_replaced(tmp_path):
    folder = OutboxFolder(tmp_path)
    (tmp_path / "ris" / "parked").mkdir(parents=True)
    (tmp_path / "ris" / "000000000001.hl7").write_bytes(b"first")
    (tmp_path / "ris" / "parked" / "000000000002.hl7").write_bytes(b"second")
    path = folder.enqueue("ris", b"third")  # a counter that was not prepared starts at 1
    assert path.name == "000000000003.hl7"
    assert (tmp_path / "ris" / "000000000001.hl7").read_bytes() == b"first"
    assert folder.prepare(["ris"]) == [] and folder.enqueue("ris", b"4").name == "000000000004.hl7"
