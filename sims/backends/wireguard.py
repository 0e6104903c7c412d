"""The simulated twin of the WireGuard backend: a device per node, on the simulated underlay.

It stands where ``wireguard-go`` and the node's kernel link stand on a real node, and
answers the same requests in virtual time:

* pd-net-driver's :class:`~actors.pds.pd_net_driver.StartTunnel` (adopt a running
  device, else start an empty one) and :class:`~actors.pds.pd_net_driver.ConfigureLink`
  (address, up, route, forwarding; the answer lists what changed), through
  :class:`SimTunnels`; a device that dies (:meth:`SimDevice.kill`) is reported unasked,
  as :class:`~actors.pds.pd_net_driver.TunnelExited`;
* pd-wireguard's :class:`~actors.pds.pd_wireguard.GetDevice` and
  :class:`~actors.pds.pd_wireguard.SetDevice`, through :class:`SimUapi`, which holds the
  node's keys as the real adapter holds its key file.

Datagrams go between devices on the :class:`~sims.backends.underlay.Underlay` (so
latency, loss, duplication and partitions apply), from the device's ``IP:listen port``.
Cryptokey routing is modelled, and enough of the cryptography to make it hold: a device
sends an inner packet to the peer whose allowed IPs cover its destination (longest
prefix).  A handshake message is authenticated under the two devices' static X25519
shared secret, so it completes only between devices that each have the other configured
under the key it really has, and only the holder of a private key can speak for it; an
initiation older than the last one taken from that peer is a replay.  Data is
authenticated under the session's key, with a counter and a replay window, and is
accepted only from a configured peer with an inner source inside that peer's allowed
IPs; only an authenticated, fresh datagram moves a peer's endpoint (roaming).  A device
with forwarding on (a hub) routes what is not for itself on to its other peers.
Everything is drawn from the world's seeded queue, so the same seed gives the same run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from actors.io.base import Answer, Emit
from actors.pds.base import IoFailure, IoRequest, IoResult
from actors.pds.pd_net_driver import ConfigureLink, StartTunnel, TunnelExited
from actors.pds.pd_wireguard import GetDevice, SetDevice
from actors.pds.wg_plan import DeviceState, PeerState
from ledger.keys import NodeKeys
from sims.backends.underlay import Underlay

NS = 1_000_000_000
ANSWER_NS = 50_000  # how long a UAPI exchange or a link change takes, virtually
START_NS = 30_000_000  # how long a device takes to start
REKEY_TIMEOUT = 5.0  # seconds before an unanswered handshake is sent again
REKEY_AFTER = 120.0  # a session older than this is renewed by its initiator
REJECT_AFTER = 180.0  # a session older than this carries nothing
MAGIC = b"SWG1"
TTL = 64
WINDOW = 256  # data counters this far below the highest seen are still taken, once
KEPT = 1024  # inner packets a device keeps of what it received (for tests to read)
KINDS = ("init", "resp", "data")


@dataclass
class _Session:
    key: bytes
    sent: int = 0
    highest: int = -1
    seen: set[int] = field(default_factory=set)

    def fresh(self, n: int) -> bool:
        """Whether counter ``n`` is new (and now seen): the replay window."""
        if n <= self.highest - WINDOW or n in self.seen:
            return False
        self.seen.add(n)
        if n > self.highest:
            self.highest = n
            self.seen = {c for c in self.seen if c > n - WINDOW}
        return True


def _mac(key: bytes, fields: list[Any]) -> bytes:
    return hashlib.blake2b(msgpack.packb(fields), key=key[:64], digest_size=16).digest()


@dataclass
class _Peer:
    endpoint: str | None
    allowed: tuple[ipaddress.IPv4Network, ...]
    keepalive: int
    last_handshake: float = 0.0  # virtual seconds since the epoch
    rx: int = 0
    tx: int = 0
    session_at: float | None = None  # virtual elapsed seconds the session began
    initiated_at: float | None = None
    waiting: list[dict[str, Any]] = field(default_factory=list)
    session: _Session | None = None
    previous: _Session | None = None  # still taken, for what was in flight at a rekey
    init_nonce: bytes | None = None  # of the initiation we wait an answer to
    last_init: int = -1  # the newest initiation taken from this peer (its timestamp)


class SimDevice:
    """One node's WireGuard interface and its link, as the backend and kernel would hold them."""

    def __init__(self, net: SimWireGuard, ip: str) -> None:
        self.net, self.ip = net, ip
        self.interface: str | None = None
        self.running = False
        self.generation = 0  # a restart leaves the old device's timers dead
        self.public_key: bytes | None = None  # set with the private key
        self._private: bytes | None = None
        self._statics: dict[bytes, bytes] = {}  # peer key -> the static shared secret
        self._nonces = 0
        self.listen_port = 0
        self.peers: dict[bytes, _Peer] = {}
        self.address: ipaddress.IPv4Interface | None = None
        self.link_up = False
        self.route = False
        self.forwarding = False
        self.stats: Counter[str] = Counter()
        self.received: deque[dict[str, Any]] = deque(maxlen=KEPT)  # inner packets taken
        self.exited: Callable[[str, int], None] = lambda iface, code: None

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.listen_port}"

    # ------------------------------------------------------------ the process
    def start(self, interface: str) -> dict[str, Any]:
        if self.running and self.interface == interface:
            return {"interface": interface, "adopted": True}
        self._detach()
        self.interface, self.running = interface, True
        self.generation += 1
        self.public_key, self._private, self.listen_port, self.peers = None, None, 0, {}
        self._statics = {}
        self.address, self.link_up, self.route = None, False, False
        return {"interface": interface, "adopted": False, "pid": 10_000 + self.generation}

    def kill(self) -> None:
        """kill -9 of the backend: its configuration and link are gone, and its
        supervisor hears of it."""
        if not self.running:
            return
        self._detach()
        self.running = False
        self.generation += 1
        self.peers, self.address, self.link_up, self.route = {}, None, False, False
        assert self.interface is not None
        self.exited(self.interface, -9)

    def _detach(self) -> None:
        if self.listen_port:
            self.net.underlay.detach(self.endpoint, self)

    # ------------------------------------------------------------ the link
    def configure_link(self, interface: str, address: str, forwarding: bool) -> dict[str, Any]:
        if not self.running or interface != self.interface:
            raise RuntimeError(f"no link {interface}")
        want = ipaddress.IPv4Interface(address)
        changed = []
        if self.address != want:
            if self.address is not None:
                changed.append(f"removed {self.address}")
            self.address = want
            changed.append(f"added {address}")
        if not self.link_up:
            self.link_up = True
            changed.append("brought up")
        if not self.route:
            self.route = True
            changed.append(f"route {want.network} added")
        self.forwarding = forwarding
        return {"interface": interface, "address": address, "changed": changed}

    def flush_address(self) -> None:
        """``ip addr flush`` out of band: the address and its route go."""
        self.address, self.route = None, False

    # ------------------------------------------------------------ UAPI
    def get(self) -> DeviceState:
        return DeviceState(self.listen_port, self.public_key is not None, {
            key: PeerState(key, p.endpoint, tuple(str(n) for n in p.allowed), p.keepalive,
                           p.last_handshake, p.rx, p.tx)
            for key, p in sorted(self.peers.items())})

    def set(self, private_key: bytes | None, listen_port: int,
            peers: list[tuple[bytes, str | None, tuple[str, ...], int]]) -> None:
        """A whole-device set (``replace_peers``): kept peers keep their sessions."""
        if private_key is not None:
            self._private = private_key
            self.public_key = crypto_scalarmult_base(private_key)
            self._statics = {}
        if listen_port != self.listen_port:
            self._detach()
            self.listen_port = listen_port
            self.net.underlay.attach(self.endpoint, self)
        old, self.peers = self.peers, {}
        for key, endpoint, allowed, keepalive in peers:
            nets = tuple(ipaddress.IPv4Network(a) for a in allowed)
            prev = old.get(key)
            peer = prev if prev is not None else _Peer(endpoint, nets, keepalive)
            peer.endpoint = endpoint if endpoint is not None else peer.endpoint
            peer.allowed, was, peer.keepalive = nets, peer.keepalive, keepalive
            self.peers[key] = peer
            if keepalive and (prev is None or was != keepalive):
                self._keepalive(key, peer, self.generation)

    def remove_peer(self, key: bytes) -> None:
        """``wg set ... peer KEY remove`` out of band."""
        self.peers.pop(key, None)

    # ------------------------------------------------------------ the data plane
    def ping(self, dst: str, ident: int) -> None:
        """An ICMP echo from this node's tunnel address to ``dst``."""
        if self.address is None:
            self.stats["no address"] += 1
            return
        self.send_inner({"src": str(self.address.ip), "dst": dst, "ttl": TTL,
                         "kind": "echo", "id": ident})

    def send_inner(self, packet: dict[str, Any]) -> None:
        if not (self.running and self.link_up and self.route and self.public_key):
            self.stats["link down"] += 1
            return
        key = self._route(packet["dst"])
        if key is None:
            self.stats["no route"] += 1
            return
        self._to_peer(key, packet)

    def _route(self, dst: str) -> bytes | None:
        ip = ipaddress.IPv4Address(dst)
        best: tuple[int, bytes] | None = None
        for key, p in sorted(self.peers.items()):
            for n in p.allowed:
                if ip in n and (best is None or n.prefixlen > best[0]):
                    best = (n.prefixlen, key)
        return None if best is None else best[1]

    def _live(self, p: _Peer, now: float) -> bool:
        return (p.session is not None and p.session_at is not None
                and now - p.session_at < REJECT_AFTER)

    def _static(self, key: bytes) -> bytes | None:
        """The X25519 secret this device shares with the holder of ``key``."""
        if self._private is None:
            return None
        if key not in self._statics:
            try:
                self._statics[key] = crypto_scalarmult(self._private, key)
            except Exception:  # a low-order point: no secret with that "key"
                return None
        return self._statics[key]

    def _nonce(self) -> bytes:
        self._nonces += 1
        return hashlib.blake2b(f"{self.ip}/{self.generation}/{self._nonces}".encode(),
                               digest_size=16).digest()

    def _to_peer(self, key: bytes, packet: dict[str, Any] | None) -> None:
        p = self.peers[key]
        now = self.net.elapsed()
        if self._live(p, now):
            assert p.session_at is not None
            if now - p.session_at >= REKEY_AFTER:
                self._initiate(key, p, now)
            self._wire(key, p, "data", packet or {})
            return
        if packet is not None:
            p.waiting = [*p.waiting[-15:], packet]  # a few staged, as wireguard-go stages
        self._initiate(key, p, now)

    def _initiate(self, key: bytes, p: _Peer, now: float) -> None:
        if p.initiated_at is not None and now - p.initiated_at < REKEY_TIMEOUT:
            return
        p.initiated_at, p.init_nonce = now, self._nonce()
        self._wire(key, p, "init", {"i": p.init_nonce})
        gen = self.generation

        def retry() -> None:  # unanswered, with something still to say: try again
            q = self.peers.get(key)
            if gen == self.generation and q is p and q.waiting and not self._live(
                    q, self.net.elapsed()):
                self._initiate(key, q, self.net.elapsed())
        self.net.underlay.world.after(round(REKEY_TIMEOUT * NS), retry)

    def _wire(self, key: bytes, p: _Peer, kind: str, body: dict[str, Any]) -> None:
        if p.endpoint is None or self.public_key is None or not self.listen_port:
            self.stats["no endpoint"] += 1
            return
        if kind == "data":
            if p.session is None:
                return
            n, secret = p.session.sent, p.session.key
            p.session.sent += 1
        else:  # a handshake message: stamped, under the static secret
            n, secret = self.net.underlay.world.clock.elapsed_ns, self._static(key) or b""
        fields = [kind, self.public_key, key, n, body]
        data = MAGIC + msgpack.packb([*fields, _mac(secret, fields)])
        p.tx += len(data)
        self.net.underlay.send(self.endpoint, p.endpoint, data)

    def _keepalive(self, key: bytes, p: _Peer, gen: int) -> None:
        if gen != self.generation or self.peers.get(key) is not p or not p.keepalive:
            return  # a restarted device, or a peer removed (and perhaps set again)
        if self.running and self.public_key is not None:
            self._to_peer(key, None)
        self.net.underlay.world.after(p.keepalive * NS, lambda: self._keepalive(key, p, gen))

    def arrive(self, source: str, data: bytes) -> None:
        """A datagram from the underlay, at this device's endpoint."""
        frame = _frame(data)
        if frame is None:  # not ours: WireGuard drops what it cannot authenticate
            self.stats["garbage"] += 1
            return
        kind, sender, receiver, n, body, mac = frame
        p = self.peers.get(sender)
        if not self.running or receiver != self.public_key or p is None:
            self.stats["unknown key"] += 1  # the handshake cannot complete: dropped
            return
        fields = [kind, sender, receiver, n, body]
        if kind == "data":
            session = next((x for x in (p.session, p.previous) if x is not None
                            and hmac.compare_digest(_mac(x.key, fields), mac)), None)
            if session is None or not self._live(p, self.net.elapsed()):
                self.stats["no session"] += 1
                return
            if not session.fresh(n):
                self.stats["replayed"] += 1
                return
        else:
            static = self._static(sender)
            if static is None or not hmac.compare_digest(_mac(static, fields), mac):
                self.stats["not authentic"] += 1  # it does not hold the peer's private key
                return
            if not self._handshake(sender, p, kind, n, body):
                return
        p.rx += len(data)
        p.endpoint = source  # roaming: the latest authenticated, fresh source
        if kind == "data":
            if body:
                self._inner(p, body)
            else:
                self.stats["keepalive"] += 1

    def _handshake(self, key: bytes, p: _Peer, kind: str, n: int,
                   body: dict[str, Any]) -> bool:
        """An authentic initiation or response: a new session, if it is not a replay."""
        i, r = body.get("i"), body.get("r")
        if kind == "init":
            if type(i) is not bytes or n <= p.last_init:
                self.stats["replayed"] += 1
                return False
            p.last_init, r = n, self._nonce()
        elif type(r) is not bytes or p.init_nonce is None or i != p.init_nonce:
            self.stats["replayed"] += 1  # an answer to no initiation of ours
            return False
        static = self._static(key) or b""
        assert type(i) is bytes and type(r) is bytes
        p.previous, p.session = p.session, _Session(hashlib.blake2b(
            static + i + r, digest_size=32).digest())
        p.session_at = self.net.elapsed()
        if kind == "resp":  # our initiation answered.  (Answering theirs leaves ours
            p.initiated_at, p.init_nonce = None, None  # open: crossed ones both complete)
        p.last_handshake = self.net.now()
        if kind == "init":
            self._wire(key, p, "resp", {"i": i, "r": r})
        for packet in p.waiting:
            self._wire(key, p, "data", packet)
        p.waiting = []
        return True

    def _inner(self, p: _Peer, packet: dict[str, Any]) -> None:
        try:
            src = ipaddress.IPv4Address(packet["src"])
            ipaddress.IPv4Address(packet["dst"])
        except (KeyError, ValueError, TypeError):
            self.stats["garbage"] += 1
            return
        ttl, hops = packet.get("ttl"), packet.get("hops", 0)
        if type(ttl) is not int or type(hops) is not int or not (
                0 <= ttl <= 255 and 0 <= hops <= 255):
            self.stats["garbage"] += 1
            return
        if not any(src in n for n in p.allowed):
            self.stats["source not allowed"] += 1  # cryptokey routing
            return
        if self.address is not None and packet["dst"] == str(self.address.ip):
            self.received.append(packet)
            if packet.get("kind") == "echo":
                self.send_inner({**packet, "src": packet["dst"], "dst": packet["src"],
                                 "kind": "reply", "ttl": TTL, "hops": packet.get("hops", 0)})
            return
        if not self.forwarding or packet.get("ttl", 0) <= 1:
            self.stats["not forwarded"] += 1
            return
        self.stats["forwarded"] += 1
        self.send_inner({**packet, "ttl": packet["ttl"] - 1, "hops": packet.get("hops", 0) + 1})


def _frame(data: bytes) -> tuple[str, bytes, bytes, int, dict[str, Any], bytes] | None:
    """A datagram as (kind, sender, receiver, counter, body, mac), or None if it is not one."""
    if not data.startswith(MAGIC):
        return None
    try:
        obj = msgpack.unpackb(data[len(MAGIC):], max_bin_len=65_536, max_str_len=65_536,
                              max_array_len=64, max_map_len=64)
    except Exception:
        return None
    if type(obj) is not list or len(obj) != 6:
        return None
    kind, sender, receiver, n, body, mac = obj
    if (kind not in KINDS or type(sender) is not bytes or len(sender) != 32
            or type(receiver) is not bytes or type(n) is not int or not 0 <= n < 2**63
            or type(body) is not dict or type(mac) is not bytes or len(mac) != 16):
        return None
    return kind, sender, receiver, n, body, mac


class SimWireGuard:
    """The devices of one simulated world, each on the shared underlay."""

    def __init__(self, underlay: Underlay) -> None:
        self.underlay = underlay
        self.devices: dict[str, SimDevice] = {}

    def device(self, ip: str) -> SimDevice:
        if ip not in self.devices:
            self.devices[ip] = SimDevice(self, ip)
        return self.devices[ip]

    def now(self) -> float:
        return self.underlay.world.clock.time()

    def elapsed(self) -> float:
        return self.underlay.world.clock.elapsed


class SimTunnels:
    """What pd-net-driver's adapter does with the tunnel, for one node's device."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device

    def attach(self, emit: Emit) -> None:
        self.device.exited = lambda iface, code: emit(TunnelExited(iface, code))

    def handles(self, request: IoRequest) -> bool:
        return type(request) in (StartTunnel, ConfigureLink)

    def submit(self, request: IoRequest, answer: Answer) -> None:
        world = self.device.net.underlay.world
        try:
            if type(request) is StartTunnel:
                value = self.device.start(request.interface)
                delay = ANSWER_NS if value["adopted"] else START_NS
            elif type(request) is ConfigureLink:
                value, delay = self.device.configure_link(
                    request.interface, request.address, request.forwarding), ANSWER_NS
            else:
                raise RuntimeError(f"no such request {type(request).__name__}")
        except (RuntimeError, ValueError) as exc:
            failure = IoFailure(request.request_id, f"simulated WireGuard: {exc}")
            world.after(ANSWER_NS, lambda: answer(failure))
            return
        world.after(delay, lambda: answer(IoResult(request.request_id, value)))


class SimUapi:
    """pd-wireguard's simulated adapter: ``get=1`` / ``set=1`` on the node's device."""

    def __init__(self, device: SimDevice, keys: NodeKeys) -> None:
        self.device, self._keys = device, keys

    def attach(self, emit: Emit) -> None:
        pass

    def submit(self, request: IoRequest, answer: Answer) -> None:
        d, world = self.device, self.device.net.underlay.world
        if type(request) not in (GetDevice, SetDevice):
            out: Any = IoFailure(request.request_id,
                                 f"simulated UAPI: no such request {type(request).__name__}")
        elif not d.running or getattr(request, "interface", None) != d.interface:
            out = IoFailure(request.request_id, f"no UAPI socket for "
                                                f"{getattr(request, 'interface', '?')}")
        elif type(request) is GetDevice:
            out = IoResult(request.request_id, {"device": d.get()})
        else:
            assert isinstance(request, SetDevice)
            d.set(base64.b64decode(self._keys.wg_private_key_b64()) if request.set_key
                  else None, request.listen_port,
                  [(p.public_key, p.endpoint, p.allowed_ips, p.keepalive)
                   for p in request.peers])
            out = IoResult(request.request_id, {"set": len(request.peers)})
        world.after(ANSWER_NS, lambda: answer(out))

    def close(self) -> None:
        pass
