"""pd-genesis's I/O vocabulary: what its core asks of its adapter, and what it is told.

The core runs the ceremony (:mod:`actors.pds.genesis_proto`) and holds the code; the
adapter (``actors/io/genesis_net.py``; ``sims/backends/genesis_net.py`` in the simulator)
only moves bytes over TCP and draws random bytes.  Connections are numbered by the
adapter; a number is never reused within one adapter's life.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.pds.base import IoInput, IoRequest

MAX_READ = 64 * 1024 + 4
"""The most bytes one ``Received`` carries (a whole frame and its length at most)."""


@dataclass(frozen=True, slots=True)
class Entropy(IoRequest):
    """``n`` bytes from the CSPRNG (``os.urandom``; seeded in the simulator):
    answered ``{"bytes": b"..."}``."""

    n: int


@dataclass(frozen=True, slots=True)
class Listen(IoRequest):
    """Listen on ``host:port`` (TCP), at most ``backlog`` connections waiting; each one
    accepted is an :class:`Accepted`.  Answered ``{"listening": "host:port"}``."""

    host: str
    port: int
    backlog: int = 4


@dataclass(frozen=True, slots=True)
class StopListening(IoRequest):
    """Close the listening socket (connections already accepted stay)."""


@dataclass(frozen=True, slots=True)
class Connect(IoRequest):
    """Connect to ``host:port`` within ``timeout`` seconds: answered ``{"conn": N}``; then
    what it sends is :class:`Received`, and its end :class:`Closed`."""

    host: str
    port: int
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class SendBytes(IoRequest):
    """Write ``data`` to connection ``conn`` (all of it): answered ``{"sent": n}``."""

    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConn(IoRequest):
    """Close connection ``conn`` (after what was sent has gone); answered ``{}``.  No
    :class:`Closed` follows for a connection closed this way."""

    conn: int


@dataclass(frozen=True, slots=True)
class Accepted(IoInput):
    """A connection came in on the listening socket, from ``peer`` (``IP:PORT``)."""

    conn: int
    peer: str


@dataclass(frozen=True, slots=True)
class Received(IoInput):
    """Bytes from connection ``conn``: at most :data:`MAX_READ` at a time, in order."""

    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Closed(IoInput):
    """Connection ``conn`` ended (the peer closed it, it broke, or it was idle too long)."""

    conn: int
    why: str
