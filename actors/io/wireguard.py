"""The WireGuard backend's real adapters: its process (pd-net-driver's) and its device
configuration over UAPI (pd-wireguard's).

The backend is a row of :data:`BACKENDS`; this machine's kernel has no WireGuard, so
``wireguard-go`` is the one implemented.  Kernel WireGuard (pyroute2's netlink
``WireGuard``, for Ubuntu hosts) and NetBSD's wg(4) are one more row each: a way to
make the device, and a way to read and set it.

* :class:`TunnelProcesses` (used by pd-net-driver's adapter): adopts a device whose
  UAPI socket answers, else removes a stale socket and starts ``wireguard-go -f``
  (in the node's own network namespace, in its own session so that the node's
  signals do not reach it), waits for the socket to answer, and reports an exit
  unasked; it configures the link through pyroute2 (address, up, forwarding).
* :class:`DeviceAdapter` (pd-wireguard's): ``get=1`` and ``set=1`` over UAPI, reading
  the private key from the node's 0600 key file when it sets it; the key never leaves
  this module.
"""

from __future__ import annotations

import base64
import ipaddress
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from actors.io import uapi
from actors.io.base import Emit, WorkerAdapter
from actors.pds.base import IoAnswer, IoFailure, IoRequest, IoResult
from actors.pds.pd_net_driver import TunnelExited
from actors.pds.pd_wireguard import GetDevice, SetDevice
from ledger.keys import WIREGUARD_KEY_FILE

log = structlog.get_logger("wireguard")

START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[], bool]
    command: Callable[[str], list[str]]


BACKENDS: dict[str, Backend] = {
    "wireguard-go": Backend("wireguard-go", lambda: shutil.which("wireguard-go") is not None,
                            lambda iface: ["wireguard-go", "-f", iface]),
}
"""How each backend makes a device.  (Kernel WireGuard and NetBSD's wg(4): one row each.)"""


def choose_backend() -> Backend:
    for backend in BACKENDS.values():
        if backend.available():
            return backend
    raise RuntimeError(f"no WireGuard backend on this host (tried {', '.join(BACKENDS)})")


class TunnelProcesses:
    """The backend's processes, one per interface, supervised (exits reported)."""

    def __init__(self, socket_dir: Path = uapi.SOCKET_DIR) -> None:
        self.socket_dir = socket_dir
        self.emit: Emit = lambda event: None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._closed = threading.Event()

    def start(self, iface: str) -> dict[str, Any]:
        path = uapi.socket_path(iface, self.socket_dir)
        try:
            uapi.get(path, timeout=1.0)
        except uapi.UapiError:
            pass
        else:
            self._watch_adopted(iface, path)
            return {"interface": iface, "adopted": True}
        path.unlink(missing_ok=True)  # a stale socket (kill -9 leaves one behind)
        backend = choose_backend()
        proc = subprocess.Popen(backend.command(iface), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        last = "no UAPI socket"
        while True:
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                raise RuntimeError(f"{backend.name} {iface} exited at once ({proc.returncode})"
                                   f": {' '.join(err.split())[:200]}")
            try:
                uapi.get(path, timeout=1.0)
                break
            except uapi.UapiError as exc:
                last = str(exc)
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait(5)
                    raise RuntimeError(f"{backend.name} {iface}: not ready within "
                                       f"{START_TIMEOUT:g} s ({last})") from None
                time.sleep(0.002)  # wireguard-go is ready within ~10 ms
        self._procs[iface] = proc
        threading.Thread(target=self._wait, args=(iface, proc), daemon=True,
                         name=f"ppn-wg-{iface}").start()
        return {"interface": iface, "adopted": False, "pid": proc.pid}

    def _wait(self, iface: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if proc.stderr:
            proc.stderr.close()
        if not self._closed.is_set() and self._procs.get(iface) is proc:
            log.warning("wireguard.exited", interface=iface, returncode=code)
            self.emit(TunnelExited(iface, code))

    def _watch_adopted(self, iface: str, path: Path) -> None:
        """An adopted device is not our child: its socket is watched instead."""
        def watch() -> None:
            while not self._closed.wait(0.5):
                try:
                    uapi.get(path, timeout=1.0)
                except uapi.UapiError:
                    log.warning("wireguard.adopted_gone", interface=iface)
                    self.emit(TunnelExited(iface, -1))
                    return
        self._procs.pop(iface, None)
        threading.Thread(target=watch, daemon=True, name=f"ppn-wg-watch-{iface}").start()

    def close(self) -> None:
        """Stop watching; the devices stay up (a restarted node adopts them)."""
        self._closed.set()


def configure_link(ipr: Any, iface: str, address: str, forwarding: bool) -> dict[str, Any]:
    """Address, up, forwarding: through pyroute2 and /proc/sys, never ``ip``."""
    found = ipr.link_lookup(ifname=iface)
    if not found:
        raise RuntimeError(f"no link {iface}")
    index = found[0]
    net = ipaddress.IPv4Interface(address)
    have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)
            if a["family"] == 2}
    changed = []
    for ip, plen in sorted(have - {(str(net.ip), net.network.prefixlen)}):
        ipr.addr("del", index=index, address=ip, prefixlen=plen)
        changed.append(f"removed {ip}/{plen}")
    if (str(net.ip), net.network.prefixlen) not in have:
        ipr.addr("add", index=index, address=str(net.ip), prefixlen=net.network.prefixlen)
        changed.append(f"added {address}")
    link = ipr.get_links(index)[0]
    if not link["flags"] & 1:  # IFF_UP
        ipr.link("set", index=index, state="up")
        changed.append("brought up")
    mesh = str(net.network)
    routes = [r for r in ipr.get_routes(family=2, table=254)
              if r.get_attr("RTA_OIF") == index and r["dst_len"] == net.network.prefixlen
              and r.get_attr("RTA_DST") == str(net.network.network_address)]
    if not routes:
        ipr.route("add", dst=mesh, oif=index)
        changed.append(f"route {mesh} added")
    if forwarding:
        for key, value in (("net/ipv4/ip_forward", "1"),
                           ("net/ipv4/conf/all/send_redirects", "0"),
                           (f"net/ipv4/conf/{iface}/send_redirects", "0")):
            Path("/proc/sys", key).write_text(value)
    return {"interface": iface, "address": address, "changed": changed}


class DeviceAdapter(WorkerAdapter):
    """pd-wireguard's adapter: the device over UAPI."""

    name = "uapi"

    def __init__(self, state_dir: Path, socket_dir: Path = uapi.SOCKET_DIR) -> None:
        self._state_dir, self._socket_dir = state_dir, socket_dir
        super().__init__()

    def _private_key(self) -> bytes:
        text = (self._state_dir / WIREGUARD_KEY_FILE).read_text().strip()
        key = base64.b64decode(text, validate=True)
        if len(key) != 32:
            raise RuntimeError(f"{WIREGUARD_KEY_FILE}: not a WireGuard private key")
        return key

    def perform(self, request: IoRequest) -> IoAnswer:
        if type(request) is GetDevice:
            st = uapi.get(uapi.socket_path(request.interface, self._socket_dir))
            return IoResult(request.request_id, {"device": st})
        if type(request) is SetDevice:
            key = self._private_key() if request.set_key else None
            body = uapi.encode_set(key, request.listen_port, list(request.peers))
            uapi.set_device(uapi.socket_path(request.interface, self._socket_dir), body)
            return IoResult(request.request_id, {"set": len(request.peers)})
        return IoFailure(request.request_id, f"uapi: no such request {type(request).__name__}")
