"""MLLP framing: split reads, several frames a read, noise, size limit, order of answers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from bridge.net.mllp import END, START, MLLPFactory, frame


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __call__(self, message: bytes, peer: str) -> bytes:
        self.messages.append(message)
        return b"ACK:" + message


def connect(handler, **kwargs):
    factory = MLLPFactory(handler, **kwargs)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return factory, proto, transport


def answers(transport: StringTransport) -> list[bytes]:
    data = transport.value()
    return [part.split(END)[0] for part in data.split(START)[1:]]


def test_one_frame_one_answer_framed():
    handler = Recorder()
    _, proto, transport = connect(handler)
    proto.dataReceived(frame(b"MSH|one"))
    assert handler.messages == [b"MSH|one"]
    assert transport.value() == START + b"ACK:MSH|one" + END + b"\r"


def test_half_frames_across_reads_and_several_frames_in_one_read():
    handler = Recorder()
    _, proto, transport = connect(handler)
    stream = frame(b"MSH|a") + frame(b"MSH|b") + frame(b"MSH|c")
    proto.dataReceived(stream[:3])
    assert handler.messages == []
    proto.dataReceived(stream[3:20])
    proto.dataReceived(stream[20:])
    assert handler.messages == [b"MSH|a", b"MSH|b", b"MSH|c"]
    assert answers(transport) == [b"ACK:MSH|a", b"ACK:MSH|b", b"ACK:MSH|c"]


def test_bytes_outside_frames_are_discarded():
    handler = Recorder()
    _, proto, _ = connect(handler)
    proto.dataReceived(b"noise\r\n" + frame(b"MSH|x") + b"\r\njunk" + frame(b"MSH|y"))
    assert handler.messages == [b"MSH|x", b"MSH|y"]


def test_unfinished_frame_is_dropped_when_a_new_one_starts():
    handler = Recorder()
    _, proto, _ = connect(handler)
    proto.dataReceived(START + b"MSH|truncated" + frame(b"MSH|whole"))
    assert handler.messages == [b"MSH|whole"]


def test_oversized_frame_is_refused_and_connection_closed_without_buffering_it():
    handler = Recorder()
    refused = []

    def on_oversized(head: bytes, peer: str) -> bytes:
        refused.append(head)
        return b"AR"

    _, proto, transport = connect(handler, max_frame_size=1024, on_oversized=on_oversized)
    proto.dataReceived(START + b"MSH|" + b"x" * 2000)
    assert handler.messages == []
    assert refused and refused[0].startswith(b"MSH|")
    assert transport.disconnecting
    assert answers(transport) == [b"AR"]
    proto.dataReceived(b"y" * 5000 + END + b"\r")  # the rest of it is ignored, not held
    assert len(proto._buffer) == 0
    assert handler.messages == []


def test_asynchronous_answers_keep_the_order_of_messages():
    pending: list[defer.Deferred] = []

    def handler(message: bytes, peer: str) -> defer.Deferred:
        d = defer.Deferred()
        d.addCallback(lambda _: b"ACK:" + message)
        pending.append(d)
        return d

    _, proto, transport = connect(handler)
    proto.dataReceived(frame(b"1") + frame(b"2"))
    assert len(pending) == 1  # the second waits for the first answer
    pending[0].callback(None)
    assert len(pending) == 2
    pending[1].callback(None)
    assert answers(transport) == [b"ACK:1", b"ACK:2"]


def test_connection_limit_and_source_allow_list():
    class Addr:
        def __init__(self, host):
            self.host = host

    factory = MLLPFactory(Recorder(), max_connections=1, allowed_sources=["127.0.0.1"])
    assert factory.buildProtocol(Addr("10.9.9.9")) is None
    first = factory.buildProtocol(Addr("127.0.0.1"))
    assert first is not None
    assert factory.buildProtocol(Addr("127.0.0.1")) is None
    first.makeConnection(StringTransport())
    first.connectionLost(None)
    assert factory.buildProtocol(Addr("127.0.0.1")) is not None


def test_idle_connection_is_closed():
    from twisted.internet.task import Clock

    factory = MLLPFactory(Recorder(), idle_timeout=5)
    proto = factory.buildProtocol(None)
    clock = Clock()
    proto.callLater = clock.callLater
    transport = StringTransport()
    proto.makeConnection(transport)
    clock.advance(4)
    proto.dataReceived(b"x")
    clock.advance(4)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


payloads = st.lists(
    st.binary(max_size=200).map(lambda b: b.replace(START, b"").replace(END, b"")),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(payloads, st.lists(st.integers(min_value=1, max_value=50), max_size=20))
def test_any_split_of_the_stream_gives_the_same_messages(messages, cuts):
    handler = Recorder()
    _, proto, _ = connect(handler)
    stream = b"".join(frame(m) for m in messages)
    pos = 0
    for cut in cuts:
        proto.dataReceived(stream[pos : pos + cut])
        pos += cut
    proto.dataReceived(stream[pos:])
    assert handler.messages == messages


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise_and_never_exceed_the_limit(data):
    handler = Recorder()
    _, proto, _ = connect(handler, max_frame_size=1024)
    proto.dataReceived(data)
    assert len(proto._buffer) <= 1024
    assert all(len(m) <= 1024 for m in handler.messages)


def test_unfinished_frames_are_reported_when_dropped():
    dropped = []
    factory = MLLPFactory(
        Recorder(), on_dropped=lambda head, peer, why: dropped.append((head, why))
    )
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(START + b"MSH|first" + frame(b"MSH|second"))
    proto.dataReceived(START + b"MSH|cut short")
    proto.connectionLost(None)
    assert [head for head, _ in dropped] == [b"MSH|first", b"MSH|cut short"]
    assert "closed" in dropped[1][1]


class Addr:
    def __init__(self, host: str, port: int = 4000) -> None:
        self.host, self.port = host, port


def clocked(handler, **kwargs):
    from twisted.internet.task import Clock

    clock = Clock()
    factory = MLLPFactory(handler, clock=clock, idle_timeout=None, **kwargs)
    proto = factory.buildProtocol(Addr("10.1.1.1"))
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, proto, transport


def test_a_frame_trickled_a_byte_a_second_is_cut_at_the_frame_timeout():
    handler, dropped = Recorder(), []
    clock, proto, transport = clocked(
        handler, frame_timeout=30, on_dropped=lambda head, peer, why: dropped.append(why)
    )
    proto.dataReceived(START)
    for byte in b"MSH|^~\\&|SLOW|" * 2:  # 28 bytes, one a second: traffic, but no end
        clock.advance(1)
        proto.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    clock.advance(2.5)
    assert transport.disconnecting and handler.messages == []
    assert len(dropped) == 1 and "frame timeout of 30 s" in dropped[0]
    proto.dataReceived(END + b"\r")  # what arrives after the cut is not handled
    assert handler.messages == [] and transport.value() == b""


def test_frames_that_end_in_time_keep_the_connection_open():
    handler = Recorder()
    clock, proto, transport = clocked(handler, frame_timeout=5)
    for n in range(10):
        proto.dataReceived(START + b"MSH|" + str(n).encode())
        clock.advance(4)
        proto.dataReceived(END + b"\r")
        clock.advance(60)  # between frames only the idle timeout counts (off here)
    assert len(handler.messages) == 10 and not transport.disconnecting


def test_only_a_frame_that_goes_on_past_its_read_is_timed():
    handler, dropped = Recorder(), []
    clock, proto, transport = clocked(
        handler, frame_timeout=5, on_dropped=lambda head, peer, why: dropped.append(why)
    )
    proto.dataReceived(START + b"MSH|1" + END + b"\r")  # whole in one read: nothing to time
    assert clock.getDelayedCalls() == [] and len(handler.messages) == 1
    # a frame dropped for a new one that then goes on: the new one is timed from this read
    proto.dataReceived(START + b"MSH|2" + START + b"MSH|3")
    assert len(clock.getDelayedCalls()) == 1 and "a new frame began" in dropped[0]
    clock.advance(4)
    proto.dataReceived(b"more")  # its next read does not restart its timer
    clock.advance(1.5)
    assert transport.disconnecting and len(handler.messages) == 1
    assert "frame timeout of 5 s" in dropped[1]


def test_per_source_connection_limit_and_refusals_are_reported():
    refused = []
    factory = MLLPFactory(
        Recorder(), max_connections_per_source=2, on_refused=lambda p, w: refused.append((p, w))
    )
    first, second = (factory.buildProtocol(Addr("10.0.0.5", 4000 + n)) for n in range(2))
    assert first is not None and second is not None
    assert factory.buildProtocol(Addr("10.0.0.5", 4002)) is None
    assert refused == [("10.0.0.5:4002", "2 connections open from this address "
                                         "(max-connections-per-source)")]  # fmt: skip
    assert factory.buildProtocol(Addr("10.0.0.6")) is not None  # another source: its own share
    first.makeConnection(StringTransport())
    first.connectionLost(None)
    assert factory.buildProtocol(Addr("10.0.0.5", 4003)) is not None
    allow = MLLPFactory(
        Recorder(), allowed_sources=["127.0.0.1"], on_refused=lambda p, w: refused.append((p, w))
    )  # noqa: E501
    assert allow.buildProtocol(Addr("10.9.9.9", 1)) is None
    assert refused[-1] == ("10.9.9.9:1", "not in the allowed sources")


def client_hello() -> bytes:
    import ssl

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_a_tls_handshake_on_the_plain_port_is_refused_as_such_not_handled():
    handler, refused = Recorder(), []
    hello = client_hello()
    assert hello[:2] == b"\x16\x03"
    # A ClientHello holding VT and FS bytes, as its random bytes may: still not a message.
    hello = hello[:60] + START + b"MSH|" + END + b"\r" + hello[60:]
    factory = MLLPFactory(handler, on_refused=lambda p, w: refused.append(w))
    proto = factory.buildProtocol(Addr("10.2.2.2"))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(hello)
    assert handler.messages == [] and transport.disconnecting
    assert refused == ["a TLS handshake on the plain MLLP port"]


def test_no_frame_is_handled_once_the_connection_is_closing():
    handler = Recorder()
    _, proto, transport = connect(handler)
    proto.dataReceived(frame(b"MSH|before"))
    transport.loseConnection()
    proto.dataReceived(frame(b"MSH|after") + frame(b"MSH|after2"))
    assert handler.messages == [b"MSH|before"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=4), st.binary(min_size=1, max_size=5)
                          .map(lambda b: b.replace(START, b"").replace(END, b"") or b"x")),
                min_size=1, max_size=12))  # fmt: skip
def test_a_frame_is_handled_if_and_only_if_it_ends_within_the_frame_timeout(pieces):
    handler = Recorder()
    clock, proto, transport = clocked(handler, frame_timeout=10)
    proto.dataReceived(START)
    elapsed = 0.0
    for delay, chunk in pieces:
        clock.advance(delay)
        elapsed += delay
        proto.dataReceived(chunk)
    proto.dataReceived(END + b"\r")
    in_time = elapsed < 10
    assert (handler.messages == [b"".join(c for _, c in pieces)]) == in_time
    assert transport.disconnecting == (not in_time)
