"""Guest profiles and QEMU settings: the shipped file and a node's own, read strictly.

:func:`load` reads ``actors/vm_profiles.toml`` (:data:`SHIPPED`) and then, if there is
one, the node's ``DIR/vm-profiles.toml`` (:data:`NODE_FILE`): a profile there replaces
the shipped one of its name, and ``[limits]`` and ``[qemu]`` keys replace the shipped
keys.  Every value is checked; anything odd is a :class:`ProfileError` naming the
file, the key and the rule (``vm-profiles.toml: profiles.tiny.vcpus: 0 is not 1-32``),
and nothing of that file is used.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from ledger.vms import NAME_RE

SHIPPED = Path(__file__).with_name("vm_profiles.toml")
NODE_FILE = "vm-profiles.toml"
SUPERVISION = ("auto", "direct", "systemd")
MAX_FILE = 1 << 16
_MACHINE = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
_BINARY = re.compile(r"[A-Za-z0-9_./+-]{1,200}")
_LIMITS = {"vcpus": (1, 1024), "ram_mib": (16, 1 << 22)}  # what a limit itself may be
_QEMU_KEYS = {"binary": str, "machine": str, "supervision": str, "tcg_cache_mib": int}


class ProfileError(ValueError):
    """A profiles file that cannot be used; the message says where and why."""


def _int(v: Any) -> bool:
    return type(v) is int


def _read(path: Path) -> dict[str, Any]:
    try:  # non-blocking: a FIFO (or a device) put there must not hang the reader
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ProfileError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProfileError(f"{path.name}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ProfileError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE:
        raise ProfileError(f"{path.name}: larger than {MAX_FILE} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"{path.name}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path.name}: not TOML: {exc}") from None
    unknown = sorted(set(doc) - {"limits", "qemu", "profiles"})
    if unknown:
        raise ProfileError(f"{path.name}: unknown table {unknown[0]!r} (limits, qemu, profiles)")
    for table in ("limits", "qemu", "profiles"):
        if table in doc and type(doc[table]) is not dict:
            raise ProfileError(f"{path.name}: {table} must be a table")
    return doc


def _limits(where: str, table: dict[str, Any], into: dict[str, list[int]]) -> None:
    for key, value in table.items():
        if key not in _LIMITS:
            raise ProfileError(f"{where}: limits.{key}: unknown (vcpus, ram_mib)")
        lo_max, hi_max = _LIMITS[key]
        if (type(value) is not list or len(value) != 2 or not all(map(_int, value))
                or not lo_max <= value[0] <= value[1] <= hi_max):
            raise ProfileError(f"{where}: limits.{key}: must be [LOW, HIGH] with "
                               f"{lo_max} <= LOW <= HIGH <= {hi_max}")
        into[key] = list(value)


def _qemu(where: str, table: dict[str, Any], into: dict[str, Any]) -> None:
    for key, value in table.items():
        want = _QEMU_KEYS.get(key)
        if want is None:
            raise ProfileError(f"{where}: qemu.{key}: unknown ({', '.join(_QEMU_KEYS)})")
        if type(value) is not want:
            raise ProfileError(f"{where}: qemu.{key}: must be a {want.__name__}")
        into[key] = value
    if not _BINARY.fullmatch(into["binary"]):
        raise ProfileError(f"{where}: qemu.binary: a command name or path of "
                           "A-Z a-z 0-9 _ . / + -")
    if not _MACHINE.fullmatch(into["machine"]):
        raise ProfileError(f"{where}: qemu.machine: a QEMU machine type such as pc or q35")
    if into["supervision"] not in SUPERVISION:
        raise ProfileError(f"{where}: qemu.supervision: one of {', '.join(SUPERVISION)}")
    if not 1 <= into["tcg_cache_mib"] <= 4096:
        raise ProfileError(f"{where}: qemu.tcg_cache_mib: 1-4096")


def _profile(where: str, base: Path, name: str, p: Any) -> dict[str, Any]:
    if not NAME_RE.fullmatch(name) or len(name) > 24:
        raise ProfileError(f"{where}: profile {name[:40]!r}: use 1-24 of a-z, 0-9 and '-'")
    if type(p) is not dict:
        raise ProfileError(f"{where}: profiles.{name}: must be a table")
    unknown = sorted(set(p) - {"vcpus", "ram_mib", "image", "description"})
    if unknown:
        raise ProfileError(f"{where}: profiles.{name}.{unknown[0]}: unknown "
                           "(vcpus, ram_mib, image, description)")
    for key in ("vcpus", "ram_mib"):
        if key not in p:
            raise ProfileError(f"{where}: profiles.{name}: no {key}")
        if not _int(p[key]):
            raise ProfileError(f"{where}: profiles.{name}.{key}: must be a whole number")
    image = p.get("image")
    if image is not None:
        if type(image) is not str or not 0 < len(image) <= 200 or "," in image or \
                not image.isprintable():
            raise ProfileError(f"{where}: profiles.{name}.image: a path (no commas), "
                               "at most 200 characters")
        try:
            path = (base / image).resolve()
            found = path.is_file()
        except (OSError, RuntimeError) as exc:  # a loop of links, a name too long
            raise ProfileError(f"{where}: profiles.{name}.image: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        if not found:
            raise ProfileError(f"{where}: profiles.{name}.image: no file {str(path)[:120]}")
        image = str(path)
    description = p.get("description", "")
    if type(description) is not str or len(description) > 200:
        raise ProfileError(f"{where}: profiles.{name}.description: at most 200 characters")
    return {"vcpus": p["vcpus"], "ram_mib": p["ram_mib"], "image": image}


def load(node_dir: Path | None = None, shipped: Path = SHIPPED) -> dict[str, Any]:
    """``{"profiles", "limits", "qemu"}`` from the shipped file and the node's own."""
    limits: dict[str, list[int]] = {}
    qemu: dict[str, Any] = {"binary": "qemu-system-x86_64", "machine": "pc",
                            "supervision": "auto", "tcg_cache_mib": 32}
    profiles: dict[str, dict[str, Any]] = {}
    files = [shipped]
    if node_dir is not None and (node_dir / NODE_FILE).exists():
        files.append(node_dir / NODE_FILE)
    for path in files:
        doc = _read(path)
        _limits(path.name, doc.get("limits", {}), limits)
        _qemu(path.name, doc.get("qemu", {}), qemu)
        for name, p in doc.get("profiles", {}).items():
            profiles[name] = _profile(path.name, path.parent, name, p)
    missing = sorted(set(_LIMITS) - set(limits))
    if missing:
        raise ProfileError(f"{files[-1].name}: no limits.{missing[0]}")
    if not profiles:
        raise ProfileError(f"{files[-1].name}: no profiles")
    for name, p in sorted(profiles.items()):
        for key in ("vcpus", "ram_mib"):
            lo, hi = limits[key]
            if not lo <= p[key] <= hi:
                raise ProfileError(f"{files[-1].name}: profiles.{name}.{key}: {p[key]} is "
                                   f"not {lo}-{hi} (limits.{key})")
    return {"profiles": profiles, "limits": limits, "qemu": qemu}
