"""Reading the files of a ledger directory: regular files only, never whole, never blocking.

Everything in a ledger directory may have been put there by someone else: a FIFO
named like a segment (opening it for reading would wait for a writer forever), a
directory, a device, a symlink loop, or a 64 GiB sparse file.  Every read goes
through here, so each of those is one clear :class:`FileProblem` and no read takes
more memory than its caller allows.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ledger.errors import LedgerDataError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


class FileProblem(LedgerDataError):
    """A file of the ledger directory cannot be read as what it claims to be: it is not
    a regular file, it is larger than the format allows, or the OS refused to open it."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path.name}: {reason}")


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path | str) -> int:
    """An fd for reading ``path``, which must be a regular file; :class:`FileProblem` if not.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a
    writer; the type is checked on the open file, so it cannot change in between.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise FileProblem(path, _open_problem(path, exc)) from None
    except ValueError as exc:  # an embedded NUL byte
        raise FileProblem(path, f"cannot open: {exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise FileProblem(path, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FileProblem(path, f"is {kind_of(mode)}, not a regular file")
    return fd


def _open_problem(path: Path | str, exc: OSError) -> str:
    """strerror, but name a socket (opening one fails with ENXIO) for what it is."""
    try:
        if exc.errno == errno.ENXIO and stat.S_ISSOCK(os.stat(path).st_mode):
            return "is a socket, not a regular file"
    except OSError:
        pass
    return f"cannot open: {exc.strerror or exc}"


def read_bounded(path: Path, limit: int, what: str) -> bytes | None:
    """The whole of a small file (None if it does not exist); :class:`FileProblem` if it
    is not a regular file or holds more than ``limit`` bytes (``what`` names the limit)."""
    if not os.path.lexists(path):
        return None
    fd = open_regular(path)
    try:
        if file_size(fd, path) > limit:  # refused before reading a byte of it
            raise FileProblem(path, f"larger than {limit} bytes, the most {what} can be")
        return read_at_most(fd, path, limit, what)
    finally:
        os.close(fd)


def read_at_most(fd: int, path: Path, limit: int, what: str) -> bytes:
    """Up to ``limit`` bytes from ``fd``'s start; :class:`FileProblem` if there are more."""
    chunks: list[bytes] = []
    got = 0
    try:
        while got <= limit:
            chunk = os.pread(fd, min(1 << 20, limit + 1 - got), got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise FileProblem(path, f"cannot read: {exc.strerror or exc}") from None
    if got > limit:
        raise FileProblem(path, f"larger than {limit} bytes, the most {what} can be")
    return b"".join(chunks)


def pread_exact(fd: int, path: Path, offset: int, n: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    chunks: list[bytes] = []
    try:
        while n > 0:
            chunk = os.pread(fd, n, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
    except OSError as exc:
        raise FileProblem(path, exc.strerror or str(exc)) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the parts of the first ``size`` bytes that may hold data.

    Holes -- never written, or allocated ahead of the writes (ext4 reports
    unwritten extents as holes) -- read as zeros and are skipped.  Where the
    filesystem cannot tell, the whole file is one extent.
    """
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data from pos on
                break
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError:  # SEEK_DATA unsupported: assume data throughout
        return [(0, size)]
    return out


def written_end(fd: int, path: Path, size: int) -> int:
    """Offset after the last non-zero byte among the first ``size`` bytes of ``fd``.

    A segment may end in space reserved ahead of its writes (zeros, not data), and
    may be a huge sparse file: the data extents say where to look, so the zeros of
    a hole are never read, and the last extent is read backwards in growing chunks.
    """
    for start, end in reversed(_data_extents(fd, size)):
        chunk = 4096
        while end > start:
            lo = max(start, end - chunk)
            block = pread_exact(fd, path, lo, end - lo)
            stripped = len(block.rstrip(b"\x00"))
            if stripped:
                return lo + stripped
            end = lo
            chunk = min(chunk * 4, 1 << 20)
    return 0


def written_end_of(path: Path, size: int | None = None) -> int:
    """:func:`written_end` of the first ``size`` bytes (default: all) of the file at
    ``path``; 0 if it cannot be read (the pass that reads it then says why)."""
    try:
        fd = open_regular(path)
    except FileProblem:
        return 0
    try:
        return written_end(fd, path, file_size(fd, path) if size is None else size)
    except FileProblem:
        return 0
    finally:
        os.close(fd)


def file_size(fd: int, path: Path) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise FileProblem(path, exc.strerror or str(exc)) from None


def size_or_zero(path: Path) -> int:
    """A file's size for estimates (progress, a pass's limits); 0 if it cannot be told:
    the pass that reads the file says why."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (after a file in it was made or renamed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
