"""``nodes.jsonl``: the mesh membership projection, one JSON object per line.

It is derived data: rebuilt from the log, rewritten atomically whenever
membership changes, and compared byte for byte by ``ppn ledger verify``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ledger.files import FileProblem, fsync_dir, read_bounded
from ledger.state import Member, State

NODES_FILE = "nodes.jsonl"


def _line(m: Member) -> bytes:
    obj = {
        "name": m.name,
        "mesh_ip": m.mesh_ip,
        "role": m.role,
        "endpoint": m.endpoint,
        "wg_public_key": base64.b64encode(m.wg_public_key).decode(),
        "signing_key": base64.b64encode(m.signing_key).decode(),
        "joined_ns": m.joined_ts_ns,
        "approved_by": m.approved_by,
    }
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def render(state: State) -> bytes:
    """The exact bytes nodes.jsonl must hold for ``state`` (sorted by name)."""
    return b"".join(_line(state.members[name]) for name in sorted(state.members))


class Projection:
    """nodes.jsonl kept current by a writer: re-renders only the members a batch named.

    Gives the same bytes as :func:`render`; the file is rewritten only when they change.
    """

    def __init__(self, directory: Path, state: State) -> None:
        self.path = directory / NODES_FILE
        self._lines = {name: _line(m) for name, m in state.members.items()}
        self._written: bytes | None = None

    def update(self, state: State, names: Iterable[str]) -> None:
        for name in names:
            m = state.members.get(name)
            if m is None:
                self._lines.pop(name, None)
            else:
                self._lines[name] = _line(m)

    def write(self, *, durable: bool = True) -> bool:
        """Make the file hold the projection; True if it had to change.

        ``durable=False`` skips the fsyncs (the commit path does: the file is derived,
        replaced atomically for readers, and rebuilt from the log when the ledger opens).
        """
        lines = self._lines
        data = b"".join(lines[name] for name in sorted(lines))
        if data == self._written:
            return False
        if self._written is None:
            try:
                changed = read_bounded(self.path, len(data), NODES_FILE) != data
            except FileProblem:  # not a regular file, or longer: replace it
                changed = True
            if not changed:
                self._written = data
                return False
        atomic_write(self.path, data, mode=0o644, durable=durable)
        self._written = data
        return True


def atomic_write(path: Path, data: bytes, *, mode: int, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a crash mid-write may have left one, perhaps read-only
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if not durable:
        return
    fsync_dir(path.parent)
