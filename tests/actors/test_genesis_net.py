"""pd-genesis's real adapter (actors/io/genesis_net.py) over real loopback sockets.

The adapter is driven directly: requests submitted with an answer callback, inputs
collected through ``attach``.  Peers are plain blocking sockets (a well-behaved
client, a garbage sender, a half-open or non-reading one) or a second adapter.
Every adapter and socket made here is closed by the fixtures, even when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from actors.io import genesis_net
from actors.io.genesis_net import GenesisNet
from actors.pds.base import IoFailure, IoInput, IoRequest, IoResult
from actors.pds.genesis_io import (
    MAX_READ,
    Accepted,
    CloseConn,
    Closed,
    Connect,
    Entropy,
    Listen,
    Received,
    SendBytes,
    StopListening,
)

HOST = "127.0.0.1"
WAIT = 5.0
_ids = itertools.count(1)


class Peer:
    """One adapter, everything it said (answers and inputs, in the order delivered)."""

    def __init__(self, net: GenesisNet) -> None:
        self.net = net
        self.said: list[Any] = []
        self.cond = threading.Condition()
        net.attach(self._record)

    def _record(self, item: Any) -> None:
        with self.cond:
            self.said.append(item)
            self.cond.notify_all()

    def submit(self, request: IoRequest) -> None:
        self.net.submit(request, self._record)

    def ask(self, request: IoRequest, timeout: float = WAIT) -> IoResult | IoFailure:
        self.submit(request)
        got: IoResult | IoFailure = self.wait(lambda: self.answer(request.request_id), timeout)
        return got

    def ok(self, request: IoRequest) -> Any:
        got = self.ask(request)
        assert isinstance(got, IoResult), got
        return got.value

    def answer(self, request_id: int) -> IoResult | IoFailure | None:
        for item in self.said:
            if isinstance(item, (IoResult, IoFailure)) and item.request_id == request_id:
                return item
        return None

    def inputs(self, kind: type[IoInput] = IoInput, conn: int | None = None) -> list[Any]:
        with self.cond:
            return [i for i in self.said if isinstance(i, kind)
                    and (conn is None or getattr(i, "conn", None) == conn)]

    def data(self, conn: int) -> bytes:
        return b"".join(r.data for r in self.inputs(Received, conn))

    def wait(self, what: Callable[[], Any], timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = what()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; said: {self.said[-5:]!r}")
                self.cond.wait(min(left, 0.05))

    def accepted(self, count: int = 1) -> list[Accepted]:
        return self.wait(lambda: (a := self.inputs(Accepted)) and len(a) >= count and a)  # type: ignore[no-any-return]

    def closed(self, conn: int) -> Closed:
        return self.wait(lambda: next(iter(self.inputs(Closed, conn)), None))  # type: ignore[no-any-return]


def rid() -> int:
    return next(_ids)


@pytest.fixture
def make() -> Iterator[Callable[..., Peer]]:
    made: list[GenesisNet] = []

    def build(**kwargs: Any) -> Peer:
        net = GenesisNet(**kwargs)
        made.append(net)
        return Peer(net)

    yield build
    for net in made:
        net.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., socket.socket]]:
    made: list[socket.socket] = []

    def connect(port: int, *, mute: bool = False) -> socket.socket:
        """A client; ``mute``: one that will not read (a tiny receive window)."""
        s = socket.socket()
        made.append(s)
        s.settimeout(WAIT)
        if mute:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((HOST, port))
        return s

    yield connect
    for s in made:
        s.close()


def listen(peer: Peer, **kwargs: Any) -> int:
    value = peer.ok(Listen(rid(), HOST, 0, **kwargs))
    host, _, port = value["listening"].rpartition(":")
    assert host == HOST and int(port) > 0
    return int(port)


def read_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got


def ended(s: socket.socket, timeout: float = WAIT) -> bool:
    """Whether the peer's end shows on ``s`` (EOF or reset) within ``timeout``."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def choke(peer: Peer, conn: int) -> None:
    """A tiny kernel send buffer on ``conn``: what its peer does not read stays here."""
    sock = peer.net._conns[conn].transport.get_extra_info("socket")  # type: ignore[union-attr]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- basics
def test_accepts_and_moves_bytes_both_ways(make: Callable[..., Peer],
                                           clients: Callable[..., socket.socket]) -> None:
    server = make()
    port = listen(server)
    c = clients(port)
    (acc,) = server.accepted()
    assert acc.conn == 1 and acc.peer == f"{HOST}:{c.getsockname()[1]}"
    sock = server.net._conns[1].transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    c.sendall(b"hello from the new node")
    server.wait(lambda: server.data(1) == b"hello from the new node")
    assert server.ok(SendBytes(rid(), 1, b"welcome")) == {"sent": 7}
    assert read_exactly(c, 7) == b"welcome"
    assert server.net.connections == 1 and server.inputs(Closed) == []


def test_two_adapters_connect_and_the_answer_comes_before_what_it_receives(
        make: Callable[..., Peer]) -> None:
    a, b = make(), make()
    port = listen(a)
    for round_ in range(1, 6):
        req = Connect(rid(), HOST, port, timeout=2.0)
        b.submit(req)
        acc = a.accepted(round_)[-1]
        a.ok(SendBytes(rid(), acc.conn, b"at once"))  # races the Connect's answer
        answer = b.wait(lambda r=req: b.answer(r.request_id))  # type: ignore[misc]
        assert isinstance(answer, IoResult)
        n = answer.value["conn"]
        b.wait(lambda n=n: b.data(n) == b"at once")  # type: ignore[misc]
        first_received = next(i for i, x in enumerate(b.said)
                              if isinstance(x, Received) and x.conn == n)
        assert b.said.index(answer) < first_received
        assert b.ok(SendBytes(rid(), n, b"and back")) == {"sent": 8}
        a.wait(lambda c=acc.conn: a.data(c) == b"and back")  # type: ignore[misc]
        assert b.ok(CloseConn(rid(), n)) == {}
        assert a.closed(acc.conn).why == "peer closed"
        a.wait(lambda: a.net.connections == 0)
    assert [x.conn for x in a.inputs(Accepted)] == [1, 2, 3, 4, 5]  # never reused
    assert b.inputs(Closed) == []  # it closed them itself


def test_large_data_arrives_in_order_in_pieces_of_at_most_max_read(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    server = make()
    c = clients(listen(server))
    server.accepted()
    blob = os.urandom(900 * 1024)
    c.sendall(blob)
    server.wait(lambda: len(server.data(1)) == len(blob))
    pieces = server.inputs(Received, 1)
    assert len(pieces) >= len(blob) // MAX_READ
    assert all(0 < len(p.data) <= MAX_READ for p in pieces)
    assert server.data(1) == blob
    # And the other way: frames sent one after another arrive in order, whole.
    frames = [os.urandom(MAX_READ) for _ in range(6)]
    for f in frames:
        server.submit(SendBytes(rid(), 1, f))
    assert read_exactly(c, sum(map(len, frames))) == b"".join(frames)


def test_a_slow_core_pauses_reading_instead_of_buffering(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    server = make()
    gate = threading.Event()
    record = server._record

    def slow(item: Any) -> None:
        if isinstance(item, Received):
            gate.wait(WAIT)
        record(item)

    server.net.attach(slow)
    c = clients(listen(server))
    server.accepted()
    blob = os.urandom(1000 * 1024)
    sender = threading.Thread(target=lambda: c.sendall(blob), daemon=True)
    sender.start()
    try:
        conn = server.net._conns[1]
        deadline = time.monotonic() + WAIT
        while not conn.reading_paused and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.reading_paused
        time.sleep(0.2)  # the peer keeps sending: the adapter must not read on
        assert conn.pending <= genesis_net.HIGH_WATER + 256 * 1024
        assert conn.bytes_in < len(blob)
    finally:
        gate.set()
    sender.join(WAIT)
    server.wait(lambda: len(server.data(1)) == len(blob))
    assert server.data(1) == blob and server.inputs(Closed) == []


# --------------------------------------------------------------------------- ends
def test_the_peer_closing_is_closed_after_all_it_sent(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    server = make()
    c = clients(listen(server))
    server.accepted()
    c.sendall(b"last words")
    c.close()
    closed = server.closed(1)
    assert closed.why == "peer closed"
    assert server.data(1) == b"last words"
    assert server.said.index(closed) > server.said.index(server.inputs(Received, 1)[-1])
    failure = server.ask(SendBytes(rid(), 1, b"too late"))
    assert isinstance(failure, IoFailure) and "closed" in failure.error
    assert server.net.connections == 0


def test_close_conn_sends_what_was_sent_then_no_closed_follows(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    server = make()
    c = clients(listen(server))
    server.accepted()
    server.submit(SendBytes(rid(), 1, b"x" * 200_000))
    assert server.ok(CloseConn(rid(), 1)) == {}
    assert read_exactly(c, 200_000) == b"x" * 200_000
    assert ended(c)
    time.sleep(0.2)
    assert server.inputs(Closed) == []
    assert server.ok(CloseConn(rid(), 1)) == {}  # twice: still nothing to say
    failure = server.ask(SendBytes(rid(), 1, b"after"))
    assert isinstance(failure, IoFailure) and failure.error == "send: connection 1 is closed"
    failure = server.ask(CloseConn(rid(), 99))
    assert isinstance(failure, IoFailure) and failure.error == "close: no connection 99"


# --------------------------------------------------------------------------- limits
def test_at_most_max_connections_more_are_closed_at_once_and_counted(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    assert genesis_net.MAX_CONNECTIONS == 8
    server = make()
    port = listen(server, backlog=16)
    held = [clients(port) for _ in range(8)]
    server.accepted(8)
    extra = clients(port)
    assert ended(extra, 2.0)  # accepted by the kernel, then closed at once
    server.wait(lambda: server.net.counters["refused"] == 1)
    assert len(server.inputs(Accepted)) == 8
    failure = server.ask(Connect(rid(), HOST, port))
    assert isinstance(failure, IoFailure) and "8 connections already" in failure.error
    held[0].close()
    server.closed(1)
    server.wait(lambda: server.net.connections == 7)
    clients(port)
    accepted = server.accepted(9)
    assert [a.conn for a in accepted] == list(range(1, 10))  # 9 is new, 1 is not reused


def test_an_idle_connection_is_closed_and_a_busy_one_is_not(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    assert genesis_net.IDLE_TIMEOUT == 30.0
    server = make(idle_timeout=0.4)
    port = listen(server)
    silent = clients(port)
    server.accepted(1)
    busy = clients(port)
    server.accepted(2)
    start = time.monotonic()
    for _ in range(10):
        busy.sendall(b".")
        time.sleep(0.08)
    assert server.closed(1).why == "idle"
    assert time.monotonic() - start < 2.0
    assert ended(silent)
    assert server.inputs(Closed, 2) == []  # it kept talking
    assert server.closed(2).why == "idle"  # until it stopped
    assert server.net.counters["idle"] == 2


def test_a_peer_sending_more_than_the_cap_is_cut(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    assert genesis_net.MAX_BYTES_IN == 1024 * 1024
    server = make()
    c = clients(listen(server))
    server.accepted()
    sender = threading.Thread(target=lambda: _send_quietly(c, os.urandom(1024 * 1024 + 1)),
                              daemon=True)
    sender.start()
    assert server.closed(1).why == "too much data"
    sender.join(WAIT)
    assert len(server.data(1)) <= 1024 * 1024
    assert server.net.counters["too_much_data"] == 1 and server.net.connections == 0


def _send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # cut while sending: what this test wants
        s.sendall(data)


# --------------------------------------------------------------------------- failures
def test_connecting_to_a_closed_port_fails_in_one_line(make: Callable[..., Peer]) -> None:
    peer = make()
    port = free_port()
    failure = peer.ask(Connect(rid(), HOST, port, timeout=2.0))
    assert isinstance(failure, IoFailure)
    assert failure.error == f"cannot connect to {HOST}:{port}: Connection refused"
    assert peer.net.connections == 0 and peer.inputs() == []


def test_listening_on_a_taken_port_fails_and_one_listener_at_a_time(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    peer = make()
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        failure = peer.ask(Listen(rid(), HOST, port))
        assert isinstance(failure, IoFailure)
        assert failure.error == f"cannot listen on {HOST}:{port}: Address already in use"
    assert peer.net.listening == ""
    mine = listen(peer)
    assert peer.ok(Listen(rid(), HOST, mine)) == {"listening": f"{HOST}:{mine}"}  # the same
    failure = peer.ask(Listen(rid(), HOST, free_port()))
    assert isinstance(failure, IoFailure)
    assert f"already listening on {HOST}:{mine}" in failure.error
    c = clients(mine)
    peer.accepted()
    assert peer.ok(StopListening(rid())) == {}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, mine), timeout=WAIT).close()
    assert peer.ok(SendBytes(rid(), 1, b"still here")) == {"sent": 10}  # accepted stay
    assert read_exactly(c, 10) == b"still here"
    assert listen(peer) > 0  # and it may listen again


def test_bad_requests_fail_in_one_line(make: Callable[..., Peer]) -> None:
    peer = make()
    bad: list[IoRequest] = [
        Listen(rid(), HOST, 70000), Listen(rid(), "", 0), Listen(rid(), "a b", 0),
        Listen(rid(), HOST, 0, backlog=0), Connect(rid(), HOST, 0),
        Connect(rid(), HOST, 1, timeout=0), Connect(rid(), HOST, 1, timeout=1e9),
        SendBytes(rid(), 1, b"no such"), SendBytes(rid(), 0, b""),
        SendBytes(rid(), 1, b"x" * (genesis_net.MAX_SEND + 1)),
        SendBytes(rid(), 1, "text"),  # type: ignore[arg-type]
        CloseConn(rid(), -1), IoRequest(rid()),
    ]
    for request in bad:
        failure = peer.ask(request)
        assert isinstance(failure, IoFailure), request
        assert failure.error and "\n" not in failure.error and len(failure.error) <= 300
    connect = peer.ask(Connect(rid(), "no-such-host.invalid", 7, timeout=2.0))
    assert isinstance(connect, IoFailure)
    assert connect.error.startswith("cannot connect to no-such-host.invalid:7: ")


def test_garbage_half_open_and_non_reading_peers_hang_nothing(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    server = make(idle_timeout=0.5)
    port = listen(server)
    garbage = clients(port)
    server.accepted(1)
    garbage.sendall(b"\x00\xff" * 5000 + b"GET / HTTP/1.0\r\n\r\n")
    garbage.shutdown(socket.SHUT_WR)  # half-closed: it will say no more
    assert server.closed(1).why == "peer closed"
    assert len(server.data(1)) == 10018
    clients(port, mute=True)  # connects, never sends, never reads
    server.accepted(2)
    choke(server, 2)
    # Filling the mute peer's buffers: a send that cannot finish...
    stuck = SendBytes(rid(), 2, b"\x00" * genesis_net.MAX_SEND)
    for _ in range(3):
        server.submit(SendBytes(rid(), 2, b"\x00" * genesis_net.MAX_SEND))
    server.submit(stuck)
    # ...holds up nothing else meanwhile,
    t = time.monotonic()
    assert len(server.ok(Entropy(rid(), 16))["bytes"]) == 16
    good = clients(port)
    (_, _, acc) = server.accepted(3)
    good.sendall(b"fine")
    server.wait(lambda: server.data(acc.conn) == b"fine")
    assert time.monotonic() - t < 0.4
    # ...and ends when the connection is cut as idle: answered, not left hanging.
    assert server.closed(2).why == "idle"
    failure = server.wait(lambda: server.answer(stuck.request_id))
    assert isinstance(failure, IoFailure) and "ended before all of it went" in failure.error


# --------------------------------------------------------------------------- close
def test_close_with_live_connections_is_quick_and_answers_nothing_after(
        make: Callable[..., Peer], clients: Callable[..., socket.socket]) -> None:
    server = make()
    port = listen(server)
    live = [clients(port) for _ in range(3)]
    mute = clients(port, mute=True)
    server.accepted(4)
    choke(server, 4)
    live[0].sendall(b"in flight")
    pending = [SendBytes(rid(), 4, b"\x00" * genesis_net.MAX_SEND) for _ in range(4)]
    for p in pending:
        server.submit(p)
    time.sleep(0.1)
    threads = (server.net._thread, server.net._deliverer)
    start = time.monotonic()
    server.net.close()
    assert time.monotonic() - start < 2.0
    assert not any(t.is_alive() for t in threads)
    said = len(server.said)
    for c in [*live, mute]:
        assert ended(c, 2.0)  # the one not reading too: cut, not left draining
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect((HOST, port))  # the listener is gone
    late = server.net.submit
    answers: list[Any] = []
    late(Entropy(rid(), 8), answers.append)
    assert len(answers) == 1 and isinstance(answers[0], IoFailure)  # at once, "closed"
    assert answers[0].error == "genesis-net: closed"
    time.sleep(0.2)
    assert len(server.said) == said  # nothing answered or emitted after close
    assert server.answer(pending[-1].request_id) is None  # stuck, then dropped unanswered
    server.net.close()  # twice is harmless


# --------------------------------------------------------------------------- entropy
def test_entropy_gives_n_fresh_bytes_and_refuses_silly_n(make: Callable[..., Peer]) -> None:
    peer = make()
    one = peer.ok(Entropy(rid(), 32))["bytes"]
    two = peer.ok(Entropy(rid(), 32))["bytes"]
    assert type(one) is bytes and len(one) == 32 and one != two
    assert len(peer.ok(Entropy(rid(), 4096))["bytes"]) == 4096
    for n in (0, -1, 4097, 10**9, True, 1.5, "8"):
        failure = peer.ask(Entropy(rid(), n))  # type: ignore[arg-type]
        assert isinstance(failure, IoFailure), n
        assert failure.error.startswith("entropy: n must be 1..4096")


# --------------------------------------------------------------------------- hygiene
def test_no_data_bytes_reach_the_log(make: Callable[..., Peer],
                                     clients: Callable[..., socket.socket]) -> None:
    secret_in, secret_out = b"SECRET-FRAME-INBOUND-7f3a", b"SECRET-FRAME-OUTBOUND-91c2"
    with structlog.testing.capture_logs() as logs:
        server = make(max_bytes_in=64)
        c = clients(listen(server))
        server.accepted()
        c.sendall(secret_in)
        server.wait(lambda: server.data(1) == secret_in)
        server.ok(SendBytes(rid(), 1, secret_out))
        c.sendall(secret_in * 4)  # over the cap: cut, and logged
        server.closed(1)
        server.net.close()
    text = repr(logs)
    assert any(e.get("event") == "genesis_net.conn_closed" for e in logs)
    for secret in (secret_in, secret_out):
        assert secret.decode() not in text and secret.hex() not in text
