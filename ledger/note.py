"""C2SP signed notes (Ed25519 only) and C2SP tlog checkpoints.

A signed note is UTF-8 text ending in a newline, a blank line, then one or more
lines ``\u2014 <key name> <base64(key ID || signature)>``.  The signature covers
the text including its final newline.  See c2sp.org/signed-note and
c2sp.org/tlog-checkpoint.

Bytes from outside (notes, verifier keys, checkpoint bodies) that are wrong
raise :class:`NoteError`; bad arguments from our own code raise ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.signing

from ledger.errors import LedgerDataError

__all__ = [
    "ALG_ED25519",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "key_id",
    "open_checkpoint",
    "open_note",
    "sign_checkpoint",
    "sign_note",
    "stated_checkpoint",
    "verifier_key",
]

ALG_ED25519 = 0x01
MAX_NOTE_SIZE = 1 << 20
MAX_SIGNATURES = 100
_MAX_VKEY_LENGTH = 1024
_MAX_TREE_SIZE = (1 << 64) - 1

_SIG_PREFIX = "\u2014 ".encode()
_CONTROL_BYTES = re.compile(rb"[\x00-\x09\x0b-\x1f]")
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")


class NoteError(LedgerDataError):
    """A signed note, verifier key or checkpoint is malformed or fails to verify."""


def _clip(text: str | bytes, limit: int = 40) -> str:
    shown = repr(text[:limit])
    return shown + "..." if len(text) > limit else shown


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "key name must be a non-empty string"
    if "+" in name or any(c.isspace() or ord(c) < 0x20 for c in name):
        return f"key name {_clip(name)} contains a space, '+' or control character"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"key name {_clip(name)} is not valid Unicode"
    return None


def _encoding_problem(data: bytes) -> str | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 at byte {exc.start}"
    bad = _CONTROL_BYTES.search(data)
    if bad is not None:
        return f"control character 0x{bad.group()[0]:02x} at byte {bad.start()}"
    return None


def _text_problem(text: bytes) -> str | None:
    if not isinstance(text, bytes):
        return "text must be bytes"
    if not text.endswith(b"\n"):
        return "text does not end in a newline"
    return _encoding_problem(text)


def _b64decode(encoded: str | bytes) -> bytes | None:
    """Decode strict, canonical standard base64; None if it is anything else."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    expected = encoded.encode("ascii") if isinstance(encoded, str) else encoded
    return raw if base64.b64encode(raw) == expected else None


def key_id(name: str, public_key: bytes) -> bytes:
    """Return the 4-byte key ID: SHA-256(name || 0x0A || 0x01 || public_key)[:4]."""
    problem = _name_problem(name)
    if problem:
        raise ValueError(problem)
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    preimage = name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + public_key
    return hashlib.sha256(preimage).digest()[:4]


def verifier_key(name: str, public_key: bytes) -> str:
    """Return the verifier key string ``name+hhhhhhhh+base64(0x01 || public_key)``."""
    ident = key_id(name, public_key)
    encoded = base64.b64encode(bytes([ALG_ED25519]) + public_key).decode("ascii")
    return f"{name}+{ident.hex()}+{encoded}"


class NoteVerifier:
    """An Ed25519 note verifier for one (name, public key)."""

    __slots__ = ("_verify_key", "key_id", "name", "public_key")

    def __init__(self, name: str, public_key: bytes) -> None:
        self.key_id: bytes = key_id(name, public_key)
        self.name: str = name
        self.public_key: bytes = public_key
        self._verify_key = nacl.signing.VerifyKey(public_key)

    @classmethod
    def from_string(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key string; NoteError if it is not exactly well formed."""
        if not isinstance(vkey, str) or len(vkey) > _MAX_VKEY_LENGTH:
            raise NoteError("malformed verifier key: not a string of sane length")
        name, _, rest = vkey.partition("+")
        ident_hex, sep, key_b64 = rest.partition("+")
        problem = _name_problem(name)
        if problem or not sep:
            raise NoteError(f"malformed verifier key {_clip(vkey)}: {problem or 'missing +'}")
        if not _KEY_ID_HEX.fullmatch(ident_hex):
            raise NoteError(f"malformed verifier key {_clip(vkey)}: key ID is not 8 hex digits")
        raw = _b64decode(key_b64)
        if raw is None:
            raise NoteError(f"malformed verifier key {_clip(vkey)}: bad base64")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError(f"verifier key {_clip(vkey)} is not an Ed25519 (0x01) key")
        verifier = cls(name, raw[1:])
        if verifier.key_id.hex() != ident_hex:
            raise NoteError(
                f"verifier key {_clip(vkey)}: key ID {ident_hex} does not match "
                f"the key ({verifier.key_id.hex()})"
            )
        return verifier

    def verify(self, text: bytes, sig: bytes) -> bool:
        """Report whether ``sig`` (64 raw bytes, no key ID) signs ``text``."""
        if len(sig) != 64:
            return False
        try:
            self._verify_key.verify(text, sig)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def __str__(self) -> str:
        return verifier_key(self.name, self.public_key)

    def __repr__(self) -> str:
        return f"NoteVerifier.from_string({str(self)!r})"


class NoteSigner:
    """Signs notes as ``name`` with an Ed25519 key."""

    __slots__ = ("_public_key", "_secret", "key_id", "name")

    def __init__(self, name: str, signing_key: nacl.signing.SigningKey) -> None:
        self._public_key = bytes(signing_key.verify_key)
        self.key_id: bytes = key_id(name, self._public_key)
        self.name: str = name
        # libsodium's 64-byte secret key, so signing is one C call (a checkpoint per batch).
        self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(signing_key))[1]

    def verifier(self) -> NoteVerifier:
        """Return the matching verifier."""
        return NoteVerifier(self.name, self._public_key)

    def sign(self, text: bytes) -> bytes:
        """Return the signature blob: key ID (4 bytes) || Ed25519 signature (64 bytes)."""
        signed: bytes = nacl.bindings.crypto_sign(text, self._secret)
        return self.key_id + signed[:64]

    def lone_note(self, text: bytes) -> bytes:
        """``text`` signed by this signer alone, as :func:`sign_note` would make it.

        For text this process built from checked parts (a writer's checkpoints, one
        per commit): it is not re-checked.
        """
        blob = base64.b64encode(self.sign(text))
        return b"".join((text, b"\n", _SIG_PREFIX, self.name.encode(), b" ", blob, b"\n"))

    def __repr__(self) -> str:
        return f"NoteSigner(name={self.name!r}, key_id={self.key_id.hex()})"


def sign_note(text: bytes, signers: Sequence[NoteSigner]) -> bytes:
    """Return the signed note: text, blank line, one signature line per signer."""
    problem = _text_problem(text)
    if problem:
        raise ValueError(f"cannot sign note: {problem}")
    return _assemble(text, signers)


def _assemble(text: bytes, signers: Sequence[NoteSigner]) -> bytes:
    if not signers or len(signers) > MAX_SIGNATURES:
        raise ValueError(f"a note needs 1..{MAX_SIGNATURES} signers, got {len(signers)}")
    seen: set[tuple[str, bytes]] = set()
    lines = [text, b"\n"]
    for signer in signers:
        if (signer.name, signer.key_id) in seen:
            raise ValueError(f"duplicate signer {signer!r}")
        seen.add((signer.name, signer.key_id))
        blob = base64.b64encode(signer.sign(text))
        lines.append(_SIG_PREFIX + signer.name.encode("utf-8") + b" " + blob + b"\n")
    note = b"".join(lines)
    if len(note) > MAX_NOTE_SIZE:
        raise ValueError(f"signed note would be {len(note)} bytes, over {MAX_NOTE_SIZE}")
    return note


def _parse_signature_line(number: int, line: bytes) -> tuple[str, bytes, bytes]:
    """Return (name, key ID, signature) of one signature line."""
    if not line.startswith(_SIG_PREFIX):
        raise NoteError(
            f"malformed note: signature line {number} does not start with an em dash and a space"
        )
    name, sep, encoded = line[len(_SIG_PREFIX) :].decode("utf-8").partition(" ")
    problem = _name_problem(name)
    if problem or not sep:
        raise NoteError(f"malformed note: signature line {number}: {problem or 'no signature'}")
    raw = _b64decode(encoded)
    if raw is None:
        raise NoteError(f"malformed note: signature line {number}: bad base64")
    if len(raw) < 5:
        raise NoteError(f"malformed note: signature line {number}: signature too short")
    return name, raw[:4], raw[4:]


def _split_note(note: bytes) -> tuple[bytes, list[tuple[str, bytes, bytes]]]:
    """Strictly parse a signed note into its text and signature lines."""
    if not isinstance(note, bytes):
        raise NoteError("malformed note: not bytes")
    if len(note) > MAX_NOTE_SIZE:
        raise NoteError(f"note is {len(note)} bytes, over the {MAX_NOTE_SIZE}-byte limit")
    problem = _encoding_problem(note)
    if problem:
        raise NoteError(f"malformed note: {problem}")
    split = note.rfind(b"\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line between text and signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block:
        raise NoteError("malformed note: no signature lines")
    if not block.endswith(b"\n"):
        raise NoteError("malformed note: data after the last signature line")
    if block.count(b"\n") > MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    lines = block[:-1].split(b"\n")
    return text, [_parse_signature_line(n, line) for n, line in enumerate(lines, 1)]


def _index_verifiers(verifiers: Sequence[NoteVerifier]) -> dict[tuple[str, bytes], NoteVerifier]:
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        ident = (verifier.name, verifier.key_id)
        other = known.setdefault(ident, verifier)
        if other.public_key != verifier.public_key:
            raise ValueError(f"two verifiers share name and key ID: {other!r}, {verifier!r}")
    return known


def open_note(note: bytes, verifiers: Sequence[NoteVerifier]) -> tuple[bytes, list[str]]:
    """Verify ``note``; return its text and the names of the verifiers that signed it.

    Signatures from unknown keys are ignored.  A signature from a known key
    (same name and key ID) that fails to verify rejects the whole note, and so
    does a note with no valid signature from a known key.
    """
    known = _index_verifiers(verifiers)
    text, signatures = _split_note(note)
    verified: list[str] = []
    for name, ident, sig in signatures:
        verifier = known.get((name, ident))
        if verifier is None:
            continue
        if not verifier.verify(text, sig):
            raise NoteError(f"bad signature for key {name}+{ident.hex()}")
        if name not in verified:
            verified.append(name)
    if not verified:
        seen = ", ".join(sorted({f"{n}+{i.hex()}" for n, i, _ in signatures}))
        raise NoteError(f"note has no signature from a known key (signed by: {seen})")
    return text, verified


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint body: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = _checkpoint_problem(self)
        if problem:
            raise ValueError(f"invalid checkpoint: {problem}")

    def body(self) -> bytes:
        """Return the note text: one line each for origin, size, root, extensions."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        lines = [self.origin, str(self.size), root, *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def parse(cls, text: bytes) -> Checkpoint:
        """Strictly parse a checkpoint body; NoteError if it is malformed."""
        problem = _text_problem(text) if len(text) <= MAX_NOTE_SIZE else "too long"
        if problem:
            raise NoteError(f"malformed checkpoint: {problem}")
        lines = text.decode("utf-8")[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError(f"malformed checkpoint: {len(lines)} lines, need at least 3")
        if "" in lines:
            raise NoteError(f"malformed checkpoint: line {lines.index('') + 1} is empty")
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text) or int(size_text) > _MAX_TREE_SIZE:
            raise NoteError(f"malformed checkpoint: bad tree size {_clip(size_text)}")
        root = _b64decode(root_text)
        if root is None or len(root) != 32:
            raise NoteError(f"malformed checkpoint: root {_clip(root_text)} is not a base64 hash")
        try:
            return cls(origin, int(size_text), root, tuple(extensions))
        except ValueError as exc:  # cannot happen after the checks above
            raise NoteError(f"malformed checkpoint: {exc}") from exc


def _checkpoint_problem(cp: Checkpoint) -> str | None:
    lines = [cp.origin, *cp.extensions] if isinstance(cp.extensions, tuple) else None
    if lines is None or not all(isinstance(line, str) and line for line in lines):
        return "origin and extension lines must be non-empty strings"
    for line in lines:
        if "\n" in line or _encoding_problem(line.encode("utf-8", "surrogatepass")):
            return f"line {_clip(line)} has a newline, control character or bad Unicode"
    if isinstance(cp.size, bool) or not isinstance(cp.size, int):
        return "size must be an int"
    if not 0 <= cp.size <= _MAX_TREE_SIZE:
        return f"size {cp.size} outside 0..2**64-1"
    if not isinstance(cp.root_hash, bytes) or len(cp.root_hash) != 32:
        return "root hash must be 32 bytes"
    return None


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner) -> bytes:
    """Return ``cp`` as a note signed by ``signer``.

    The text needs no re-checking: a Checkpoint validated its fields when it was made.
    """
    return _assemble(cp.body(), [signer])


def checkpoint_text(origin: str, size: int, root_hash: bytes) -> bytes:
    """The body :meth:`Checkpoint.body` gives for a checkpoint without extensions,
    unchecked (for readers comparing a stored note with what they computed)."""
    return f"{origin}\n{size}\n{base64.b64encode(root_hash).decode()}\n".encode()


def lone_signature(note: bytes, text: bytes, verifier: NoteVerifier) -> bytes | None:
    """The signature of a note shaped exactly as :func:`sign_checkpoint` writes it for
    ``verifier``: ``text``, a blank line and one signature line by that key.

    Returns the raw 64-byte signature *unverified*, or None for a note shaped any
    other way -- which :func:`open_note` then reads in full (and says what is wrong).
    """
    head = b"".join((text, b"\n", _SIG_PREFIX, verifier.name.encode(), b" "))
    if len(note) != len(head) + 93 or not note.startswith(head) or note[-1] != 0x0A:
        return None
    raw = _b64decode(note[len(head):-1])
    if raw is None or len(raw) != 68 or raw[:4] != verifier.key_id:
        return None
    return raw[4:]


def open_checkpoint(note: bytes, verifier: NoteVerifier) -> Checkpoint:
    """Verify ``note`` with ``verifier`` (others' signatures ignored) and parse it."""
    text, _ = open_note(note, [verifier])
    return Checkpoint.parse(text)


def stated_checkpoint(note: bytes) -> Checkpoint | None:
    """What a checkpoint note's text says, unauthenticated (None if it says nothing
    readable): for a reader that checks the signature elsewhere, or not at all."""
    try:
        return Checkpoint.parse(note[:note.rfind(b"\n\n") + 1])
    except NoteError:
        return None
