"""ledger.proofcheck: real proofs verify; every malformed proof input is one LedgerDataError."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ORIGIN, new_ledger, sample_events

from ledger import audit
from ledger.errors import LedgerDataError, LedgerError, LedgerUsageError
from ledger.keys import NodeKeys
from ledger.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    NoteError,
    NoteSigner,
    open_checkpoint,
    sign_checkpoint,
    verifier_key,
)
from ledger.proofcheck import MAX_DEPTH, MAX_INPUT_SIZE, check_proof, parse_proof, read_input

SIZE = 21  # genesis + 20 events
SRC = "proof.json"


class Fixture:
    def __init__(self, directory: Path, keys: NodeKeys) -> None:
        self.dir = directory
        self.keys = keys
        self.vkey = audit.public_verifier_key(directory)

    def note(self, size: int = SIZE) -> bytes:
        return audit.checkpoint_note(self.dir, size)

    def inclusion(self, seq: int = 5, size: int | None = None) -> dict[str, Any]:
        return audit.prove_inclusion(self.dir, seq, size)

    def consistency(self, old: int = 3, new: int = SIZE) -> dict[str, Any]:
        return audit.prove_consistency(self.dir, old, new)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    directory = tmp_path_factory.mktemp("proofcheck") / "l"
    led, keys = new_ledger(directory)
    for event in sample_events(SIZE - 1):
        led.append(event)
    led.close()
    yield Fixture(directory, keys)


def cli_bytes(proof: dict[str, Any]) -> bytes:
    """The proof as ``ppn ledger prove`` prints it."""
    return (json.dumps(proof, indent=2) + "\n").encode()


def with_field(proof: dict[str, Any], field: str, raw: str) -> bytes:
    """The proof's JSON with one field's value replaced by the raw JSON text ``raw``."""
    marker = "\u0000MARK\u0000"
    text = json.dumps({**proof, field: marker})
    return text.replace(json.dumps(marker), raw).encode()


def refused(data: bytes, *needles: str) -> str:
    with pytest.raises(LedgerDataError) as info:
        parse_proof(data, SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}: ") and "\n" not in message and len(message) < 300
    for needle in needles:
        assert needle in message, message
    return message


# -- real proofs verify -------------------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 5, 12, 20])
def test_real_inclusion_proofs_verify(fx: Fixture, seq: int) -> None:
    proof = parse_proof(cli_bytes(fx.inclusion(seq)), SRC)
    assert proof == fx.inclusion(seq)
    expected = f"ok: record {seq} is in tree {SIZE} ({ORIGIN})"
    assert check_proof(proof, fx.note(), fx.vkey) == expected


def test_inclusion_in_an_older_tree_and_without_the_record(fx: Fixture) -> None:
    proof = parse_proof(cli_bytes(fx.inclusion(3, size=10)), SRC)
    assert check_proof(proof, fx.note(10), fx.vkey) == f"ok: record 3 is in tree 10 ({ORIGIN})"
    del proof["record"]
    bare = parse_proof(cli_bytes(proof), SRC)
    assert check_proof(bare, fx.note(10), fx.vkey).startswith("ok: record 3 is in tree 10")


@pytest.mark.parametrize(("old", "new"), [(1, SIZE), (3, SIZE), (8, 16), (7, 13), (SIZE, SIZE)])
def test_real_consistency_proofs_verify(fx: Fixture, old: int, new: int) -> None:
    proof = parse_proof(cli_bytes(fx.consistency(old, new)), SRC)
    result = check_proof(proof, fx.note(new), fx.vkey, fx.note(old))
    assert result == f"ok: tree {old} is a prefix of tree {new} ({ORIGIN})"


def test_read_input_then_parse_then_check(fx: Fixture, tmp_path: Path) -> None:
    path = tmp_path / "incl.json"
    path.write_bytes(cli_bytes(fx.inclusion(12)))
    (tmp_path / "link.json").symlink_to(path)  # a symlink to a regular file is fine
    for name in (str(path), str(tmp_path / "link.json")):
        proof = parse_proof(read_input(name), name)
        assert check_proof(proof, fx.note(), fx.vkey).startswith("ok: record 12")


# -- tampering is still refused -----------------------------------------------------


def test_tampered_proof_hash_is_refused(fx: Fixture) -> None:
    for i in range(len(fx.inclusion()["proof"])):
        proof = fx.inclusion()
        proof["proof"][i] = "00" * 32
        with pytest.raises(LedgerDataError, match="does not match"):
            check_proof(parse_proof(cli_bytes(proof), SRC), fx.note(), fx.vkey)
    cons = fx.consistency()
    cons["proof"][-1] = "ff" * 32
    with pytest.raises(LedgerDataError, match="does not match"):
        check_proof(parse_proof(cli_bytes(cons), SRC), fx.note(), fx.vkey, fx.note(3))


def test_tampered_record_leaf_size_and_origin_are_refused(fx: Fixture) -> None:
    note = fx.note()
    cases: list[tuple[str, Any, str]] = [
        ("record", "00" + fx.inclusion()["record"][2:], "does not hash"),
        ("leaf_hash", "11" * 32, "does not hash"),
        ("tree_size", SIZE - 1, "proof is for tree size 20, checkpoint is 21"),
        ("leaf_index", 6, "does not match"),
        ("leaf_index", SIZE + 3, "out of range"),
        ("origin", "evil.ppn/ledger", "proof is for 'evil.ppn/ledger'"),
    ]
    for field, value, needle in cases:
        proof = {**fx.inclusion(), field: value}
        with pytest.raises(LedgerDataError, match=needle):
            check_proof(parse_proof(cli_bytes(proof), SRC), note, fx.vkey)
    wrong_sizes = {**fx.consistency(), "old_size": 4}
    with pytest.raises(LedgerDataError, match="proof is for sizes 4->21, checkpoints are 3->21"):
        check_proof(parse_proof(cli_bytes(wrong_sizes), SRC), note, fx.vkey, fx.note(3))


def test_keys_and_checkpoints_that_are_wrong(fx: Fixture) -> None:
    proof = parse_proof(cli_bytes(fx.inclusion()), SRC)
    other = verifier_key(ORIGIN, NodeKeys.generate().public_key)
    with pytest.raises(NoteError, match="checkpoint: note has no signature from a known key"):
        check_proof(proof, fx.note(), other)
    for vkey in ("", "garbage", "a+b+c", "x" * 5000, fx.vkey[:-4], fx.vkey + "A", "\ud800+1+2"):
        with pytest.raises(LedgerDataError, match="verifier key"):
            check_proof(proof, fx.note(), vkey)
    for note in (b"", b"\xff\xfe", b"not a note\n\n", fx.note()[:-10], b"x" * (MAX_NOTE_SIZE + 1)):
        with pytest.raises(LedgerDataError, match=r"^checkpoint: "):
            check_proof(proof, note, fx.vkey)
    cons = parse_proof(cli_bytes(fx.consistency()), SRC)
    with pytest.raises(LedgerDataError, match=r"^old checkpoint: "):
        check_proof(cons, fx.note(), fx.vkey, b"junk")


def test_consistency_without_old_checkpoint_is_a_usage_error(fx: Fixture) -> None:
    cons = parse_proof(cli_bytes(fx.consistency()), SRC)
    with pytest.raises(LedgerUsageError, match="needs --old-checkpoint"):
        check_proof(cons, fx.note(), fx.vkey)


def test_old_checkpoint_of_another_log_is_refused(fx: Fixture) -> None:
    """Signed by the right key, but the body is another log's tree: not comparable."""
    signer = NoteSigner(ORIGIN, fx.keys.signing_key)
    old = open_checkpoint(fx.note(3), signer.verifier())
    forged = sign_checkpoint(Checkpoint("other.ppn/ledger", 3, old.root_hash), signer)
    cons = parse_proof(cli_bytes(fx.consistency(3, SIZE)), SRC)
    with pytest.raises(LedgerDataError, match=r"old checkpoint is for 'other.ppn/ledger'"):
        check_proof(cons, fx.note(), fx.vkey, forged)


def test_check_proof_validates_a_dict_from_anywhere(fx: Fixture) -> None:
    for bad in ({**fx.inclusion(), "leaf_index": float("inf")},
                {**fx.inclusion(), "tree_size": 1e400}, {"kind": "inclusion"}, {},
                {**fx.inclusion(), "proof": "00"}, {**fx.consistency(), "new_size": True}):
        with pytest.raises(LedgerDataError, match=r"^proof: "):
            check_proof(bad, fx.note(), fx.vkey)
    with pytest.raises(LedgerDataError, match="not a JSON proof object"):
        check_proof([], fx.note(), fx.vkey)  # type: ignore[arg-type]


# -- attacks on the JSON ------------------------------------------------------------


def test_deep_nesting_is_refused_before_json_recurses(fx: Fixture) -> None:
    assert len(b"[" * 100_000) < MAX_INPUT_SIZE
    refused(b"[" * 100_000, "not a JSON proof", f"nested deeper than {MAX_DEPTH} levels")
    refused(b"[" * 100_000 + b"]" * 100_000, "nested deeper")
    refused(b'{"a":' * 100_000, "nested deeper")
    refused(with_field(fx.inclusion(), "proof", "[" * 50_000 + "]" * 50_000), "nested deeper")
    refused(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper")
    refused(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, "not a JSON proof object, got a list")


def test_brackets_and_quotes_inside_strings_do_not_count_as_nesting(fx: Fixture) -> None:
    origin = '[{"\\\\"' + "[" * 100 + '\\"' + "{" * 100
    proof = parse_proof(cli_bytes({**fx.inclusion(), "origin": origin}), SRC)
    assert proof["origin"] == origin
    refused(b'{"kind": "inclusion", "origin": "' + b"[" * 100, "Unterminated string")


@pytest.mark.parametrize("field", ["leaf_index", "tree_size"])
@pytest.mark.parametrize("raw", ["1e400", "-1e400", "1.0", "5e0", "0.5", "NaN", "Infinity",
                                 "-Infinity", "9223372036854775808", "-1", "1" * 5000,
                                 "-" + "9" * 100_000, "true", "false", "null", '"5"', "[5]",
                                 "{}"])
def test_non_integers_in_inclusion_sizes(fx: Fixture, field: str, raw: str) -> None:
    message = refused(with_field(fx.inclusion(), field, raw),
                      f"{field} must be an integer 0 <= n < 2**63, got ")
    if raw == "1e400":
        assert message == f"{SRC}: {field} must be an integer 0 <= n < 2**63, got a number 1e400"


def test_the_exact_1e400_message(fx: Fixture) -> None:
    message = refused(with_field(fx.inclusion(), "leaf_index", "1e400"))
    assert message == "proof.json: leaf_index must be an integer 0 <= n < 2**63, got a number 1e400"


def test_largest_integer_is_accepted_then_fails_verification(fx: Fixture) -> None:
    proof = parse_proof(with_field(fx.inclusion(), "leaf_index", str(2**63 - 1)), SRC)
    assert proof["leaf_index"] == 2**63 - 1
    with pytest.raises(LedgerDataError, match="out of range"):
        check_proof(proof, fx.note(), fx.vkey)


WRONG: dict[str, list[str]] = {
    "kind": ["null", "1", "true", '"Inclusion"', '"other"', "[]", '["inclusion"]', "{}"],
    "origin": ["null", "1", "true", '""', '"a\\nb"', '"a\\u0000b"', '"\\ud800"', "[]", "{}",
               json.dumps("x" * 2000)],
    "leaf_index": ["null", "true", "1.5", '"1"', "[]", "{}", "-1"],
    "tree_size": ["null", "false", "2.0", '"21"', "[21]", "{}", str(2**63)],
    "old_size": ["null", "true", "3.0", '"3"', "[]", "{}", "-3", "1e400"],
    "new_size": ["null", "true", "21.0", '"21"', "[]", "{}", str(2**64), "NaN"],
    "leaf_hash": ["null", "1", "true", '""', '"00"', json.dumps("AB" * 32),
                  json.dumps("g" * 64), json.dumps("0" * 63), json.dumps("0" * 65),
                  json.dumps(" " + "0" * 63), "[]", "{}"],
    "record": ["null", "1", "true", '"abc"', '"zz"', '"AB"', '"0 1"', "[]", "{}"],
    "proof": ["null", "1", "true", json.dumps("00" * 32), "{}", "[1]", '["00"]', "[null]",
              "[[]]", json.dumps(["00" * 32] * 65), json.dumps(["00" * 32, "AB" * 32])],
}


@pytest.mark.parametrize(("field", "raw"), [(f, r) for f, rs in WRONG.items() for r in rs])
def test_wrong_types_in_every_field(fx: Fixture, field: str, raw: str) -> None:
    base = fx.consistency() if field in ("old_size", "new_size") else fx.inclusion()
    message = refused(with_field(base, field, raw), " must be ", ", got ")
    assert message.split(": ", 1)[1].startswith(field)


@pytest.mark.parametrize("kind", ["inclusion", "consistency"])
def test_missing_unknown_and_duplicate_fields(fx: Fixture, kind: str) -> None:
    base = fx.inclusion() if kind == "inclusion" else fx.consistency()
    for field in base:
        if field != "record":
            rest = {k: v for k, v in base.items() if k != field}
            refused(cli_bytes(rest), "missing field", repr(field))
    refused(cli_bytes({**base, "extra": 1}), "unknown field(s) 'extra'")
    refused(cli_bytes({**base, "x" * 500: 1}), "unknown field(s)")
    other = "old_size" if kind == "inclusion" else "leaf_index"
    refused(cli_bytes({**base, other: 1}), f"unknown field(s) {other!r}")
    text = cli_bytes(base).decode()
    refused(text.replace('"kind"', '"origin": "x", "kind"', 1).encode(), "duplicate field 'origin'")


def test_truncated_json(fx: Fixture) -> None:
    data = cli_bytes(fx.inclusion())
    for cut in range(0, len(data) - 2, 7):
        refused(data[:cut], "not a JSON proof")


@pytest.mark.parametrize("data", [b"", b"   ", b"{not json", b"{}}", b'{"kind": "inclusion",}',
                                  b"\xef\xbb\xbf{}", b"{} {}", b"'single'", b"[]", b'"x"', b"7",
                                  b"null", b"1e400", b"NaN"])
def test_not_a_json_object(data: bytes) -> None:
    refused(data, "not a JSON proof")


def test_non_utf8(fx: Fixture) -> None:
    refused(b"\xff", "not valid UTF-8 at byte 0")
    data = cli_bytes(fx.inclusion()).replace(ORIGIN.encode(), b"caf\xe9")
    refused(data, "not valid UTF-8")
    refused(cli_bytes(fx.inclusion()).decode().encode("utf-16"), "not valid UTF-8")


def test_oversized_proof_bytes(fx: Fixture) -> None:
    refused(b" " * (MAX_INPUT_SIZE + 1), f"larger than {MAX_INPUT_SIZE} bytes")


def test_random_damage_gives_only_ledger_errors(fx: Fixture) -> None:
    """Seeded mutation fuzz: parse, and check whatever parses; nothing but LedgerError."""
    rng = random.Random(9162)
    good = cli_bytes(fx.inclusion()), cli_bytes(fx.consistency())
    alphabet = b'[]{}",:0123456789.eE+-tnfalsNIy\\u \xff\n'
    note, old = fx.note(), fx.note(3)
    for _ in range(3000):
        data = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] = rng.choice(alphabet)
            elif op == 1:
                del data[i]
            else:
                data[i:i] = bytes([rng.choice(alphabet)]) * rng.choice([1, 5, 5000])
        with contextlib.suppress(LedgerError):
            check_proof(parse_proof(bytes(data), SRC), note, fx.vkey, old)


# -- read_input ---------------------------------------------------------------------


def read_in_thread(path: str) -> BaseException | bytes:
    """read_input in a daemon thread, so a regression to a blocking open fails, not hangs."""
    box: list[BaseException | bytes] = []

    def run() -> None:
        try:
            box.append(read_input(path))
        except BaseException as exc:
            box.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), f"read_input({path!r}) blocked"
    return box[0]


def input_refused(path: str | Path, *needles: str) -> str:
    result = read_in_thread(str(path))
    assert isinstance(result, LedgerDataError), result
    message = str(result)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for needle in needles:
        assert needle in message, message
    return message


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "proof.fifo"
    os.mkfifo(fifo)
    input_refused(fifo, "is a FIFO (named pipe), not a regular file")


def test_directory_device_and_socket_are_refused(tmp_path: Path) -> None:
    input_refused(tmp_path, "is a directory, not a regular file")
    input_refused("/dev/null", "is a character device, not a regular file")
    short = tempfile.mkdtemp(prefix="pc")  # AF_UNIX paths must be short
    path = os.path.join(short, "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        try:
            input_refused(path, "socket")
        finally:
            os.unlink(path)
            os.rmdir(short)


def test_symlink_loop_missing_file_and_bad_names(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    input_refused(tmp_path / "a", "cannot open: Too many levels of symbolic links")
    input_refused(tmp_path / "missing.json", "cannot open: No such file or directory")
    input_refused(tmp_path / "missing" / "x.json", "No such file or directory")
    with pytest.raises(LedgerDataError, match="cannot open: No such file"):
        read_input("")
    with pytest.raises(LedgerDataError, match="embedded null byte"):
        read_input("a\0b")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    path.write_bytes(b"{}")
    path.chmod(0)
    input_refused(path, "cannot open: Permission denied")


def test_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_INPUT_SIZE + 1))
    input_refused(path, f"larger than {MAX_INPUT_SIZE} bytes")
    path.write_bytes(b" " * MAX_INPUT_SIZE)
    assert len(read_input(str(path))) == MAX_INPUT_SIZE
    path.write_bytes(b"0123456789")
    assert read_input(str(path), limit=10) == b"0123456789"
    with pytest.raises(LedgerDataError, match="larger than 9 bytes"):
        read_input(str(path), limit=9)


def test_stdin(monkeypatch: pytest.MonkeyPatch, fx: Fixture) -> None:
    data = cli_bytes(fx.inclusion())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert read_input("-") == data
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x" * 11)))
    with pytest.raises(LedgerDataError, match=r"^stdin: larger than 10 bytes"):
        read_input("-", limit=10)
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(LedgerDataError, match=r"^stdin: "):
        read_input("-")
    closed = io.TextIOWrapper(io.BytesIO(b""))
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    with pytest.raises(LedgerDataError, match=r"^stdin: cannot read"):
        read_input("-")


def test_stdin_may_be_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    os.write(w, b'{"kind": 1}')
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(pipe))
        assert read_input("-") == b'{"kind": 1}'
