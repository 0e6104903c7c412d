"""The control socket: how the operator's tools talk to a running node.

``DIR/control.sock`` is a UNIX stream socket of mode 0600.  A request is one JSON
object on one line (at most :data:`MAX_REQUEST` bytes), decoded strictly: UTF-8,
no duplicate keys, no NaN, only the fields its command declares, each of the
declared type.  The reply is one JSON line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``.  A bad request gets an error reply and changes
nothing; it never stops the node.

Commands (fields in brackets are optional):

* ``status``                       -- node, ledger size and root, PDs, counters, uptime
* ``caps.list [pd]``               -- the capabilities (of one PD)
* ``caps.tree``                    -- the derivation tree
* ``caps.revoke cap``              -- delete every descendant of ``cap``
* ``caps.mint cap rights to [badge]`` -- derive a cap from ``cap`` into PD ``to``
* ``ping [pd] [cap]``              -- call a PD and return its answer
* ``net.links``                    -- the node's links and addresses (pd-net-driver,
                                      reached through pd-network-admin)
* ``mesh.peer.add name wg_key mesh_ip [endpoint] [role] [keepalive]`` and
  ``mesh.peer.remove name``        -- the desired WireGuard peers (pd-wireguard, reached
                                      through pd-network-admin under its ``peers`` cap)
* ``mesh.repair``                  -- reconcile the device now; what was repaired
* ``mesh.status``                  -- the interface, and per peer desired and observed
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from actors.control_client import (  # the client half, re-exported
    MAX_REPLY as MAX_REPLY,
)
from actors.control_client import (
    SOCKET_NAME as SOCKET_NAME,
)
from actors.control_client import (
    ControlError as ControlError,
)
from actors.control_client import (
    NodeNotRunning as NodeNotRunning,
)
from actors.control_client import (
    RequestError as RequestError,
)
from actors.control_client import (
    encode as encode,
)
from actors.control_client import (
    request as request,
)
from ledger.caps import CapRefused
from ledger.catalog import RIGHTS
from ledger.errors import LedgerError

log = structlog.get_logger("control")

MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 8
IDLE_TIMEOUT = 30.0  # seconds a client may keep a connection silent
REQUEST_DEADLINE = 5.0
"""Seconds a request may take from its first byte to its newline: a client trickling a
byte at a time cannot hold one of the MAX_CLIENTS slots for longer."""
MAX_ID = 2**63 - 1


class Operator(Protocol):
    """What the control socket serves; :class:`actors.runtime.Node` implements it."""

    def status(self) -> dict[str, Any]: ...
    def caps_list(self, pd: str | None = None) -> list[dict[str, Any]]: ...
    def caps_tree(self) -> list[dict[str, Any]]: ...
    def revoke(self, cap_id: int) -> int: ...
    def mint(self, cap_id: int, rights: list[str], to: str,
             badge: int | None = None) -> int: ...
    def ping(self, pd: str | None = None, cap_id: int | None = None) -> Any: ...
    def net_links(self) -> list[dict[str, Any]]: ...
    def mesh_peer_add(self, **fields: Any) -> dict[str, Any]: ...
    def mesh_peer_remove(self, name: str) -> dict[str, Any]: ...
    def mesh_repair(self) -> list[str]: ...
    def mesh_status(self) -> dict[str, Any]: ...
    def vm(self, op: str, **fields: Any) -> Any: ...
    def pair(self, op: str, **fields: Any) -> Any: ...
    def mesh_member(self, op: str, **fields: Any) -> Any: ...


# ----------------------------------------------------------------- request decoding
def _cap_id(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ID:
        raise ValueError("must be a capability id (an integer >= 0)")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 64:
        raise ValueError("must be a PD name (a string of 1-64 characters)")
    return v


def _rights(v: Any) -> list[str]:
    if (not isinstance(v, list) or not 0 < len(v) <= len(RIGHTS)
            or not all(isinstance(r, str) for r in v)):
        raise ValueError(f"must be a list of rights ({', '.join(RIGHTS)})")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 200:
        raise ValueError("must be a string of 1-200 characters")
    return v


def _wg_key(v: Any) -> bytes:
    try:
        key = base64.b64decode(v, validate=True) if isinstance(v, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("must be a WireGuard key: 32 bytes of base64")
    return key


def _count(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"must be a whole number, {lo}-{hi}")
        return v
    return check


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _seconds(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
        raise ValueError("must be a whole number of seconds, 0-65535")
    return v


FIELDS: dict[str, Callable[[Any], Any]] = {"cap": _cap_id, "badge": _cap_id, "pd": _name,
                                           "to": _name, "rights": _rights, "name": _text,
                                           "wg_key": _wg_key, "endpoint": _text,
                                           "mesh_ip": _text, "role": _text,
                                           "keepalive": _seconds, "profile": _text,
                                           "vcpus": _count(1, 4096),
                                           "ram_mib": _count(1, 1 << 22),
                                           "mib": _count(1, 1 << 22), "start": _flag,
                                           "listen": _text, "peer": _text, "code": _text,
                                           "length": _count(6, 10),
                                           "window": _count(1, 86_400)}
VM_OPS = ("start", "pause", "resume", "stop", "destroy")
COMMANDS: dict[str, tuple[set[str], set[str]]] = {  # command -> (required, optional) fields
    "status": (set(), set()),
    "caps.list": (set(), {"pd"}),
    "caps.tree": (set(), set()),
    "caps.revoke": ({"cap"}, set()),
    "caps.mint": ({"cap", "rights", "to"}, {"badge"}),
    "ping": (set(), {"pd", "cap"}),
    "net.links": (set(), set()),
    "mesh.peer.add": ({"name", "wg_key", "mesh_ip"}, {"endpoint", "role", "keepalive"}),
    "mesh.peer.remove": ({"name"}, set()),
    "mesh.repair": (set(), set()),
    "mesh.status": (set(), set()),
    "vm.create": ({"profile"}, {"name", "vcpus", "ram_mib", "start"}),
    "vm.list": (set(), set()),
    "vm.pool": (set(), set()),
    "vm.balloon": ({"name", "mib"}, set()),
    **{f"vm.{op}": ({"name"}, set()) for op in VM_OPS},
    "pair.start": ({"listen"}, {"length", "window"}),
    "pair.approve": ({"code", "peer"}, {"window"}),
    "pair.status": (set(), set()),
    "mesh.member.remove": ({"name"}, set()),
    "mesh.member.list": (set(), set()),
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise RequestError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise RequestError(f"{name} is not a number this socket accepts")


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """``(command, fields)`` from one request line, or :class:`RequestError` saying why not."""
    if len(line.rstrip(b"\r\n")) > MAX_REQUEST:
        raise RequestError(f"request larger than {MAX_REQUEST} bytes")
    try:
        obj = json.loads(line.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"request is not one JSON object per line: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("a request is a JSON object, e.g. {\"cmd\": \"status\"}")
    cmd = obj.pop("cmd", None)
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise RequestError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    required, optional = COMMANDS[cmd]
    unknown, missing = sorted(set(obj) - required - optional), sorted(required - set(obj))
    if unknown:
        raise RequestError(f"{cmd}: unknown field {unknown[0]!r}; it takes "
                           f"{', '.join(sorted(required | optional)) or 'no fields'}")
    if missing:
        raise RequestError(f"{cmd}: missing field {missing[0]!r}")
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        try:
            fields[key] = FIELDS[key](value)
        except ValueError as exc:
            raise RequestError(f"{cmd}: field {key!r} {exc}") from None
    return cmd, fields


def execute(op: Operator, cmd: str, f: dict[str, Any]) -> Any:
    if cmd == "status":
        return op.status()
    if cmd == "caps.list":
        return op.caps_list(f.get("pd"))
    if cmd == "caps.tree":
        return op.caps_tree()
    if cmd == "caps.revoke":
        return {"cap": f["cap"], "revoked": op.revoke(f["cap"])}
    if cmd == "caps.mint":
        return {"cap": op.mint(f["cap"], f["rights"], f["to"], f.get("badge")),
                "parent": f["cap"]}
    if cmd == "ping":
        return op.ping(f.get("pd"), f.get("cap"))
    if cmd == "net.links":
        return op.net_links()
    if cmd == "mesh.peer.add":
        return op.mesh_peer_add(**f)
    if cmd == "mesh.peer.remove":
        return op.mesh_peer_remove(f["name"])
    if cmd == "mesh.repair":
        return op.mesh_repair()
    if cmd == "mesh.status":
        return op.mesh_status()
    if cmd.startswith("vm."):
        return op.vm(cmd.removeprefix("vm."), **f)
    if cmd.startswith("mesh.member."):
        return op.mesh_member(cmd.removeprefix("mesh.member."), **f)
    if cmd.startswith("pair."):
        return op.pair(cmd.removeprefix("pair."), **f)
    raise RequestError(f"unknown command {cmd!r}")  # COMMANDS and this list disagree


def answer(op: Operator, line: bytes) -> dict[str, Any]:
    """The reply object for one request line; never raises."""
    try:
        cmd, fields = decode_request(line)
        return {"ok": True, "result": execute(op, cmd, fields)}
    except CapRefused as exc:
        return {"ok": False, "error": str(exc), "code": exc.code}
    except (ControlError, LedgerError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug on our side: report it, keep serving
        log.error("control.internal_error", error=repr(exc), exc_info=exc)
        return {"ok": False, "error": f"internal error ({type(exc).__name__}); see the node log"}


# ----------------------------------------------------------------- server
class ControlServer:
    """Serves :class:`Operator` commands on a UNIX socket, one thread per client."""

    def __init__(self, path: Path, operator: Operator) -> None:
        self.path, self._op = path, operator
        self._sock: socket.socket | None = None
        self._inode = 0
        self._stopped = threading.Event()
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="ppn-control",
                                        daemon=True)
        self.bad_requests = 0

    def start(self) -> None:
        self._sock = listen(self.path)
        self._inode = os.stat(self.path).st_ino
        self._thread.start()
        log.info("control.listening", path=str(self.path))

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        with self._lock:
            clients = list(self._clients)
        for conn in clients:  # wakes client threads blocked reading
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:  # only our own socket file: a successor may have bound the path
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("control.accept_failed", error=repr(exc))
                continue
            with self._lock:
                busy = len(self._clients) >= MAX_CLIENTS
                if not busy:
                    self._clients.add(conn)
            if busy:
                with conn, contextlib.suppress(OSError):
                    conn.sendall(encode({"ok": False, "error":
                                         f"too many clients (at most {MAX_CLIENTS})"}))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="ppn-control-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                pending = b""
                while not self._stopped.is_set():
                    line, pending = _read_request(conn, pending)
                    if not line:
                        return
                    if not line.endswith(b"\n"):
                        self.bad_requests += 1
                        problem = (f"request larger than {MAX_REQUEST} bytes"
                                   if len(line) > MAX_REQUEST else
                                   f"request not complete within {REQUEST_DEADLINE:g} s")
                        conn.sendall(encode({"ok": False, "error": problem}))
                        _drain(conn)
                        return  # no way to find the next request's start
                    reply = answer(self._op, line)
                    if not reply["ok"]:
                        self.bad_requests += 1
                        log.info("control.request_refused", error=reply["error"])
                    conn.sendall(encode(reply))
        except OSError as exc:  # client gone, or silent too long
            log.info("control.client_dropped", error=repr(exc))
        finally:
            with self._lock:
                self._clients.discard(conn)


def _read_request(conn: socket.socket, pending: bytes) -> tuple[bytes, bytes]:
    """One request line (with its newline) and what followed it; b"" if the client left
    or stayed silent for IDLE_TIMEOUT; without a newline if it grew past MAX_REQUEST
    or did not end within REQUEST_DEADLINE of its first byte."""
    buf = bytearray(pending)
    deadline = time.monotonic() + REQUEST_DEADLINE if buf else None
    while b"\n" not in buf:
        if len(buf) > MAX_REQUEST:
            return bytes(buf), b""
        left = IDLE_TIMEOUT if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return bytes(buf), b""
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            return bytes(buf), b""
        if not chunk:
            return b"", b""
        if deadline is None:
            deadline = time.monotonic() + REQUEST_DEADLINE
        buf += chunk
    end = buf.index(b"\n") + 1
    return bytes(buf[:end]), bytes(buf[end:])


def _drain(conn: socket.socket, limit: int = 1 << 20) -> None:
    """Before closing on a client whose request was refused unread: discard what it is
    still sending (briefly, boundedly), so that closing does not reset the connection
    before the client has read why."""
    end = time.monotonic() + 1.0
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        got = 0
        while got < limit and time.monotonic() < end:
            conn.settimeout(max(0.01, end - time.monotonic()))
            chunk = conn.recv(65536)
            if not chunk:
                return
            got += len(chunk)


def listen(path: Path) -> socket.socket:
    """Bind ``path`` (mode 0600), replacing a stale socket file but never a live one."""
    if len(os.fsencode(path)) >= 108:
        raise ControlError(f"{path}: path too long for a UNIX socket (max 107 bytes)")
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # the file is born 0600: no window with a wider mode
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.settimeout(0.2)  # the accept loop checks for stop this often
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.info("control.stale_socket_removed", path=str(path))
        return
    except OSError as exc:
        raise ControlError(f"{path}: cannot tell whether a node listens there ({exc})") from None
    finally:
        probe.close()
    raise ControlError(f"{path}: a node is already listening there")


# ----------------------------------------------------------------- client
# ----------------------------------------------------------------- client-side views
def status_lines(st: dict[str, Any]) -> list[str]:
    """A ``status`` result as the operator reads it."""
    lines = [f"node {st['node']} ({st['role']}, {st['mesh_ip'] or 'no mesh address yet'}), "
             f"pid {st['pid']}, "
             f"up {st['uptime']:.1f} s",
             f"ledger: {st['ledger']['size']} records, root {st['ledger']['root']}",
             "protection domains:"]
    lines += [f"  {pd:<18} {info['status']:<8} restarts {info['restarts']}"
              for pd, info in st["pds"].items()]
    detail = "; ".join(f"{pd}: " + ", ".join(f"{code} {n}" for code, n in codes.items())
                       for pd, codes in st["refused"].items())
    lines.append(f"refused: {st['refused_total']}" + (f" ({detail})" if detail else ""))
    lines.append(f"dropped at the receiver: {st['dropped']}, forged deliveries: "
                 f"{st.get('forged', 0)}")
    not_handled = st.get("not_handled") or {}
    if not_handled:
        lines.append("not handled: " + ", ".join(f"{why} {n}" for why, n in not_handled.items()))
    return lines


def cap_label(c: dict[str, Any]) -> str:
    badge = "" if c["badge"] is None else f" badge={c['badge']}"
    return f"#{c['cap']} {c['holder']} {c['object']} {','.join(c['rights'])}{badge}"


def draw_tree(rows: list[dict[str, Any]]) -> list[str]:
    """Pre-order rows (with ``depth`` and ``last``) drawn with box-drawing branches."""
    lines: list[str] = []
    more: list[bool] = []  # per depth: siblings still to come below this line
    for c in rows:
        depth = c["depth"]
        del more[depth:]
        if depth == 0:
            lines.append(cap_label(c))
        else:
            bars = "".join("\u2502  " if m else "   " for m in more[1:depth])
            lines.append(bars + ("\u2514\u2500 " if c["last"] else "\u251c\u2500 ")
                         + cap_label(c))
        more.append(not c["last"])
    return lines
