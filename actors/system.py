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

from ledger.catalog import (
    REGISTRY,
    RIGHTS,
    CapGranted,
    GenesisPolicy,
    MemberAdded,
    NodeIdentity,
    PdDeclared,
    VmPool,
    WgInterface,
)
from ledger.keys import NodeKeys

ALL_RIGHTS = RIGHTS
CHANNEL_RIGHTS = ("write", "grant-reply")
"""What a channel gives its ``from`` PD on ``endpoint:<to>``: send, and call."""
DEFAULT_INTERFACE = "ppn0"
DEFAULT_LISTEN_PORT = 51820
DEFAULT_POOL = VmPool(vcpus=256, reserve_mib=1024, accel="auto")
"""A node's guest capacity unless ``ppn node init`` is told otherwise: the seed's 256
vCPUs, 1 GiB of the host's RAM kept for itself, KVM when it works."""
DEFAULT_PAIRINGS_PER_HOUR = 10
"""Genesis ceremonies a node lets begin in an hour, unless ``ppn node init`` says."""
JOURNAL_OBJECT = "ledger.append"
"""The object a PD's journalling capability is on (served by pd-ledger)."""
RESERVED_FAMILIES = frozenset({"ledger", "node", "cap", "pd"})
"""Event families only the ledger, ``ppn node init``, the kernel and the lifecycle write."""


def families() -> frozenset[str]:
    """Every event family the node's registry has (a tag's part before its first dot)."""
    return frozenset(et.tag.split(".", 1)[0] for et in REGISTRY)


class SystemDescriptionError(ValueError):
    """The system description is malformed or inconsistent; the message names the key."""


@dataclass(frozen=True)
class PdSpec:
    name: str
    priority: int
    badge: int
    serves: tuple[str, ...]
    journals: tuple[str, ...]


@dataclass(frozen=True)
class CapSpec:
    holder: str
    obj: str
    rights: tuple[str, ...]
    badge: int


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

    @property
    def journals(self) -> dict[str, frozenset[str]]:
        """PD -> the event families it may journal."""
        return {p.name: frozenset(p.journals) for p in self.pds}

    def derived(self) -> list[CapSpec]:
        """Every capability derived at start: one per channel, then each ``[[cap]]``."""
        badge = {p.name: p.badge for p in self.pds}
        return [*(CapSpec(a, f"endpoint:{b}", CHANNEL_RIGHTS, badge[a])
                  for a, b in self.channels), *self.caps]

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
        for c in self.derived():
            out.append(CapGranted(next_id, c.holder, c.obj, c.rights, c.badge,
                                  originals[c.obj], "system"))
            next_id += 1
        return out

    def spawn_grants(self, state: Any, pd: str) -> list[CapGranted]:
        """The capabilities a PD is given again when it is spawned after a reap (what it
        had at init, freshly numbered): its endpoint's and its served objects' originals,
        the caps this description derives for it, and the channels to it."""
        spec = next((p for p in self.pds if p.name == pd), None)
        if spec is None:
            return []
        out: list[CapGranted] = []
        next_id = int(state.next_cap_id)
        originals: dict[str, int] = {}
        for obj in (f"endpoint:{pd}", *spec.serves):
            originals[obj] = next_id
            out.append(CapGranted(next_id, pd, obj, ALL_RIGHTS, None, None, "spawn"))
            next_id += 1
        for c in self.derived():
            if c.holder != pd and c.obj not in originals:
                continue
            parent = originals.get(c.obj)
            if parent is None:  # an original another PD holds (pd-ledger's ledger.append)
                parent = next((k.cap_id for k in sorted(state.caps.values(),
                                                        key=lambda k: k.cap_id)
                               if k.obj == c.obj and k.parent is None), None)
            if parent is None:
                continue
            out.append(CapGranted(next_id, c.holder, c.obj, c.rights, c.badge, parent,
                                  "spawn"))
            next_id += 1
        return out

    def first_events(self, name: str, keys: NodeKeys, mesh_ip: str | None, role: str,
                     endpoint: str | None, interface: str = DEFAULT_INTERFACE,
                     listen_port: int = DEFAULT_LISTEN_PORT,
                     pool: VmPool | None = None,
                     pairings_per_hour: int = DEFAULT_PAIRINGS_PER_HOUR) -> list[object]:
        """A new node's ledger after its genesis record: who it is, its own membership
        (unless it has no mesh address yet: then it is waiting to be joined), its
        WireGuard interface, its PDs and their capabilities.  ``ppn node init`` and the
        simulator both use it."""
        me = [] if mesh_ip is None else [
            MemberAdded(name, keys.public_key, keys.wg_public_key, mesh_ip, endpoint, role)]
        return [NodeIdentity(name, keys.public_key, keys.wg_public_key, mesh_ip, role,
                             endpoint),
                *me, WgInterface(interface, listen_port), pool or DEFAULT_POOL,
                GenesisPolicy(pairings_per_hour),
                *self.initial_events()]


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
    known = families()
    for i, t in enumerate(doc.get("pd", [])):
        where = f"pd[{i}]"
        t = _check_keys(t, {"name", "priority", "badge", "serves", "journals"}, where)
        serves = tuple(_get(t, "serves", list, where))
        journals = tuple(_get(t, "journals", list, where))
        for fam in journals:
            if not isinstance(fam, str) or fam not in known or fam in RESERVED_FAMILIES:
                raise SystemDescriptionError(
                    f"{where}.journals: {fam!r} is not an event family a PD may journal "
                    f"(one of {', '.join(sorted(known - RESERVED_FAMILIES))})")
        if len(set(journals)) != len(journals):
            raise SystemDescriptionError(f"{where}.journals: a family is named twice")
        pds.append(PdSpec(_get(t, "name", str, where), _get(t, "priority", int, where),
                          _badge(_get(t, "badge", int, where), f"{where}.badge"), serves,
                          journals))
    names = [p.name for p in pds]
    for i, p in enumerate(pds):
        if names.index(p.name) != i:
            raise SystemDescriptionError(f"pd[{i}].name: duplicate PD {p.name!r}")
        if [q.badge for q in pds].index(p.badge) != i:
            raise SystemDescriptionError(f"pd[{i}].badge: {p.badge} is another PD's badge")
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
        if ends[0] == ends[1] or ends in channels:
            raise SystemDescriptionError(f"channel[{i}]: {ends[0]} -> {ends[1]} is a loop or "
                                         "a duplicate")
        channels.append(ends)
    badges = {p.name: p.badge for p in pds}
    caps = [_cap(i, t, badges, objects) for i, t in enumerate(doc.get("cap", []))]
    for i, p in enumerate(pds):
        journalling = [c for c in caps if c.holder == p.name and c.obj == JOURNAL_OBJECT
                       and "write" in c.rights]
        if p.journals and not journalling:
            raise SystemDescriptionError(f"pd[{i}].journals: {p.name} journals, but no [[cap]] "
                                         f"gives it write on {JOURNAL_OBJECT}")
        if journalling and not p.journals:
            raise SystemDescriptionError(f"cap[{caps.index(journalling[0])}]: {p.name} may "
                                         f"journal no family; a cap on {JOURNAL_OBJECT} "
                                         "would be decorative")
    return SystemDescription(_get(system, "name", str, "system"), tuple(pds),
                             tuple(channels), tuple(caps))


def _badge(value: int, where: str) -> int:
    if not 0 <= value < 2**63:
        raise SystemDescriptionError(f"{where}: must be an integer in [0, 2^63)")
    return value


def _cap(i: int, t: Any, badges: dict[str, int], objects: set[str]) -> CapSpec:
    where = f"cap[{i}]"
    t = _check_keys(t, {"holder", "object", "rights"}, where)
    holder, obj = _get(t, "holder", str, where), _get(t, "object", str, where)
    if holder not in badges:
        raise SystemDescriptionError(f"{where}.holder: no PD named {holder!r}")
    if obj not in objects:
        raise SystemDescriptionError(f"{where}.object: no PD serves {obj!r}")
    rights = tuple(_get(t, "rights", list, where))
    bad = [r for r in rights if r not in ALL_RIGHTS]
    if bad or len(set(rights)) != len(rights):
        raise SystemDescriptionError(f"{where}.rights: {bad or rights} (allowed: "
                                     f"{', '.join(ALL_RIGHTS)}, each once)")
    if obj.startswith("endpoint:"):
        raise SystemDescriptionError(f"{where}.object: endpoint caps come from [[channel]]s")
    return CapSpec(holder, obj, tuple(r for r in ALL_RIGHTS if r in rights), badges[holder])


def load_default() -> SystemDescription:
    """The description shipped with the project."""
    return parse(resources.files("actors").joinpath("system.toml").read_text())
