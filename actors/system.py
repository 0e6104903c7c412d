"""The system description: the PDs, their channels and initial capabilities, as data.

Loaded from ``system.toml`` (shipped beside this module).  A malformed or
inconsistent description is refused with a :class:`SystemDescriptionError`
that names the offending key, e.g. ``cap[3].holder``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ledger.catalog import RIGHTS, CapGranted, PdDeclared

ALL_RIGHTS = RIGHTS


class SystemDescriptionError(ValueError):
    """The system description is malformed or inconsistent; the message names the key."""


@dataclass(frozen=True)
class PdSpec:
    name: str
    priority: int
    serves: tuple[str, ...]


@dataclass(frozen=True)
class CapSpec:
    holder: str
    obj: str
    rights: tuple[str, ...]
    badge: int | None


@dataclass(frozen=True)
class SystemDescription:
    name: str
    pds: tuple[PdSpec, ...]
    channels: tuple[tuple[str, str], ...]
    caps: tuple[CapSpec, ...]

    def owner_of(self, obj: str) -> str:
        if obj.startswith("endpoint:"):
            return obj.removeprefix("endpoint:")
        return next(p.name for p in self.pds if obj in p.serves)

    def initial_events(self) -> list[PdDeclared | CapGranted]:
        """The ledger events that set up this description's PDs and capabilities."""
        out: list[PdDeclared | CapGranted] = [PdDeclared(p.name, p.priority) for p in self.pds]
        originals: dict[str, int] = {}
        for p in self.pds:
            for obj in (f"endpoint:{p.name}", *p.serves):
                originals[obj] = len(originals) + 1
                out.append(CapGranted(originals[obj], p.name, obj, ALL_RIGHTS, None, None,
                                      "system"))
        next_id = len(originals) + 1
        for c in self.caps:
            out.append(CapGranted(next_id, c.holder, c.obj, c.rights, c.badge,
                                  originals[c.obj], "system"))
            next_id += 1
        return out


def _get(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise SystemDescriptionError(f"{where}.{key}: missing")
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SystemDescriptionError(f"{where}.{key}: must be {kind.__name__}")
    return value


def _check_keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SystemDescriptionError(f"{where}: must be a table")
    extra = sorted(set(table) - allowed)
    if extra:
        raise SystemDescriptionError(f"{where}.{extra[0]}: unknown key")
    return table


def parse(text: str) -> SystemDescription:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SystemDescriptionError(f"not valid TOML: {exc}") from None
    _check_keys(doc, {"system", "pd", "channel", "cap"}, "<top>")
    system = _check_keys(doc.get("system"), {"name", "version"}, "system")
    pds: list[PdSpec] = []
    for i, t in enumerate(doc.get("pd", [])):
        t = _check_keys(t, {"name", "priority", "serves"}, f"pd[{i}]")
        serves = tuple(_get(t, "serves", list, f"pd[{i}]"))
        pds.append(PdSpec(_get(t, "name", str, f"pd[{i}]"),
                          _get(t, "priority", int, f"pd[{i}]"), serves))
    names = [p.name for p in pds]
    for i, p in enumerate(pds):
        if names.index(p.name) != i:
            raise SystemDescriptionError(f"pd[{i}].name: duplicate PD {p.name!r}")
    objects = {f"endpoint:{n}" for n in names}
    for i, p in enumerate(pds):
        for obj in p.serves:
            if not isinstance(obj, str) or obj in objects:
                raise SystemDescriptionError(f"pd[{i}].serves: {obj!r} is not a new object name")
            objects.add(obj)
    channels = []
    for i, t in enumerate(doc.get("channel", [])):
        t = _check_keys(t, {"from", "to"}, f"channel[{i}]")
        ends = (_get(t, "from", str, f"channel[{i}]"), _get(t, "to", str, f"channel[{i}]"))
        for key, end in zip(("from", "to"), ends, strict=True):
            if end not in names:
                raise SystemDescriptionError(f"channel[{i}].{key}: no PD named {end!r}")
        channels.append(ends)
    caps = [_cap(i, t, names, objects) for i, t in enumerate(doc.get("cap", []))]
    return SystemDescription(_get(system, "name", str, "system"), tuple(pds),
                             tuple(channels), tuple(caps))


def _cap(i: int, t: Any, names: list[str], objects: set[str]) -> CapSpec:
    where = f"cap[{i}]"
    t = _check_keys(t, {"holder", "object", "rights", "badge"}, where)
    holder, obj = _get(t, "holder", str, where), _get(t, "object", str, where)
    if holder not in names:
        raise SystemDescriptionError(f"{where}.holder: no PD named {holder!r}")
    if obj not in objects:
        raise SystemDescriptionError(f"{where}.object: no PD serves {obj!r}")
    rights = tuple(_get(t, "rights", list, where))
    bad = [r for r in rights if r not in ALL_RIGHTS]
    if bad or len(set(rights)) != len(rights):
        raise SystemDescriptionError(f"{where}.rights: {bad or rights} (allowed: "
                                     f"{', '.join(ALL_RIGHTS)}, each once)")
    badge = t.get("badge")
    if badge is not None and (not isinstance(badge, int) or isinstance(badge, bool)
                              or not 0 <= badge < 2**63):
        raise SystemDescriptionError(f"{where}.badge: must be an integer in [0, 2^63)")
    return CapSpec(holder, obj, tuple(r for r in ALL_RIGHTS if r in rights), badge)


def load_default() -> SystemDescription:
    """The description shipped with the project."""
    return parse(resources.files("actors").joinpath("system.toml").read_text())
