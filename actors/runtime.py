"""The node runtime: ledger, kernel, PD actors and the control socket, started as one.

``Node(state_dir).start()`` opens the ledger (which locks it, so one node per
directory, replays it and truncates a torn tail), builds the kernel and the host,
starts every PD the ledger says is running and serves the control socket.
``stop()`` undoes that in reverse order and closes the ledger.

The operator's commands (what the control socket serves) are methods here.  A
command that changes the node (or asks a PD for what it alone can see) enters at
pd-network-admin, the operator's PD, as a call, and reaches the PD that does the
work under a capability pd-network-admin holds (:meth:`Node.admin`).  The
kernel-level experiments (``caps mint``, ``caps revoke``, ``ping``) act through
the kernel's operator port: checked and journalled like any other operation,
refusals counted against the operator.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from actors.control import SOCKET_NAME, ControlError, ControlServer
from actors.engine import CoreFactory
from actors.host import Host
from actors.io.announce_net import AnnounceNet
from actors.io.base import Adapter, printable_line
from actors.io.genesis_net import GenesisNet
from actors.io.netlink import NetlinkAdapter
from actors.io.qemu import QemuAdapter
from actors.io.wireguard import DeviceAdapter
from actors.kernel import Kernel, OperatorPort
from actors.pds import make_core
from ledger.errors import LedgerUsageError
from ledger.keys import NodeKeys
from ledger.log import Ledger
from ledger.state import Cap, jsonable

log = structlog.get_logger("node")

LEDGER_SUBDIR = "ledger"
PING_TIMEOUT = 2.0
ADMIN = "pd-network-admin"
ADMIN_TIMEOUT = 10.0
PAIR_TIMEOUT = 60.0  # an approval: connect (5 s), then the ceremony (well under 1 s)
VM_TIMEOUT = 40.0  # a stop is ACPI powerdown, then quit 10 s later; many guests may start
AdapterFactory = Callable[[], dict[str, Adapter]]


MAX_ERROR_TEXT = 300
VM_ONE = ("start", "pause", "resume", "stop", "balloon")  # answered with the guest


def one_line(text: str) -> str:
    """A PD's error text as the operator may see it: one printable line, bounded."""
    safe = printable_line(text)
    return safe if len(safe) <= MAX_ERROR_TEXT else safe[:MAX_ERROR_TEXT - 3] + "..."


_LINK_FIELDS = {"index": int, "name": str, "state": str, "mtu": int}


def _links_ok(links: Any) -> bool:
    """Whether ``links`` is what pd-net-driver's ``links`` answer promises."""
    if type(links) is not list:
        return False
    for link in links:
        if type(link) is not dict or any(type(link.get(k)) is not t
                                         for k, t in _LINK_FIELDS.items()):
            return False
        if link.get("mac") is not None and type(link["mac"]) is not str:
            return False
        addrs = link.get("addresses")
        if type(addrs) is not list or any(
                type(a) is not dict or type(a.get("address")) is not str
                or type(a.get("prefixlen")) is not int or type(a.get("family")) is not str
                for a in addrs):
            return False
    return True


def real_adapters(state_dir: Path, *, tunnel: bool = True) -> dict[str, Adapter]:
    """The node's adapters, by PD: real I/O (netlink and the WireGuard backend's process
    for pd-net-driver, the device over UAPI for pd-wireguard, QEMU over QMP for pd-vmm).
    ``tunnel=False``: the node never starts or changes a WireGuard device or a link."""
    return {"pd-net-driver": NetlinkAdapter(tunnels=tunnel),
            "pd-wireguard": DeviceAdapter(state_dir), "pd-vmm": QemuAdapter(state_dir),
            "pd-network-admin": AnnounceNet(state_dir),
            "pd-genesis": GenesisNet()}


def cap_json(c: Cap) -> dict[str, Any]:
    return {"cap": c.cap_id, "holder": c.holder, "object": c.obj, "rights": list(c.rights),
            "badge": c.badge, "parent": c.parent, "via": c.via, "granted_seq": c.granted_seq}


class Node:
    """One running node on one state directory."""

    def __init__(self, state_dir: Path, *, make_core: CoreFactory = make_core,
                 adapters: AdapterFactory | None = None, tunnel: bool = True,
                 serve_control: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self._make_core = make_core
        self._adapters = adapters or (lambda: real_adapters(self.state_dir, tunnel=tunnel))
        self._operator: OperatorPort | None = None
        self._serve_control = serve_control
        self._ledger: Ledger | None = None
        self._kernel: Kernel | None = None
        self._host: Host | None = None
        self._control: ControlServer | None = None
        self._started = 0.0
        self._anchor_stop = threading.Event()
        self._anchor_keeper: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Node:
        try:
            if not self.state_dir.is_dir():
                raise LedgerUsageError(f"{self.state_dir}: no such state directory")
            ledger_dir = self.state_dir / LEDGER_SUBDIR
            if not ledger_dir.is_dir():
                raise LedgerUsageError(f"{ledger_dir}: no ledger; run `ppn node init` first")
            self._ledger = Ledger.open(ledger_dir, NodeKeys.load(self.state_dir))
            self._anchor_stop.clear()
            self._anchor_keeper = threading.Thread(
                target=self._ledger.keep_anchor, args=(self._anchor_stop,), daemon=True,
                name="ledger-anchor")
            self._anchor_keeper.start()
            self._kernel = Kernel(self._ledger)
            self._operator = self._kernel.operator()
            self._host = Host(self._ledger, self._kernel, make_core=self._make_core,
                              adapters=self._adapters())
            self._started = time.monotonic()
            self._host.start_all()
            if self._serve_control:
                self._control = ControlServer(self.state_dir / SOCKET_NAME, self)
                self._control.start()
        except BaseException:
            self.stop()
            raise
        log.info("node.started", state_dir=str(self.state_dir), records=self._ledger.size,
                 pds=self._host.running())
        return self

    def stop(self) -> None:
        """Stop serving, stop every PD, close the ledger (and its lock); idempotent."""
        if self._control is not None:
            self._control.stop()
            self._control = None
        if self._host is not None:
            self._host.stop_all()
            self._host = None
        if self._ledger is not None:
            size = self._ledger.size
            self._anchor_stop.set()
            self._ledger.wake_anchor_keeper()
            if self._anchor_keeper is not None:
                self._anchor_keeper.join()
                self._anchor_keeper = None
            self._ledger.close()
            self._ledger = None
            log.info("node.stopped", records=size)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- parts
    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise LedgerUsageError("the node is not running")
        return self._ledger

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            raise LedgerUsageError("the node is not running")
        return self._kernel

    @property
    def host(self) -> Host:
        if self._host is None:
            raise LedgerUsageError("the node is not running")
        return self._host

    @property
    def operator(self) -> OperatorPort:
        if self._operator is None:
            raise LedgerUsageError("the node is not running")
        return self._operator

    # ----------------------------------------------------------------- operator commands
    def status(self) -> dict[str, Any]:
        state = self.ledger.state_copy()
        alive = set(self.host.running())
        refused: dict[str, dict[str, int]] = {}
        for (pd, code), n in sorted(self.kernel.refused.items()):
            refused.setdefault(pd, {})[code] = n
        node = state.node or {}
        return {
            "node": node.get("name"), "role": node.get("role"), "mesh_ip": node.get("mesh_ip"),
            "pid": os.getpid(), "uptime": round(time.monotonic() - self._started, 3),
            "ledger": {"size": self.ledger.size, "root": self.ledger.root().hex(),
                       "seq": state.seq},
            "pds": {pd: {"status": state.pd_status.get(pd, "unknown"), "alive": pd in alive,
                         "priority": prio, "restarts": state.restarts.get(pd, 0)}
                    for pd, prio in sorted(state.pds.items(), key=lambda kv: (-kv[1], kv[0]))},
            "refused": refused, "refused_total": sum(self.kernel.refused.values()),
            "dropped": self.kernel.dropped, "forged": self.kernel.forged,
            "not_handled": dict(sorted(self.host.engine.dropped.items())),
        }

    def caps_list(self, pd: str | None = None) -> list[dict[str, Any]]:
        state = self.ledger.state_copy()
        if pd is not None and pd not in state.pds:
            raise ControlError(f"no protection domain {pd!r}")
        return [cap_json(c) for _, c in sorted(state.caps.items())
                if pd is None or c.holder == pd]

    def caps_tree(self) -> list[dict[str, Any]]:
        """The derivation tree in pre-order: each cap with its ``depth`` and whether it is
        the ``last`` of its siblings (flat, so no chain is too deep to send or draw)."""
        state = self.ledger.state_copy()
        roots = sorted(k for k, c in state.caps.items() if c.parent is None)
        stack = [(k, 0, i == 0) for i, k in enumerate(reversed(roots))]
        rows: list[dict[str, Any]] = []
        while stack:
            cap_id, depth, last = stack.pop()
            rows.append({**cap_json(state.caps[cap_id]), "depth": depth, "last": last})
            kids = sorted(state.children.get(cap_id, ()))
            stack.extend((k, depth + 1, i == 0) for i, k in enumerate(reversed(kids)))
        return rows

    def revoke(self, cap_id: int) -> int:
        n = self.operator.revoke(cap_id)
        log.info("operator.revoke", cap=cap_id, descendants=n)
        return n

    def mint(self, cap_id: int, rights: list[str], to: str, badge: int | None = None) -> int:
        new = self.operator.mint(cap_id, tuple(rights), to, badge)
        log.info("operator.mint", cap=cap_id, new=new, to=to, rights=rights, badge=badge)
        return new

    def _call(self, cap_id: int, payload: dict[str, Any], timeout: float, what: str) -> Any:
        answered = threading.Event()
        answers: list[Any] = []

        def on_reply(answer: Any) -> None:
            answers.append(answer)
            answered.set()
        self.operator.call(cap_id, payload, on_reply)
        if not answered.wait(timeout):
            raise ControlError(f"{what}: no answer within {timeout:g} s")
        return answers[0]

    def admin(self, command: str, timeout: float = ADMIN_TIMEOUT, **fields: Any) -> Any:
        """Run an operator command at pd-network-admin; its result, or ControlError."""
        state = self.ledger.state
        entry = next((c.cap_id for c in list(state.caps.values())
                      if c.obj == f"endpoint:{ADMIN}" and c.parent is None), None)
        if entry is None or state.pd_status.get(ADMIN) != "running":
            raise ControlError(f"{command}: {ADMIN} is not running")
        answer = self._call(entry, {"op": command, **fields}, timeout, command)
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else None
            text = one_line(error) if isinstance(error, str) else "the answer was not understood"
            raise ControlError(f"{command}: {text}")
        return {k: v for k, v in answer.items() if k != "ok"}

    def mesh_peer_add(self, **fields: Any) -> dict[str, Any]:
        """Add a desired WireGuard peer (pd-wireguard journals it, via pd-network-admin)."""
        peer: dict[str, Any] = jsonable(self.admin("mesh.peer.add", **fields)["peer"])
        return peer

    def mesh_peer_remove(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = jsonable(self.admin("mesh.peer.remove", name=name))
        return out

    def mesh_status(self) -> dict[str, Any]:
        """The interface, and per peer the desired state (the ledger's) beside the observed
        one (the device's, as pd-wireguard last read it)."""
        st = self.admin("mesh.status")
        observed = st.get("observed") if isinstance(st.get("observed"), dict) else {}
        peers = []
        for name, p in sorted(self.ledger.state.peers.items()):
            seen = observed.get(p.wg_public_key.hex())
            peers.append({"name": name, "desired": {
                "endpoint": p.endpoint, "allowed_ips": list(p.allowed_ips),
                "keepalive": p.keepalive, "mesh_ip": p.mesh_ip, "role": p.role},
                "observed": seen if isinstance(seen, dict) else None})
        out: dict[str, Any] = jsonable({
            "interface": st.get("interface"), "backend": "wireguard-go", "up": st.get("up"),
            "address": st.get("address"), "listen_port": st.get("listen_port"),
            "repairs": st.get("repairs"), "last_error": st.get("last_error"),
            "held_back": st.get("held_back"), "peers": peers})
        return out

    def mesh_repair(self) -> list[str]:
        """Reconcile the WireGuard device now; one line per repair (none if it matched)."""
        repaired = self.admin("mesh.repair").get("repaired")
        if type(repaired) is not list or not all(type(r) is str for r in repaired):
            raise ControlError("mesh.repair: malformed answer from pd-wireguard")
        return [one_line(r) for r in repaired]

    def vm(self, op: str, **fields: Any) -> Any:
        """A guest operation (``create``, ``list``, ``pool``, ``start`` ... ``balloon``),
        at pd-network-admin, which forwards it to pd-vmm under its vm.control cap (or
        vm.query: ``list`` and ``pool``)."""
        out = self.admin(f"vm.{op}", timeout=VM_TIMEOUT, **fields)
        if op == "list":
            vms = out.get("vms")
            if type(vms) is not list or not all(type(v) is dict for v in vms):
                raise ControlError("vm.list: malformed answer from pd-vmm")
            return jsonable(vms)
        if op in ("create", *VM_ONE) and type(out.get("vm")) is not dict:
            raise ControlError(f"vm.{op}: malformed answer from pd-vmm")
        return jsonable(out.get("vm") if op != "pool" and "vm" in out else out)

    def pair(self, op: str, **fields: Any) -> Any:
        """The Genesis ceremony (``start`` on a node waiting to be joined, ``approve`` on a
        member, ``status``): at pd-network-admin, forwarded to pd-genesis.  ``start``'s
        answer holds the code: it goes to the operator who asked and nowhere else."""
        if op == "status":  # the ledger's word (pd-genesis is reaped between ceremonies)
            g = self.ledger.state.genesis
            opened = g["open"]
            return jsonable({"open": None if opened is None else {
                k: opened[k] for k in ("ceremony", "role", "address", "window")},
                "last": g["last"], "running": "pd-genesis" in self.host.running()})
        timeout = {"approve": PAIR_TIMEOUT}.get(op, ADMIN_TIMEOUT)
        if op == "approve":  # the addresses in use, that the new node's is not one of
            state = self.ledger.state
            fields["taken"] = sorted({m.mesh_ip for m in list(state.members.values())}
                                     | {p.mesh_ip for p in list(state.peers.values())})
        out: Any = jsonable(self.admin(f"pair.{op}", timeout=timeout, **fields))
        return out

    def mesh_member(self, op: str, **fields: Any) -> Any:
        """``remove`` a member (announced to every other member), or ``list`` them with
        the announcements heard and told."""
        out: Any = jsonable(self.admin(f"mesh.member.{op}", **fields))
        return out

    def net_links(self) -> list[dict[str, Any]]:
        """The node's links and addresses, as pd-net-driver reads them (via pd-network-admin)."""
        links = self.admin("net.links").get("links")
        if not _links_ok(links):
            raise ControlError("net.links: malformed answer from pd-net-driver")
        checked: list[dict[str, Any]] = links
        return checked

    def ping(self, pd: str | None = None, cap_id: int | None = None,
             timeout: float = PING_TIMEOUT) -> Any:
        """Call through ``cap_id`` (or ``pd``'s endpoint's original cap); await the reply."""
        state = self.ledger.state  # read only: a lookup needs no copy of every cap
        if cap_id is None:
            if pd is None:
                raise ControlError("ping needs a pd or a cap")
            found = [c.cap_id for c in list(state.caps.values())
                     if c.obj == f"endpoint:{pd}" and c.parent is None]
            if not found:
                raise ControlError(f"no capability reaches {pd!r} (unknown, or reaped)")
            cap_id = found[0]
        return self._call(cap_id, {"op": "ping"}, timeout, f"ping through cap #{cap_id}")
