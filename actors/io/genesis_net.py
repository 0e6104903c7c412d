"""pd-genesis's real adapter: TCP for the Genesis pairing ceremony, and ``os.urandom``.

The vocabulary is :mod:`actors.pds.genesis_io`'s.  One asyncio loop, on the adapter's
own daemon thread, serves the listener and every connection (protocols, not streams:
reading is paused and resumed directly).  What the adapter says -- answers to requests
and unsolicited inputs alike -- goes out through one FIFO, delivered by a second daemon
thread, so the core sees things in the order they happened (the answer ``{"conn": N}``
before the first ``Received(N)``, every ``Received(N)`` before ``Closed(N)``) and a
slow ``emit`` or ``answer`` never stalls the loop.

The peer is untrusted, so everything is bounded:

* at most :data:`MAX_CONNECTIONS` connections at once, accepted and connected together;
  one more coming in is accepted and closed at once (counted as ``refused``), one more
  asked for by ``Connect`` fails;
* a connection on which nothing was received or sent for ``idle_timeout`` seconds is
  cut (``Closed(conn, "idle")``), as is one whose peer sent more than
  ``max_bytes_in`` bytes in all (``Closed(conn, "too much data")``); a cut is a reset
  (``SO_LINGER`` 0: nothing is left draining to a peer that does not read);
* reading a connection pauses while more than :data:`HIGH_WATER` bytes of what it
  received are not yet delivered, and resumes below :data:`LOW_WATER`;
* one ``SendBytes`` carries at most :data:`MAX_SEND` bytes, and a connection holds at
  most :data:`MAX_WRITE_BUFFER` bytes not yet sent; ``SendBytes`` is answered once all
  of it went to the kernel;
* ``Entropy`` draws at most :data:`MAX_ENTROPY` bytes.

Connection numbers count up from 1 and are never reused.  One listener at a time.
Failures are one line.  Nothing logged carries the bytes moved (they are key-exchange
frames): only sizes and counts.  The adapter holds no tokens and journals nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from actors.io.base import Answer, Emit, printable_line
from actors.pds.base import IoAnswer, IoFailure, IoInput, IoRequest, IoResult
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

log = structlog.get_logger("genesis_net")

MAX_CONNECTIONS = 8
IDLE_TIMEOUT = 30.0
MAX_BYTES_IN = 1024 * 1024
"""Bytes a peer may send on one connection in all (the ceremony is a few frames)."""
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_SEND = 256 * 1024
MAX_WRITE_BUFFER = 1024 * 1024
MAX_ENTROPY = 4096
MAX_BACKLOG = 64
MAX_CONNECT_TIMEOUT = 60.0
CLOSE_GRACE = 5.0
"""After ``CloseConn``, a peer that does not take what is still to be sent is cut."""
MAX_HOST = 253
ERROR_LIMIT = 300

_Item = tuple[Callable[[Any], None], Any, "_Conn | None", int]


def _one_line(text: str) -> str:
    return printable_line(text)[:ERROR_LIMIT]


def _why(exc: BaseException) -> str:
    """An OS error as its system text ("Connection refused"), other errors by name."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, OSError):
        if exc.errno:
            return os.strerror(exc.errno)
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _endpoint(address: Any) -> str:
    """``IP:PORT`` (``[IP]:PORT`` for IPv6) of a socket address."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "?"


def _check_host(host: Any) -> str:
    if type(host) is not str or not host or len(host) > MAX_HOST or not host.isprintable() \
            or any(c.isspace() for c in host):
        raise _Refused(f"bad host {str(host)[:40]!r}")
    return host


def _check_port(port: Any, lowest: int) -> int:
    if type(port) is not int or not lowest <= port <= 65535:
        raise _Refused(f"bad port {str(port)[:20]!r}")
    return port


def _reset(transport: asyncio.Transport) -> None:
    """Cut at once: a reset, what is not sent yet dropped (a peer that does not read
    keeps no orphaned socket draining in the kernel)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Refused(Exception):
    """A request that cannot be done: its text is the failure, as it is."""


@dataclass(eq=False)
class _Conn(asyncio.Protocol):
    """One TCP connection, accepted or connected."""

    net: GenesisNet
    outbound: Callable[[int], None] | None = None
    """For a ``Connect``: told the number once the connection is made."""
    number: int = 0
    transport: asyncio.Transport | None = None
    peer: str = "?"
    bytes_in: int = 0
    pending: int = 0
    """Bytes received and queued for delivery, not yet delivered."""
    reading_paused: bool = False
    last_activity: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None
    drain_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    closing_by_us: bool = False
    """CloseConn was asked (or the adapter cut it, and said why already): no Closed."""
    refused: bool = False
    ended: bool = False

    # -------------------------------------------------------------- protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.net._opened(self)

    def data_received(self, data: bytes) -> None:
        self.net._received(self, data)

    def eof_received(self) -> bool | None:
        return None  # the peer's end is the connection's end: the transport closes

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.net._lost(self, exc)


class GenesisNet:
    """pd-genesis's adapter on a real host."""

    name = "genesis-net"

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_bytes_in: int = MAX_BYTES_IN) -> None:
        self.idle_timeout = float(idle_timeout)
        self.max_connections = int(max_connections)
        self.max_bytes_in = int(max_bytes_in)
        self.counters: Counter[str] = Counter()
        """``accepted``, ``connected``, ``refused`` (over the limit), ``idle``,
        ``too_much_data``, ``closed``; bytes ``bytes_in`` and ``bytes_out``."""
        self._emit: Emit = lambda event: None
        self._closed = False
        self._conns: dict[int, _Conn] = {}
        self._connecting = 0
        self._next_conn = 1
        self._server: asyncio.Server | None = None
        self._listen_key: tuple[str, int, int] | None = None  # host, port asked, bound
        self._listening = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._out: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="ppn-io-genesis-net", daemon=True)
        self._deliverer = threading.Thread(target=self._deliver,
                                           name="ppn-io-genesis-net-out", daemon=True)
        self._thread.start()
        self._deliverer.start()

    # ------------------------------------------------------------------ Adapter
    def attach(self, emit: Emit) -> None:
        self._emit = emit

    def submit(self, request: IoRequest, answer: Answer) -> None:
        if self._closed:
            answer(IoFailure(request.request_id, f"{self.name}: closed"))
            return
        try:
            asyncio.run_coroutine_threadsafe(self._serve(request, answer), self._loop)
        except RuntimeError:  # the loop closed meanwhile: closing, nothing is answered
            if not self._closed:
                raise

    def close(self) -> None:
        """Close the listener and every connection, stop both threads; nothing is
        answered or emitted once this returns."""
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._let_go(), self._loop).result(5.0)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
            if not self._thread.is_alive():
                self._loop.close()
        self._out.put(None)
        if threading.current_thread() is not self._deliverer:
            self._deliverer.join(timeout=5.0)
        log.info("genesis_net.closed", **dict(self.counters))

    # ------------------------------------------------------------------ state
    @property
    def connections(self) -> int:
        """Connections open now (for tests and status)."""
        return len(self._conns)

    @property
    def listening(self) -> str:
        """``host:port`` listened on, or ``""``."""
        return self._listening

    # ------------------------------------------------------------------ delivery
    def _put(self, fn: Callable[[Any], None], value: Any, conn: _Conn | None = None,
             size: int = 0) -> None:
        if not self._closed:
            self._out.put((fn, value, conn, size))

    def _answer(self, answer: Answer, value: IoAnswer) -> None:
        self._put(answer, value)

    def _input(self, event: IoInput, conn: _Conn | None = None, size: int = 0) -> None:
        self._put(lambda e: self._emit(e), event, conn, size)

    def _deliver(self) -> None:
        while True:
            item = self._out.get()
            if item is None:
                return
            fn, value, conn, size = item
            if self._closed:  # closing: what is still queued is not delivered
                continue
            try:
                fn(value)
            except Exception as exc:  # the receiver's fault; never the data in the log
                log.warning("genesis_net.delivery_failed", what=type(value).__name__,
                            error=type(exc).__name__)
            if conn is not None and size:
                with contextlib.suppress(RuntimeError):  # the loop closed: closing
                    self._loop.call_soon_threadsafe(self._delivered, conn, size)

    def _delivered(self, conn: _Conn, size: int) -> None:
        conn.pending -= size
        if conn.reading_paused and conn.pending <= LOW_WATER and not conn.ended \
                and conn.transport is not None:
            conn.reading_paused = False
            conn.transport.resume_reading()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.warning("genesis_net.loop_error", message=_one_line(str(context.get("message"))),
                    error=type(exc).__name__ if exc is not None else None)

    # ------------------------------------------------------------------ requests
    async def _serve(self, request: IoRequest, answer: Answer) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        handler = self._HANDLERS.get(type(request))
        try:
            if handler is None:
                raise _Refused(f"{self.name}: not a request it serves: "
                               f"{type(request).__name__}")
            value = await handler(self, request, answer)
        except _Refused as exc:
            self._answer(answer, IoFailure(request.request_id, _one_line(str(exc))))
            return
        except Exception as exc:  # a failure of this request, not of the adapter
            self._answer(answer, IoFailure(request.request_id, _one_line(
                f"{type(request).__name__}: {_why(exc)}")))
            return
        if value is not None:
            self._answer(answer, IoResult(request.request_id, value))

    async def _entropy(self, r: Entropy, answer: Answer) -> dict[str, Any]:
        if type(r.n) is not int or not 1 <= r.n <= MAX_ENTROPY:
            raise _Refused(f"entropy: n must be 1..{MAX_ENTROPY}, not {str(r.n)[:20]}")
        return {"bytes": os.urandom(r.n)}

    async def _listen(self, r: Listen, answer: Answer) -> dict[str, Any]:
        host, port = _check_host(r.host), _check_port(r.port, 0)
        if type(r.backlog) is not int or not 1 <= r.backlog <= MAX_BACKLOG:
            raise _Refused(f"bad backlog {str(r.backlog)[:20]!r} (1..{MAX_BACKLOG})")
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self._server is not None and self._listen_key is not None:
            h, asked, bound = self._listen_key
            if h == host and port in (asked, bound):
                return {"listening": self._listening}
            raise _Refused(f"cannot listen on {where}: already listening on "
                           f"{self._listening}")
        try:
            server = await self._loop.create_server(
                lambda: _Conn(self), host, port, backlog=r.backlog, reuse_address=True)
        except OSError as exc:
            raise _Refused(f"cannot listen on {where}: {_why(exc)}") from None
        if self._closed:
            server.close()
            return {}
        if self._server is not None:  # two Listens raced through the bind: keep one
            server.close()
            raise _Refused(f"cannot listen on {where}: already listening on "
                           f"{self._listening}")
        sockets = server.sockets
        bound_at = sockets[0].getsockname() if sockets else (host, port)
        self._server = server
        self._listen_key = (host, port, int(bound_at[1]))
        self._listening = _endpoint(bound_at)
        log.info("genesis_net.listening", at=self._listening, sockets=len(sockets))
        return {"listening": self._listening}

    async def _stop_listening(self, r: StopListening, answer: Answer) -> dict[str, Any]:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            log.info("genesis_net.stopped_listening", at=self._listening)
        self._listen_key, self._listening = None, ""
        return {}

    async def _connect(self, r: Connect, answer: Answer) -> dict[str, Any] | None:
        host, port = _check_host(r.host), _check_port(r.port, 1)
        timeout = r.timeout
        if type(timeout) not in (int, float) or not 0 < timeout <= MAX_CONNECT_TIMEOUT:
            raise _Refused(f"bad timeout {str(timeout)[:20]!r} "
                           f"(0..{MAX_CONNECT_TIMEOUT:g} s)")
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if len(self._conns) + self._connecting >= self.max_connections:
            raise _Refused(f"cannot connect to {where}: {self.max_connections} "
                           "connections already")
        answered: list[int] = []

        def made(number: int) -> None:
            # Answered from connection_made: before anything it receives is delivered.
            answered.append(number)
            self._answer(answer, IoResult(r.request_id, {"conn": number}))

        self._connecting += 1
        try:
            await asyncio.wait_for(self._loop.create_connection(
                lambda: _Conn(self, outbound=made), host, port), timeout)
        except TimeoutError:
            if answered:
                return None  # made just as time ran out: asyncio closes it, Closed follows
            raise _Refused(f"cannot connect to {where}: no answer within "
                           f"{timeout:g} s") from None
        except OSError as exc:
            if answered:
                return None
            raise _Refused(f"cannot connect to {where}: {_why(exc)}") from None
        finally:
            self._connecting -= 1
        return None

    def _conn(self, number: Any, verb: str) -> _Conn | None:
        """The open connection ``number``; None if it was one and ended; else refused."""
        if type(number) is not int or not 1 <= number < self._next_conn:
            raise _Refused(f"{verb}: no connection {str(number)[:20]}")
        return self._conns.get(number)

    async def _send(self, r: SendBytes, answer: Answer) -> dict[str, Any]:
        data = r.data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _Refused(f"send: data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_SEND:
            raise _Refused(f"send: {len(data)} bytes, more than {MAX_SEND} at once")
        conn = self._conn(r.conn, "send")
        if conn is None or conn.ended or conn.closing_by_us or conn.transport is None \
                or conn.transport.is_closing():
            raise _Refused(f"send: connection {r.conn} is closed")
        transport = conn.transport
        if transport.get_write_buffer_size() + len(data) > MAX_WRITE_BUFFER:
            raise _Refused(f"send: connection {r.conn} has {MAX_WRITE_BUFFER} bytes "
                           "waiting to go already")
        conn.last_activity = self._loop.time()
        transport.write(data)
        self.counters["bytes_out"] += len(data)
        if transport.get_write_buffer_size() > 0:
            waiter: asyncio.Future[None] = self._loop.create_future()
            conn.drain_waiters.append(waiter)
            await waiter  # failed by connection_lost, with why
        return {"sent": len(data)}

    async def _close_conn(self, r: CloseConn, answer: Answer) -> dict[str, Any]:
        conn = self._conn(r.conn, "close")
        if conn is None or conn.ended or conn.transport is None:
            return {}  # ended already (its Closed was delivered before this answer)
        conn.closing_by_us = True
        transport = conn.transport
        transport.close()  # what was written still goes, then the socket closes
        self._loop.call_later(CLOSE_GRACE, lambda: None if conn.ended else _reset(transport))
        log.info("genesis_net.conn_closed", conn=conn.number, why="asked",
                 bytes_in=conn.bytes_in)
        return {}

    _HANDLERS: ClassVar[dict[type, Callable[[Any, Any, Answer],
                                            Coroutine[Any, Any, dict[str, Any] | None]]]] = {
        Entropy: _entropy, Listen: _listen, StopListening: _stop_listening,
        Connect: _connect, SendBytes: _send, CloseConn: _close_conn}

    # ------------------------------------------------------------------ connections
    def _opened(self, conn: _Conn) -> None:
        assert conn.transport is not None
        transport = conn.transport
        if self._closed:
            conn.refused = True
            _reset(transport)
            return
        if conn.outbound is None and len(self._conns) + self._connecting >= \
                self.max_connections:
            conn.refused = True
            self.counters["refused"] += 1
            log.info("genesis_net.refused", reason="too many connections",
                     refused=self.counters["refused"])
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=0)  # resume_writing: all of it went
        conn.number = self._next_conn
        self._next_conn += 1
        conn.peer = _endpoint(transport.get_extra_info("peername"))
        conn.last_activity = self._loop.time()
        self._conns[conn.number] = conn
        self._arm_idle(conn)
        if conn.outbound is not None:
            self.counters["connected"] += 1
            log.info("genesis_net.connected", conn=conn.number, peer=conn.peer)
            conn.outbound(conn.number)
        else:
            self.counters["accepted"] += 1
            log.info("genesis_net.accepted", conn=conn.number, peer=conn.peer)
            self._input(Accepted(conn.number, conn.peer))

    def _arm_idle(self, conn: _Conn) -> None:
        conn.idle_timer = self._loop.call_at(conn.last_activity + self.idle_timeout,
                                             self._idle_check, conn)

    def _idle_check(self, conn: _Conn) -> None:
        if conn.ended or conn.closing_by_us:
            return
        if conn.reading_paused:  # the core is slow, not the peer: it waits for us
            conn.last_activity = self._loop.time()
        if self._loop.time() - conn.last_activity >= self.idle_timeout:
            self.counters["idle"] += 1
            self._cut(conn, "idle")
        else:
            self._arm_idle(conn)

    def _cut(self, conn: _Conn, why: str) -> None:
        """End ``conn`` here, telling the core ``why`` (once)."""
        if conn.ended or conn.closing_by_us:
            return
        conn.closing_by_us = True  # connection_lost says nothing more
        self._end(conn, why, tell=True)
        if conn.transport is not None:
            _reset(conn.transport)

    def _received(self, conn: _Conn, data: bytes) -> None:
        if conn.refused or conn.ended or conn.closing_by_us:
            return
        size = len(data)
        if conn.bytes_in + size > self.max_bytes_in:
            self.counters["too_much_data"] += 1
            self._cut(conn, "too much data")
            return
        conn.bytes_in += size
        self.counters["bytes_in"] += size
        conn.last_activity = self._loop.time()
        view = memoryview(data)
        for start in range(0, size, MAX_READ):
            piece = bytes(view[start:start + MAX_READ])
            conn.pending += len(piece)
            self._input(Received(conn.number, piece), conn, len(piece))
        if conn.pending > HIGH_WATER and not conn.reading_paused and conn.transport is not None:
            conn.reading_paused = True
            conn.transport.pause_reading()

    def _lost(self, conn: _Conn, exc: Exception | None) -> None:
        if conn.refused or conn.number == 0:
            return
        if conn.closing_by_us:
            self._end(conn, "closed", tell=False)
        else:
            self._end(conn, "peer closed" if exc is None else f"broken: {_why(exc)}",
                      tell=True)

    def _end(self, conn: _Conn, why: str, *, tell: bool) -> None:
        if conn.ended:
            return
        conn.ended = True
        self._conns.pop(conn.number, None)
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
        waiters, conn.drain_waiters = conn.drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(_Refused(f"send: connection {conn.number} ended before "
                                         f"all of it went ({why})"))
        self.counters["closed"] += 1
        if tell:
            log.info("genesis_net.conn_closed", conn=conn.number, why=why,
                     bytes_in=conn.bytes_in)
            self._input(Closed(conn.number, why))

    async def _let_go(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns.values()):
            conn.closing_by_us = True
            if conn.transport is not None:
                _reset(conn.transport)
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(3):  # the aborted transports close their sockets
            await asyncio.sleep(0)
