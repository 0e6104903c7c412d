"""Sealing a finished segment: read-only mode, plus the append-only inode flag where possible.

The flag (``chattr +a``, FS_APPEND_FL) needs CAP_LINUX_IMMUTABLE and a filesystem
that supports it; without them sealing still makes the file read-only and logs why
the flag was not set.  A flagged file cannot be deleted or rewritten, even by root,
until the flag is cleared (:func:`clear_append_only`, or ``chattr -a``).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import structlog

log = structlog.get_logger("ledger")

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
FS_APPEND_FL = 0x00000020


def _flags(fd: int) -> int:
    out = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0))
    return int(struct.unpack("l", out)[0])


def _set_flags(fd: int, value: int) -> None:
    fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", value))


def seal_segment(path: Path, append_only_flag: bool) -> bool:
    """Make ``path`` read-only; True if the append-only flag is now set on it."""
    os.chmod(path, 0o444)
    if not append_only_flag:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        _set_flags(fd, _flags(fd) | FS_APPEND_FL)
        return True
    except OSError as exc:
        log.info("ledger.append_only_flag_unavailable", segment=path.name, reason=exc.strerror)
        return False
    finally:
        os.close(fd)


def is_append_only(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return bool(_flags(fd) & FS_APPEND_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def clear_append_only(path: Path) -> None:
    """Remove the flag (needs CAP_LINUX_IMMUTABLE); for retiring a ledger or tests."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _set_flags(fd, _flags(fd) & ~FS_APPEND_FL)
    except OSError:
        pass
    finally:
        os.close(fd)
