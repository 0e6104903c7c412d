"""pd-network-admin's real adapter: membership announcements over UDP, and their signing.

One UDP socket, bound to the node's mesh address (announcements travel inside the
tunnel); a thread receives (at most :data:`MAX_PER_SOURCE` datagrams a second from one
source address and :data:`MAX_PER_SECOND` in all are passed on, the rest dropped and
counted: one flooding source cannot crowd out the others' announcements) and the worker
thread sends and signs.  The node's
Ed25519 key is read from its key file for each signature and never leaves this module.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import structlog

from actors.io.base import WorkerAdapter
from actors.pds.announce import (
    CONTEXT,
    MAX_DATAGRAM,
    AnnounceReceived,
    BindAnnounce,
    SendAnnounce,
    SignAnnounce,
)
from actors.pds.base import IoAnswer, IoFailure, IoRequest, IoResult
from ledger.keys import NodeKeys

log = structlog.get_logger("announce")

MAX_PER_SECOND = 1000
MAX_PER_SOURCE = 50
MAX_SOURCES = 1024  # sources tracked in one second; past it, new ones share one budget
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


class AnnounceNet(WorkerAdapter):
    name = "announce"

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = Path(state_dir)
        self._sock: socket.socket | None = None
        self._bound: str | None = None
        self._lock = threading.Lock()
        self.dropped = 0  # datagrams over the rate, or oversized
        super().__init__()

    def close(self) -> None:
        super().close()
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def perform(self, request: IoRequest) -> IoAnswer:
        rid = request.request_id
        if type(request) is SignAnnounce:
            if type(request.body) is not bytes or len(request.body) > MAX_DATAGRAM:
                return IoFailure(rid, "sign: not an announcement's body")
            key = NodeKeys.load(self._state_dir).signing_key
            return IoResult(rid, {"signature": key.sign(CONTEXT + request.body).signature})
        if type(request) is BindAnnounce:
            return self._bind(rid, request.host, request.port)
        if type(request) is SendAnnounce:
            if len(request.data) > MAX_DATAGRAM:
                return IoFailure(rid, f"an announcement over {MAX_DATAGRAM} bytes")
            with self._lock:
                sock = self._sock
            if sock is None:
                return IoFailure(rid, "announcements: not bound yet")
            try:
                sent = sock.sendto(request.data, (request.host, request.port))
            except OSError as exc:
                return IoFailure(rid, f"cannot send to {request.host}:{request.port}: "
                                      f"{exc.strerror or exc}")
            return IoResult(rid, {"sent": sent})
        return IoFailure(rid, f"announce: no such request {type(request).__name__}")

    def _bind(self, rid: int, host: str, port: int) -> IoAnswer:
        address = f"{host}:{port}"
        if self._bound == address:
            return IoResult(rid, {"bound": address})
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # The mesh address may not be on the link yet (the tunnel is still coming up):
            # bound anyway, it receives once it is.
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            return IoFailure(rid, f"cannot listen for announcements on {address}: "
                                  f"{exc.strerror or exc}")
        sock.settimeout(0.5)
        with self._lock:
            old, self._sock, self._bound = self._sock, sock, address
        if old is not None:
            old.close()
        threading.Thread(target=self._receive, args=(sock,), daemon=True,
                         name="ppn-announce").start()
        log.info("announce.listening", address=address)
        return IoResult(rid, {"bound": address})

    def _receive(self, sock: socket.socket) -> None:
        window, count = time.monotonic(), 0
        per_source: dict[str, int] = {}
        while True:
            with self._lock:
                if self._sock is not sock:
                    return
            try:
                data, (ip, port) = sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            if now - window >= 1.0:
                window, count = now, 0
                per_source.clear()
            source = ip if ip in per_source or len(per_source) < MAX_SOURCES else "*"
            per_source[source] = per_source.get(source, 0) + 1
            if per_source[source] > MAX_PER_SOURCE or len(data) > MAX_DATAGRAM:
                self.dropped += 1
                continue
            count += 1
            if count > MAX_PER_SECOND:
                self.dropped += 1
                continue
            self._emit(AnnounceReceived(f"{ip}:{port}", data))
