"""The UAPI codec and client (issue 9, first part): against a real wireguard-go in a
network namespace this test makes (prefix ``ppn9u``), and against a fake one that
answers nonsense.  Every fault is one line of :class:`UapiError`, never a crash."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.io import uapi

KEY = bytes(range(32))


def test_encode_set_is_the_spec_in_hex() -> None:
    body = uapi.encode_set(KEY, 51820, [uapi.PeerConfig(KEY[::-1], "192.0.2.1:51820",
                                                        ("10.8.0.0/24",), 25)])
    assert body == (f"set=1\nprivate_key={KEY.hex()}\nlisten_port=51820\nreplace_peers=true\n"
                    f"public_key={KEY[::-1].hex()}\nendpoint=192.0.2.1:51820\n"
                    "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
                    "allowed_ip=10.8.0.0/24\n\n").encode()
    with pytest.raises(uapi.UapiError, match="32 bytes"):
        uapi.encode_set(b"short", None, [])


def test_parse_get_keeps_no_private_key() -> None:
    answer = (f"private_key={KEY.hex()}\nlisten_port=51820\npublic_key={KEY[::-1].hex()}\n"
              "endpoint=192.0.2.1:51820\nlast_handshake_time_sec=1700000000\n"
              "last_handshake_time_nsec=500000000\ntx_bytes=10\nrx_bytes=20\n"
              "persistent_keepalive_interval=25\nallowed_ip=10.8.0.0/24\n"
              "protocol_version=1\nerrno=0\n\n").encode()
    st = uapi.parse_get(answer)
    assert st.listen_port == 51820 and st.public_key_set
    assert st.peers == {KEY[::-1]: uapi.PeerState(KEY[::-1], "192.0.2.1:51820",
                                                  ("10.8.0.0/24",), 25, 1700000000.5, 20, 10)}
    assert KEY.hex() not in repr(st) and KEY not in repr(st).encode()


@pytest.mark.parametrize(("answer", "needle"), [
    (b"errno=-22\n\n", "errno=-22 (Invalid argument)"),
    (b"errno=1\n\n", "errno=1"),
    (b"listen_port=1\n", "cut short"),
    (b"listen_port=1\n\n", "does not end in errno"),
    (b"\xff=1\nerrno=0\n\n", "not ASCII"),
    (b"nonsense\nerrno=0\n\n", "not key=value"),
    (b"listen_port=99999\nerrno=0\n\n", "not a whole number"),
    (b"public_key=zz\nerrno=0\n\n", "not a 64-digit hex key"),
    (f"public_key={KEY.hex()}\nallowed_ip=banana\nerrno=0\n\n".encode(), "not an IP network"),
    (f"public_key={KEY.hex()}\ncolour=red\nerrno=0\n\n".encode(), "not a peer key"),
    (b"colour=red\nerrno=0\n\n", "not a device key"),
    (b"x" * (uapi.MAX_ANSWER + 1), "larger than"),
])
def test_bad_answers_are_one_line_errors(answer: bytes, needle: str) -> None:
    with pytest.raises(uapi.UapiError) as err:
        uapi.parse_get(answer)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A UNIX socket that answers each connection with the next canned reply."""
    path = tmp_path / "fake.sock"
    replies: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                if replies:
                    reply = replies.pop(0)
                    if reply == b"HANG":
                        time.sleep(1.5)
                    else:
                        conn.sendall(reply)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, replies
    stop.set()
    t.join(2)
    server.close()


def test_a_fake_device_answering_nonsense_is_a_one_line_error(
        fake: tuple[Path, list[bytes]]) -> None:
    path, replies = fake
    replies += [b"\xff\xfegarbage\n\n", b"", b"HANG", b"errno=0\n\n"]
    for needle in ("not ASCII", "cut short", "no answer within"):
        with pytest.raises(uapi.UapiError, match=needle):
            uapi.get(path, timeout=0.5)
    uapi.set_device(path, b"set=1\n\n")  # and a sound answer still works after
    with pytest.raises(uapi.UapiError, match="no UAPI socket"):
        uapi.get(path.with_name("none.sock"))


NS = f"ppn9u{os.getpid() % 10000}"
IFACE = f"ppn9u{os.getpid() % 10000}"


@pytest.fixture
def device() -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    if os.geteuid() != 0 or not shutil.which("wireguard-go") or not shutil.which("ip"):
        pytest.skip("needs root, wireguard-go and iproute2")
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    path = uapi.socket_path(IFACE)
    proc = subprocess.Popen(["ip", "netns", "exec", NS, "wireguard-go", "-f", IFACE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no UAPI socket"
            time.sleep(0.02)
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {IFACE}"], capture_output=True)
        path.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.mark.real
def test_set_and_get_against_real_wireguard_go(
        device: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, path = device
    peers = [uapi.PeerConfig(os.urandom(32), "192.0.2.9:51820", ("10.8.0.2/32",), 25),
             uapi.PeerConfig(os.urandom(32), None, ("10.8.0.0/24",), 0)]
    private = os.urandom(32)
    uapi.set_device(path, uapi.encode_set(private, 51911, peers))
    st = uapi.get(path)
    assert st.listen_port == 51911 and st.public_key_set
    assert {k: (p.endpoint, p.allowed_ips, p.keepalive) for k, p in st.peers.items()} == {
        p.public_key: (p.endpoint, p.allowed_ips, p.keepalive) for p in peers}
    dump = subprocess.run(["ip", "netns", "exec", NS, "wg", "show", IFACE, "dump"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    listed = {base64.b64decode(line.split("\t")[0]) for line in dump[1:]}
    assert listed == {p.public_key for p in peers}
    with pytest.raises(uapi.UapiError, match="errno=-"):  # the device refuses nonsense
        uapi.set_device(path, b"set=1\nlisten_port=notaport\n\n")
    uapi.set_device(path, uapi.encode_set(None, None, [], replace_peers=False,
                                          remove=(peers[0].public_key,)))
    assert set(uapi.get(path).peers) == {peers[1].public_key}
    # kill -9 leaves the socket file behind: a stale socket is a one-line error.
    os.kill(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", f"wireguard-go -f {IFACE}"], capture_output=True)
    proc.wait(5)
    deadline = time.monotonic() + 5
    while True:
        try:
            uapi.get(path, timeout=1)
        except uapi.UapiError as exc:
            assert "stale UAPI socket" in str(exc) or "no UAPI socket" in str(exc)
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
