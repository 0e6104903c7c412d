"""The node's secret keys, in files of mode 0600 beside (never inside) the ledger.

``node.key`` holds the Ed25519 identity key that signs checkpoints, snapshots and
capability grants; ``wireguard.key`` holds the WireGuard (X25519) private key in
the base64 form ``wg`` uses.  Neither key's secret half is ever put in a record,
a log line, an error message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

import nacl.bindings
import nacl.public
import nacl.signing

from ledger.errors import LedgerDataError, LedgerUsageError
from ledger.files import FileProblem, open_regular, read_at_most

NODE_KEY_FILE = "node.key"
WIREGUARD_KEY_FILE = "wireguard.key"
_NODE_KEY_TAG = "ppn-ed25519-seed-v1"


class KeyFileError(LedgerDataError):
    """A key file is missing, malformed or readable by others (its content is never shown)."""


class NodeKeys:
    """The secret keys of one node.  Its ``repr`` shows public halves only."""

    __slots__ = ("_secret", "_signing", "_wireguard")

    def __init__(self, signing: nacl.signing.SigningKey, wireguard: nacl.public.PrivateKey):
        self._signing = signing
        self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(signing))[1]
        self._wireguard = wireguard

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKeys:
        """Keys derived from a 32-byte seed: for the simulator, where a seed fixes a run."""
        if len(seed) != 32:
            raise LedgerUsageError("a key seed is 32 bytes")
        wg = hashlib.sha256(b"ppn/wireguard-key-from-seed\x00" + seed).digest()
        return cls(nacl.signing.SigningKey(seed), nacl.public.PrivateKey(wg))

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return self._signing

    @property
    def public_key(self) -> bytes:
        """The Ed25519 public key (32 bytes)."""
        return bytes(self._signing.verify_key)

    @property
    def wg_public_key(self) -> bytes:
        return bytes(self._wireguard.public_key)

    def wg_private_key_b64(self) -> str:
        """The WireGuard private key as ``wg`` reads it; for the WireGuard adapter only."""
        return base64.b64encode(bytes(self._wireguard)).decode()

    def sign(self, message: bytes) -> bytes:
        """A detached Ed25519 signature (64 bytes)."""
        signed: bytes = nacl.bindings.crypto_sign(message, self._secret)
        return signed[:64]

    def __repr__(self) -> str:
        return (f"NodeKeys(ed25519={base64.b64encode(self.public_key).decode()}, "
                f"wireguard={base64.b64encode(self.wg_public_key).decode()})")

    def save(self, state_dir: Path) -> None:
        """Write both key files with mode 0600; refuses to overwrite existing ones."""
        seed = base64.b64encode(bytes(self._signing)).decode()
        _write_secret(state_dir / NODE_KEY_FILE, f"{_NODE_KEY_TAG} {seed}\n")
        _write_secret(state_dir / WIREGUARD_KEY_FILE, self.wg_private_key_b64() + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> NodeKeys:
        node_line = _read_secret(state_dir / NODE_KEY_FILE)
        tag, _, seed_b64 = node_line.partition(" ")
        if tag != _NODE_KEY_TAG:
            raise KeyFileError(f"{state_dir / NODE_KEY_FILE}: not a {_NODE_KEY_TAG} key file")
        seed = _b64_32(seed_b64, state_dir / NODE_KEY_FILE)
        wg = _b64_32(_read_secret(state_dir / WIREGUARD_KEY_FILE), state_dir / WIREGUARD_KEY_FILE)
        return cls(nacl.signing.SigningKey(seed), nacl.public.PrivateKey(wg))


def _b64_32(text: str, path: Path) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{path}: key is not 32 bytes of base64")
    return raw


def _write_secret(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LedgerUsageError(f"{path} exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_secret(path: Path) -> str:
    """A key file's text: a regular file (a FIFO would block), private, small, ASCII."""
    if not os.path.lexists(path):
        raise KeyFileError(f"{path}: key file not found")
    try:
        fd = open_regular(path)
    except FileProblem as exc:
        raise KeyFileError(f"{path}: {exc.reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{path}: mode {stat.S_IMODE(mode):04o} lets others read "
                               f"the key; run: chmod 600 {path}")
        try:
            data = read_at_most(fd, path, 4096, "a key file")
        except FileProblem:
            raise KeyFileError(f"{path}: too large for a key file") from None
    finally:
        os.close(fd)
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not an ASCII key file") from None
