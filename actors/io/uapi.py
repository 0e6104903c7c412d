"""WireGuard's cross-platform userspace API (UAPI), as wireguard-go serves it.

A UNIX stream socket, ``/var/run/wireguard/<iface>.sock``; a request is ``get=1`` or
``set=1`` followed by ``key=value`` lines and an empty line; the answer is ``key=value``
lines ending in ``errno=N`` and an empty line (keys in hex, not base64).  This module
is the codec (pure functions) and a small blocking client for an adapter's worker
thread.  What comes back from the socket is input from outside: bounded, parsed
strictly, and any fault is a one-line :class:`UapiError`.  The device's private key,
which ``get=1`` returns, is never kept or shown.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from actors.pds.wg_plan import DeviceState, PeerConfig, PeerState

SOCKET_DIR = Path("/var/run/wireguard")
MAX_ANSWER = 1 << 20  # bytes: a device with thousands of peers fits
TIMEOUT = 5.0


class UapiError(Exception):
    """The device did not do what was asked, or answered what cannot be parsed."""


def socket_path(interface: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{interface}.sock"


def encode_set(private_key: bytes | None, listen_port: int | None,
               peers: list[PeerConfig], *, replace_peers: bool = True,
               remove: tuple[bytes, ...] = ()) -> bytes:
    """A ``set=1`` request: the device's key and port, and its peers (all of them, with
    ``replace_peers``), or just ``remove`` these."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={_hex_key(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for key in remove:
        lines += [f"public_key={_hex_key(key)}", "remove=true"]
    for p in peers:
        lines.append(f"public_key={_hex_key(p.public_key)}")
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={ip}" for ip in p.allowed_ips]
    return ("\n".join(lines) + "\n\n").encode()


def _hex_key(key: bytes) -> str:
    if type(key) is not bytes or len(key) != 32:
        raise UapiError("a WireGuard key is 32 bytes")
    return key.hex()


def _key(value: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UapiError(f"{where}: not a 64-digit hex key")
    return key


def _int(value: str, where: str, limit: int = 2**64) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) >= limit:
        raise UapiError(f"{where}: {value[:20]!r} is not a whole number")
    return int(value)


def parse_answer(data: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` lines of an answer, after checking it ends in ``errno=0``."""
    if len(data) > MAX_ANSWER:
        raise UapiError(f"answer larger than {MAX_ANSWER} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError("answer is not ASCII") from None
    if not text.endswith("\n\n"):
        raise UapiError("answer does not end in an empty line (cut short?)")
    pairs = []
    for n, line in enumerate(text[:-2].split("\n"), 1):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiError(f"answer line {n}: not key=value")
        pairs.append((key, value))
    if not pairs or pairs[-1][0] != "errno":
        raise UapiError("answer does not end in errno=N")
    raw = pairs[-1][1]
    errno = -_int(raw[1:], "errno", 2**31) if raw.startswith("-") else _int(raw, "errno", 2**31)
    if errno != 0:
        name = os.strerror(abs(errno)) if abs(errno) < 4096 else "unknown"
        raise UapiError(f"the device refused the request: errno={errno} ({name})")
    return pairs[:-1]


def parse_get(data: bytes) -> DeviceState:
    """A ``get=1`` answer as the device's state (its private key is dropped)."""
    port, has_key = 0, False
    peers: dict[bytes, PeerState] = {}
    current: dict[str, object] | None = None

    def close() -> None:
        if current is not None:
            key = current.pop("public_key")
            assert isinstance(key, bytes)
            peers[key] = PeerState(key, **current)  # type: ignore[arg-type]

    for n, (key, value) in enumerate(parse_answer(data), 1):
        where = f"answer line {n} ({key})"
        if key == "public_key":
            close()
            current = {"public_key": _key(value, where), "allowed_ips": ()}
        elif current is None:
            if key == "private_key":
                has_key = bool(value.strip("0"))
            elif key == "listen_port":
                port = _int(value, where, 65536)
            elif key not in ("fwmark",):
                raise UapiError(f"{where}: not a device key")
        elif key == "endpoint":
            current["endpoint"] = value if value != "(none)" else None
        elif key == "allowed_ip":
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise UapiError(f"{where}: not an IP network") from None
            current["allowed_ips"] = (*current["allowed_ips"], value)  # type: ignore[misc]
        elif key == "persistent_keepalive_interval":
            current["keepalive"] = _int(value, where, 65536)
        elif key == "last_handshake_time_sec":
            current["last_handshake"] = float(_int(value, where))
        elif key == "last_handshake_time_nsec":
            nsec = _int(value, where, 10**9)
            seconds = current.get("last_handshake", 0.0)
            assert isinstance(seconds, float)
            current["last_handshake"] = seconds + nsec / 1e9
        elif key in ("rx_bytes", "tx_bytes"):
            current[key] = _int(value, where)
        elif key not in ("preshared_key", "protocol_version"):
            raise UapiError(f"{where}: not a peer key")
    close()
    return DeviceState(port, has_key, peers)


def request(path: Path, body: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send one request to the UAPI socket at ``path``; its whole answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise UapiError(f"{path}: no UAPI socket (is wireguard-go running?)") from None
        except ConnectionRefusedError:
            raise UapiError(f"{path}: stale UAPI socket (wireguard-go died)") from None
        sock.sendall(body)
        chunks, size = [], 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise UapiError(f"answer larger than {MAX_ANSWER} bytes")
            if b"".join(chunks[-2:]).endswith(b"\n\n"):
                break
        return b"".join(chunks)
    except TimeoutError:
        raise UapiError(f"{path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise UapiError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def get(path: Path, timeout: float = TIMEOUT) -> DeviceState:
    return parse_get(request(path, b"get=1\n\n", timeout))


def set_device(path: Path, body: bytes, timeout: float = TIMEOUT) -> None:
    parse_answer(request(path, body, timeout))
