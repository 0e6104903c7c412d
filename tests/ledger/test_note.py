"""Tests for ledger.note (C2SP signed-note with Ed25519, C2SP tlog-checkpoint)."""

from __future__ import annotations

import base64
import contextlib

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerDataError
from ledger.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    key_id,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
    verifier_key,
)

EM = "\u2014"

# --- Published vectors -------------------------------------------------------------------
# golang.org/x/mod/sumdb/note: the package documentation example (note.go) and
# note_test.go (TestSign, TestOpen).  The signer key is
# "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
# its base64 part is 0x01 || Ed25519 seed.  EnochRoot's key in note_test.go is the
# Ed25519 key with an all-zero seed (checked below by deriving it).
PETER_SKEY_B64 = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
PETER_SIG = (
    f"{EM} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfq"
    "dngotpRZb6KE6RyyBwJnAM=\n"
).encode()
ENOCH_SIG = (
    f"{EM} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnW"
    "Lox33WWd1RvMc+QQ=\n"
).encode()
GO_NOTE = GO_TEXT + b"\n" + PETER_SIG

# c2sp.org/signed-note, the example verifier key and note of the v1 text (its
# "Verifier keys" section); reproduced by several independent implementations.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    f"This is an example message.\n\n{EM} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppz"
    "i2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
).encode()

# c2sp.org/tlog-checkpoint, the example checkpoint (its key is not published).
SPEC_CHECKPOINT_TEXT = (
    b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)
SPEC_CHECKPOINT_NOTE = (
    SPEC_CHECKPOINT_TEXT
    + (
        f"\n{EM} example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URY"
        "N7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    ).encode()
)


def peter() -> NoteSigner:
    seed = base64.b64decode(PETER_SKEY_B64)[1:]
    return NoteSigner("PeterNeumann", nacl.signing.SigningKey(seed))


def enoch() -> NoteSigner:
    return NoteSigner("EnochRoot", nacl.signing.SigningKey(bytes(32)))


def make_signer(name: str, seed_byte: int) -> NoteSigner:
    return NoteSigner(name, nacl.signing.SigningKey(bytes([seed_byte]) * 32))


# --- Vectors -----------------------------------------------------------------------------


def test_go_keys_derive() -> None:
    assert str(peter().verifier()) == PETER_VKEY
    assert str(enoch().verifier()) == ENOCH_VKEY
    assert peter().key_id == bytes.fromhex("c74f20a3")
    v = NoteVerifier.from_string(PETER_VKEY)
    assert (v.name, v.key_id) == ("PeterNeumann", bytes.fromhex("c74f20a3"))
    assert key_id(v.name, v.public_key) == v.key_id
    assert verifier_key(v.name, v.public_key) == PETER_VKEY


def test_go_sign_reproduces_published_note() -> None:
    assert sign_note(GO_TEXT, [peter()]) == GO_NOTE
    assert sign_note(GO_TEXT, [peter(), enoch()]) == GO_TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    blob = peter().sign(GO_TEXT)
    assert len(blob) == 68
    assert base64.b64encode(blob).decode() in PETER_SIG.decode()


def test_go_open() -> None:
    p, e = NoteVerifier.from_string(PETER_VKEY), NoteVerifier.from_string(ENOCH_VKEY)
    both = GO_TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    assert open_note(GO_NOTE, [p]) == (GO_TEXT, ["PeterNeumann"])
    assert open_note(both, [p]) == (GO_TEXT, ["PeterNeumann"])  # EnochRoot unknown: ignored
    assert open_note(both, [p, e]) == (GO_TEXT, ["PeterNeumann", "EnochRoot"])
    assert open_note(both, [e]) == (GO_TEXT, ["EnochRoot"])
    with pytest.raises(NoteError, match="no signature from a known key"):
        open_note(both, [])
    dup = GO_TEXT + b"\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG
    assert open_note(dup, [p]) == (GO_TEXT, ["PeterNeumann"])


def test_go_open_rejections() -> None:
    p = NoteVerifier.from_string(PETER_VKEY)
    with pytest.raises(NoteError, match="more than 100 signatures"):
        open_note(GO_TEXT + b"\n" + PETER_SIG * 101, [p])
    bad = GO_TEXT + b"\n" + PETER_SIG[:60] + b"ABCD" + PETER_SIG[60:]
    with pytest.raises(NoteError, match=r"bad signature for key PeterNeumann\+c74f20a3"):
        open_note(bad, [p])
    bad_msgs = [
        GO_TEXT,
        GO_TEXT + b"\n",
        GO_TEXT + b"\n" + PETER_SIG[:-1],
        b"\x01" + GO_NOTE,
        b"\xff" + GO_NOTE,
        GO_TEXT + b"\n" + f"{EM} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcEl=".encode(),
        GO_NOTE + b"Unexpected line.\n",
    ]
    for msg in bad_msgs:
        with pytest.raises(NoteError, match="malformed note"):
            open_note(msg, [p])


def test_spec_example_note() -> None:
    v = NoteVerifier.from_string(SPEC_VKEY)
    assert v.key_id.hex() == "530d903a"
    assert open_note(SPEC_NOTE, [v]) == (b"This is an example message.\n", ["example.com/foo"])


def test_spec_example_checkpoint() -> None:
    cp = Checkpoint.parse(SPEC_CHECKPOINT_TEXT)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.body() == SPEC_CHECKPOINT_TEXT
    # Well-formed note, but its key is unknown to us: it must not open.
    with pytest.raises(NoteError, match="no signature from a known key"):
        open_checkpoint(SPEC_CHECKPOINT_NOTE, NoteVerifier.from_string(PETER_VKEY))


# --- Verifier keys -----------------------------------------------------------------------


def test_verifier_key_manglings_rejected() -> None:
    # Same idea as note_test.go TestNewVerifier: every proper substring and every
    # single-byte bump of a good key must be refused.
    b = PETER_VKEY.encode()
    candidates = [b[i:j] for i in range(len(b) + 1) for j in range(i + 1, len(b) + 1)]
    candidates = [c for c in candidates if c != b]
    candidates += [b[:i] + bytes([b[i] + 1]) + b[i + 1 :] for i in range(len(b))]
    for candidate in candidates:
        with pytest.raises(NoteError):
            NoteVerifier.from_string(candidate.decode("latin-1"))


@pytest.mark.parametrize(
    "vkey",
    [
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3",
        "",
        "x" * 5000,
    ],
)
def test_bad_verifier_keys(vkey: str) -> None:
    with pytest.raises(NoteError):
        NoteVerifier.from_string(vkey)


def test_key_arguments_checked() -> None:
    pub = bytes(32)
    for name in ["", "a b", "a+b", "a\u00a0b", "a\x00b"]:
        with pytest.raises(ValueError):
            key_id(name, pub)
        with pytest.raises(ValueError):
            NoteSigner(name, nacl.signing.SigningKey(pub))
    with pytest.raises(ValueError):
        key_id("ok", b"short")
    assert NoteVerifier.from_string(PETER_VKEY).verify(GO_TEXT, b"short") is False


def test_plus_in_base64_is_fine() -> None:
    # The key material may contain '+'; only the first two '+' separate fields.
    for seed in range(256):
        signer = make_signer("plus.example", seed)
        vkey = str(signer.verifier())
        if "+" in vkey.split("+", 2)[2]:
            assert NoteVerifier.from_string(vkey).public_key == signer.verifier().public_key
            return
    pytest.fail("no seed gave a '+' in the base64 key")  # pragma: no cover


# --- Sign / open round trips -------------------------------------------------------------

note_texts = st.lists(
    st.text(
        alphabet=st.characters(codec="utf-8", min_codepoint=0x20),
        max_size=30,
    ),
    min_size=1,
    max_size=5,
).map(lambda lines: "".join(line + "\n" for line in lines).encode())


@given(text=note_texts)
def test_round_trip(text: bytes) -> None:
    a, b = make_signer("a.example/log", 1), make_signer("b.example", 2)
    note = sign_note(text, [a, b])
    assert open_note(note, [a.verifier(), b.verifier()]) == (text, ["a.example/log", "b.example"])
    assert open_note(note, [b.verifier()]) == (text, ["b.example"])


def test_text_with_blank_lines_round_trips() -> None:
    signer = make_signer("blank.example", 3)
    for text in [b"\n", b"a\n\nb\n", b"a\n\n", b"\n\n\n"]:
        assert open_note(sign_note(text, [signer]), [signer.verifier()])[0] == text


TAMPER_SIGNER = make_signer("tamper.example/log", 9)
TAMPER_OTHER = make_signer("other.example", 10)
TAMPER_TEXT = b"tamper.example/log\n42\n" + b"A" * 43 + b"=\n"
TAMPER_NOTE = sign_note(TAMPER_TEXT, [TAMPER_OTHER, TAMPER_SIGNER])
OTHER_LINE = slice(len(TAMPER_TEXT) + 1, TAMPER_NOTE.index(f"{EM} tamper".encode()))


@settings(max_examples=500)
@given(pos=st.integers(0, len(TAMPER_NOTE) - 1), value=st.integers(0, 255))
def test_any_changed_byte_is_rejected(pos: int, value: int) -> None:
    if TAMPER_NOTE[pos] == value:
        value ^= 0x40
    damaged = TAMPER_NOTE[:pos] + bytes([value]) + TAMPER_NOTE[pos + 1 :]
    try:
        result = open_note(damaged, [TAMPER_SIGNER.verifier()])
    except NoteError:
        return
    # Only damage to the *unknown* key's signature line may be ignored.
    assert OTHER_LINE.start <= pos < OTHER_LINE.stop
    assert result == (TAMPER_TEXT, [TAMPER_SIGNER.name])


@settings(max_examples=300)
@given(data=st.binary(max_size=400))
def test_garbage_only_raises_note_error(data: bytes) -> None:
    for candidate in (data, TAMPER_NOTE[: len(data)] + data):
        with contextlib.suppress(NoteError):
            open_note(candidate, [TAMPER_SIGNER.verifier()])
        with contextlib.suppress(NoteError):
            Checkpoint.parse(candidate)


@given(line=st.text(max_size=200))
def test_arbitrary_signature_line_only_raises_note_error(line: str) -> None:
    note = b"text\n\n" + line.encode("utf-8", "surrogatepass") + b"\n"
    with pytest.raises(NoteError):
        open_note(note, [TAMPER_SIGNER.verifier()])


# --- Malformed notes ---------------------------------------------------------------------

SIGNED = sign_note(b"hello\n", [TAMPER_SIGNER])
SIG_LINE = SIGNED[len(b"hello\n\n") :]


@pytest.mark.parametrize(
    ("note", "message"),
    [
        (b"hello\n" + SIG_LINE, "no blank line"),
        (b"hello\n\n", "no signature lines"),
        (b"hello\n\n\n", "no signature lines"),
        (SIGNED + b"trailing", "data after the last signature line"),
        (SIGNED[:-1], "data after the last signature line"),
        (SIGNED + b"not a signature\n", "does not start with an em dash"),
        (SIGNED.replace(EM.encode(), b"--"), "em dash"),
        (SIGNED.replace(EM.encode(), "\u2013".encode()), "em dash"),
        (SIGNED.replace(b"=\n", b"=!\n"), "bad base64"),
        (SIGNED.replace(b"=\n", b"\n"), "bad base64"),
        (SIGNED.replace(b" tamper", b"  tamper"), "key name"),
        (SIGNED.replace(b"tamper.example/log ", b"tamper.example/log"), "signature line 1"),
        (SIGNED.replace(b"tamper.example/log", b"tamper+log"), "key name"),
        (b"hello\n\n" + f"{EM} name AAAAAA==\n".encode(), "too short"),
        (b"hel\tlo\n" + b"\n" + SIG_LINE, "control character 0x09"),
        (b"hel\rlo\n" + b"\n" + SIG_LINE, "control character 0x0d"),
        (b"hel\xc3lo\n" + b"\n" + SIG_LINE, "not valid UTF-8"),
        (b"hello\n\n" + SIG_LINE * 101, "more than 100 signatures"),
        (b"x" * (MAX_NOTE_SIZE - 5) + b"\n\n" + SIG_LINE, "over the"),
    ],
)
def test_malformed_notes(note: bytes, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        open_note(note, [TAMPER_SIGNER.verifier()])


def test_wrong_signature_from_known_key_rejects_note() -> None:
    v = TAMPER_SIGNER.verifier()
    good = sign_note(b"hello\n", [TAMPER_SIGNER])
    forged = sign_note(b"bye\n", [TAMPER_SIGNER])[len(b"bye\n\n") :]
    with pytest.raises(NoteError, match=r"bad signature for key tamper\.example/log\+"):
        open_note(good + forged, [v])
    # Same name, different key ID: an unknown key, ignored.
    imposter = make_signer("tamper.example/log", 77)
    assert open_note(sign_note(b"hello\n", [TAMPER_SIGNER, imposter]), [v])[1] == [v.name]
    with pytest.raises(NoteError, match="no signature from a known key"):
        open_note(sign_note(b"hello\n", [imposter]), [v])


def test_note_errors_are_data_errors() -> None:
    assert issubclass(NoteError, LedgerDataError)


def test_duplicate_and_conflicting_verifiers() -> None:
    v = TAMPER_SIGNER.verifier()
    assert open_note(SIGNED, [v, TAMPER_SIGNER.verifier()])[1] == [v.name]
    clash = make_signer(v.name, 55).verifier()
    clash.key_id = v.key_id  # a key ID collision, forced
    with pytest.raises(ValueError, match="share name and key ID"):
        open_note(SIGNED, [v, clash])


def test_sign_note_rejects_bad_text_and_signers() -> None:
    s = TAMPER_SIGNER
    for text in [b"", b"no newline", b"tab\there\n", b"bad \xff utf8\n", b"\x00\n"]:
        with pytest.raises(ValueError):
            sign_note(text, [s])
    with pytest.raises(ValueError):
        sign_note("str\n", [s])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sign_note(b"ok\n", [])
    with pytest.raises(ValueError):
        sign_note(b"ok\n", [s, s])
    with pytest.raises(ValueError):
        sign_note(b"x" * MAX_NOTE_SIZE + b"\n", [s])


# --- Checkpoints -------------------------------------------------------------------------

ROOT = bytes(range(32))


@given(
    origin=st.text(
        alphabet=st.characters(codec="utf-8", min_codepoint=0x20),
        min_size=1,
        max_size=30,
    ),
    size=st.integers(0, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(st.text(alphabet="abc xyz=+/", min_size=1, max_size=10), max_size=3),
)
def test_checkpoint_round_trip(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(extensions))
    assert Checkpoint.parse(cp.body()) == cp
    signer = make_signer("log.example/key", 4)  # key name may differ from the origin
    assert open_checkpoint(sign_checkpoint(cp, signer), signer.verifier()) == cp


def test_checkpoint_body_format() -> None:
    cp = Checkpoint("example.com/log", 0, ROOT, ("ext one", "ext2"))
    root_b64 = base64.b64encode(ROOT)
    assert cp.body() == b"example.com/log\n0\n" + root_b64 + b"\next one\next2\n"


@pytest.mark.parametrize(
    "size_line",
    [
        b"007",
        b"00",
        b"-1",
        b"+1",
        b" 1",
        b"1 ",
        b"1_000",
        b"1e3",
        b"0x10",
        b"",
        b"18446744073709551616",
        "\u0661\u0662".encode(),
    ],
)
def test_checkpoint_bad_sizes(size_line: bytes) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(b"origin\n" + size_line + b"\n" + base64.b64encode(ROOT) + b"\n")


@pytest.mark.parametrize(
    "text",
    [
        b"origin\n1\n" + base64.b64encode(ROOT[:31]) + b"\n",
        b"origin\n1\n" + base64.b64encode(ROOT + b"x") + b"\n",
        b"origin\n1\n" + base64.b64encode(ROOT)[:-1] + b"\n",
        b"origin\n1\n" + base64.b64encode(ROOT).replace(b"A", b"-") + b"\n",
        b"origin\n1\n" + base64.urlsafe_b64encode(b"\xff" * 32) + b"\n",
        b"\n1\n" + base64.b64encode(ROOT) + b"\n",
        b"origin\n1\n",
        b"origin\n1\n" + base64.b64encode(ROOT),
        b"origin\n1\n" + base64.b64encode(ROOT) + b"\n\n",
        b"origin\n1\n" + base64.b64encode(ROOT) + b"\next\n\n",
        b"ori\x00gin\n1\n" + base64.b64encode(ROOT) + b"\n",
        b"origin\xff\n1\n" + base64.b64encode(ROOT) + b"\n",
        b"",
    ],
)
def test_checkpoint_strict_parse(text: bytes) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_checkpoint_rejects_non_canonical_base64() -> None:
    canonical = base64.b64encode(ROOT)
    assert canonical.endswith(b"8=")  # last 6-bit group is 111100: two zero pad bits
    sloppy = canonical[:-2] + b"9="  # same bytes, non-zero pad bits
    assert base64.b64decode(sloppy) == ROOT
    with pytest.raises(NoteError, match="not a base64 hash"):
        Checkpoint.parse(b"origin\n1\n" + sloppy + b"\n")


def test_checkpoint_constructor_validates() -> None:
    bad: list[tuple[object, object, object, object]] = [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        ("o", -1, ROOT, ()),
        ("o", 2**64, ROOT, ()),
        ("o", True, ROOT, ()),
        ("o", 1, ROOT[:31], ()),
        ("o", 1, bytearray(ROOT), ()),
        ("o", 1, ROOT, ("",)),
        ("o", 1, ROOT, ("a\tb",)),
        ("o", 1, ROOT, ["list"]),
        ("o\ud800", 1, ROOT, ()),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            Checkpoint(*args)  # type: ignore[arg-type]


def test_open_checkpoint_needs_that_verifier() -> None:
    log, other = make_signer("log.example", 5), make_signer("log.example", 6)
    note = sign_checkpoint(Checkpoint("log.example", 3, ROOT), log)
    with pytest.raises(NoteError, match="no signature from a known key"):
        open_checkpoint(note, other.verifier())
    assert open_checkpoint(note, log.verifier()).size == 3
    not_a_checkpoint = sign_note(b"just text\n", [log])
    with pytest.raises(NoteError, match="malformed checkpoint"):
        open_checkpoint(not_a_checkpoint, log.verifier())


def test_fast_reading_of_own_checkpoint_notes() -> None:
    from ledger.note import checkpoint_text, lone_signature

    key = nacl.signing.SigningKey(bytes(range(32)))
    signer = NoteSigner("example.com/log", key)
    cp = Checkpoint("example.com/log", 12345, bytes(range(32)))
    assert checkpoint_text(cp.origin, cp.size, cp.root_hash) == cp.body()
    note = sign_checkpoint(cp, signer)
    sig = lone_signature(note, cp.body(), signer.verifier())
    assert sig is not None and signer.verifier().verify(cp.body(), sig)
    # Anything shaped otherwise is left to open_note: other text, another key, a second
    # signature, a damaged signature line.
    other = Checkpoint("example.com/log", 12346, bytes(range(32)))
    assert lone_signature(note, other.body(), signer.verifier()) is None
    stranger = NoteSigner("example.com/log", nacl.signing.SigningKey(bytes(32)))
    assert lone_signature(note, cp.body(), stranger.verifier()) is None
    two = sign_note(cp.body(), [signer, NoteSigner("witness", key)])
    assert lone_signature(two, cp.body(), signer.verifier()) is None
    assert lone_signature(note[:-3] + b"!!\n", cp.body(), signer.verifier()) is None
    # What a writer makes per commit is byte for byte what sign_checkpoint makes.
    assert signer.lone_note(checkpoint_text(cp.origin, cp.size, cp.root_hash)) == note
