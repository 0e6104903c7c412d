"""Strict reading and checking of the proofs ``ppn ledger prove`` writes.

A proof file comes from outside, so every way it can be wrong must end in one
:class:`LedgerDataError` that says what is wrong -- never a ``RecursionError``
from deep nesting, an ``OverflowError`` from ``1e400`` or a ``KeyError`` from a
missing field.  The cause of those was reading the proof with plain
``json.loads`` and trusting its shape; here the bytes are read bounded and
without blocking, parsed by a JSON reader that yields only objects, lists,
strings and bounded integers (no floats, no NaN, no depth beyond a few levels),
and checked against the exact schema of :func:`ledger.audit.prove_inclusion` /
:func:`ledger.audit.prove_consistency` before any hash is computed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import merkle
from ledger.errors import LedgerDataError, LedgerUsageError
from ledger.files import FileProblem, open_regular, read_at_most
from ledger.note import Checkpoint, NoteError, NoteVerifier, open_checkpoint

__all__ = ["MAX_DEPTH", "MAX_INPUT_SIZE", "MAX_PROOF_HASHES", "check_proof", "parse_proof",
           "read_input"]

MAX_INPUT_SIZE = 1 << 20
MAX_DEPTH = 8  # a proof is an object holding one list: depth 2
MAX_PROOF_HASHES = 64  # trees have fewer than 2**63 leaves
_INT_LIMIT = 1 << 63
_INT_CHARS = 20  # "-" and 19 digits: enough for any int64, far below int()'s digit limit
_MAX_ORIGIN = 1024
_HASH_HEX = re.compile(r"[0-9a-f]{64}")
_BYTES_HEX = re.compile(r"(?:[0-9a-f]{2})*")
# A whole JSON string (skipped), a lone quote (an unterminated string), or a bracket.
_TOKEN = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|(")|([\[{])|([\]}])', re.DOTALL)
_FIELDS = {
    "inclusion": ({"kind", "origin", "leaf_index", "tree_size", "leaf_hash", "proof"},
                  {"record"}),
    "consistency": ({"kind", "origin", "old_size", "new_size", "proof"}, set()),
}
_KINDS = ", ".join(repr(k) for k in _FIELDS)

class _Refusal(Exception):
    """Raised inside the JSON reader; :func:`parse_proof` adds the source name."""


@dataclass(frozen=True)
class _Refused:
    """A JSON number the reader would not turn into a Python number.

    Kept as a value rather than raised so that the schema check can name the
    field that held it (``leaf_index must be ..., got a number 1e400``).
    """

    what: str
    text: str


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _describe(value: object) -> str:
    """Name a parsed JSON value for an error message, on one bounded line."""
    if isinstance(value, _Refused):
        return f"{value.what} {_clip(value.text)}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true, false, null
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, str):
        return f"a string {value[:40]!r}{'...' if len(value) > 40 else ''} " \
               f"of {len(value)} characters"
    return f"a list of length {len(value)}" if isinstance(value, list) else "an object"


def _json_int(text: str) -> int | _Refused:
    # Length first: int() of a 5000-digit literal raises ValueError (the int-digits limit).
    return int(text) if len(text) <= _INT_CHARS else _Refused("an integer", text)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicate field would let two readers of one file see two different proofs.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refusal(f"duplicate field {key!r}")
        obj[key] = value
    return obj


def _depth_problem(text: str) -> str | None:
    """Find nesting deeper than MAX_DEPTH in one linear pass, before json.loads recurses."""
    depth = 0
    for m in _TOKEN.finditer(text):
        if m.lastindex == 2:
            return None  # an unterminated string: json.loads says so
        if m.lastindex == 3:
            depth += 1
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels (at character {m.start()})"
        elif m.lastindex == 4:
            depth -= 1
    return None


def _loads(data: bytes) -> object:
    """Parse JSON to dicts, lists, strs, ints and _Refused; _Refusal if it cannot."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refusal(f"not a JSON proof: not valid UTF-8 at byte {exc.start}") from None
    problem = _depth_problem(text)
    if problem:
        raise _Refusal(f"not a JSON proof: {problem}")
    try:
        return json.loads(text, parse_int=_json_int, object_pairs_hook=_json_object,
                          parse_float=lambda t: _Refused("a number", t),
                          parse_constant=lambda t: _Refused("a number", t))
    except json.JSONDecodeError as exc:
        raise _Refusal(f"not a JSON proof: {exc.msg} (line {exc.lineno}, column "
                       f"{exc.colno})") from None
    except (RecursionError, ValueError) as exc:  # neither should get past the checks above
        raise _Refusal(f"not a JSON proof: {type(exc).__name__}: {_clip(str(exc))}") from None


def _is_origin(value: object) -> bool:
    # The rule a checkpoint origin obeys: no control characters, valid Unicode.
    return isinstance(value, str) and 0 < len(value) <= _MAX_ORIGIN and not any(
        ord(c) < 0x20 or 0xD800 <= ord(c) < 0xE000 for c in value)


def _matches(pattern: re.Pattern[str]) -> Callable[[object], bool]:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _is_int63(value: object) -> bool:
    return type(value) is int and 0 <= value < _INT_LIMIT  # type() also refuses bools


_INT_RULE = (_is_int63, "an integer 0 <= n < 2**63")
_HASH_RULE = (_matches(_HASH_HEX), "64 lowercase hex digits")
_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "kind": (lambda v: isinstance(v, str) and v in _FIELDS, f"one of {_KINDS}"),
    "origin": (_is_origin, "a non-empty string without control characters"),
    "leaf_index": _INT_RULE, "tree_size": _INT_RULE, "old_size": _INT_RULE,
    "new_size": _INT_RULE, "leaf_hash": _HASH_RULE,
    "record": (_matches(_BYTES_HEX), "lowercase hex, two digits a byte"),
    "proof": (lambda v: isinstance(v, list) and len(v) <= MAX_PROOF_HASHES,
              f"a list of at most {MAX_PROOF_HASHES} hashes"),
}


def _field_problem(field: str, value: object, rule: str | None = None) -> str | None:
    test, expected = _RULES[rule or field]
    return None if test(value) else f"{field} must be {expected}, got {_describe(value)}"


def _schema_problem(obj: object) -> str | None:
    """What is wrong with a parsed proof, first problem only; None if nothing."""
    if not isinstance(obj, dict):
        return f"not a JSON proof object, got {_describe(obj)}"
    if "kind" not in obj:
        return "missing field 'kind'"
    kind_problem = _field_problem("kind", obj["kind"])
    if kind_problem:
        return kind_problem
    required, optional = _FIELDS[obj["kind"]]
    missing = sorted(required - obj.keys())
    unknown = sorted(repr(_clip(str(k))) for k in obj.keys() - required - optional)
    if missing or unknown:
        return "; ".join(part for part in (
            f"missing field(s) {', '.join(map(repr, missing))}" if missing else "",
            f"unknown field(s) {', '.join(unknown)}" if unknown else "") if part)
    problems = [_field_problem(k, v) for k, v in obj.items()]
    problems += [_field_problem(f"proof[{i}]", h, "leaf_hash")
                 for i, h in enumerate(obj["proof"] if not any(problems) else ())]
    return next((p for p in problems if p), None)


def _validated(obj: object, source: str) -> dict[str, Any]:
    problem = _schema_problem(obj)
    if problem:
        raise LedgerDataError(f"{source}: {problem}")
    assert isinstance(obj, dict)
    return obj


def parse_proof(data: bytes, source: str) -> dict[str, Any]:
    """Parse and schema-check proof bytes; LedgerDataError naming ``source`` and the field.

    Accepts exactly what ``ppn ledger prove`` writes (``record`` is optional).
    """
    if len(data) > MAX_INPUT_SIZE:
        raise LedgerDataError(f"{source}: larger than {MAX_INPUT_SIZE} bytes")
    try:
        obj = _loads(data)
    except _Refusal as exc:
        raise LedgerDataError(f"{source}: {exc}") from None
    return _validated(obj, source)


def _open_note(note: bytes, verifier: NoteVerifier, what: str) -> Checkpoint:
    """open_checkpoint, with the error saying which of the two notes is at fault."""
    try:
        return open_checkpoint(note, verifier)
    except NoteError as exc:
        raise NoteError(f"{what}: {exc}") from None


def check_proof(proof: dict[str, Any], checkpoint: bytes, vkey: str,
                old_checkpoint: bytes | None = None) -> str:
    """Verify a proof (as :func:`parse_proof` returns it) against signed checkpoint notes.

    The proof is schema-checked again, so a dict from anywhere is safe to pass.
    Returns a one-line confirmation.  LedgerDataError if anything fails to parse
    or verify; LedgerUsageError if a consistency proof comes without ``old_checkpoint``.
    """
    proof = _validated(proof, "proof")
    verifier = NoteVerifier.from_string(vkey)
    cp = _open_note(checkpoint, verifier, "checkpoint")
    if cp.origin != proof["origin"]:
        raise LedgerDataError(f"proof is for {proof['origin']!r}, checkpoint for "
                              f"{cp.origin!r}")
    hashes = [bytes.fromhex(h) for h in proof["proof"]]
    if proof["kind"] == "inclusion":
        return _check_inclusion(proof, hashes, cp)
    if old_checkpoint is None:
        raise LedgerUsageError("a consistency proof needs --old-checkpoint too")
    old = _open_note(old_checkpoint, verifier, "old checkpoint")
    if old.origin != cp.origin:
        raise LedgerDataError(f"old checkpoint is for {old.origin!r}, checkpoint for "
                              f"{cp.origin!r}")
    if (old.size, cp.size) != (proof["old_size"], proof["new_size"]):
        raise LedgerDataError(f"proof is for sizes {proof['old_size']}->{proof['new_size']}, "
                              f"checkpoints are {old.size}->{cp.size}")
    merkle.verify_consistency(old.size, cp.size, old.root_hash, cp.root_hash, hashes)
    return f"ok: tree {old.size} is a prefix of tree {cp.size} ({cp.origin})"


def _check_inclusion(proof: dict[str, Any], hashes: list[bytes], cp: Checkpoint) -> str:
    index, size = proof["leaf_index"], proof["tree_size"]
    leaf = bytes.fromhex(proof["leaf_hash"])
    if "record" in proof and merkle.leaf_hash(bytes.fromhex(proof["record"])) != leaf:
        raise LedgerDataError("the record does not hash to the proof's leaf hash")
    if size != cp.size:
        raise LedgerDataError(f"proof is for tree size {size}, checkpoint is {cp.size}")
    merkle.verify_inclusion(leaf, index, size, hashes, cp.root_hash)
    return f"ok: record {index} is in tree {size} ({cp.origin})"


def _read_stdin(limit: int) -> bytes:
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:
        raise LedgerDataError("stdin: not open for reading bytes")
    try:
        return bytes(stdin.read(limit + 1))
    except (OSError, ValueError) as exc:  # ValueError: stdin already closed
        raise LedgerDataError(f"stdin: cannot read: {getattr(exc, 'strerror', None) or exc}"
                              ) from None


def _read_file(path: str, limit: int) -> bytes:
    """A regular file only, opened without blocking (:mod:`ledger.files`)."""
    try:
        fd = open_regular(path)  # as given: an empty name is no file, not "."
    except FileProblem as exc:
        raise LedgerDataError(f"{path}: {exc.reason}") from None
    try:
        return read_at_most(fd, Path(path), limit, "a proof or checkpoint input")
    except FileProblem as exc:
        raise LedgerDataError(f"{path}: {exc.reason}") from None
    finally:
        os.close(fd)


def read_input(path: str, limit: int = MAX_INPUT_SIZE) -> bytes:
    """Read a regular file, or stdin for ``-``, of at most ``limit`` bytes.

    Never blocks on a FIFO or device named as the file: those, directories and
    sockets are refused by what ``fstat`` says they are.  LedgerDataError for
    every failure, with the OS's reason.
    """
    data = _read_stdin(limit) if path == "-" else _read_file(path, limit)
    if len(data) > limit:
        raise LedgerDataError(f"{'stdin' if path == '-' else path}: larger than {limit} bytes")
    return data
