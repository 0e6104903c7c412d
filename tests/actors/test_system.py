"""The system description: the shipped file is valid; bad ones are refused by key."""

from __future__ import annotations

import pytest

from actors.system import SystemDescriptionError, load_default, parse
from ledger.catalog import CapGranted, PdDeclared

SEVEN = {"pd-genesis", "pd-ledger", "pd-wireguard", "pd-net-driver", "pd-vmm", "pd-fleet",
         "pd-network-admin"}


def test_shipped_description() -> None:
    sd = load_default()
    assert {p.name for p in sd.pds} == SEVEN
    events = sd.initial_events()
    assert {e.name for e in events if isinstance(e, PdDeclared)} == SEVEN
    grants = [e for e in events if isinstance(e, CapGranted)]
    assert [g.cap_id for g in grants] == list(range(1, len(grants) + 1))
    by_id = {g.cap_id: g for g in grants}
    for g in grants:
        if g.parent is not None:  # derived caps never exceed their original
            parent = by_id[g.parent]
            assert set(g.rights) <= set(parent.rights) and parent.obj == g.obj
            assert sd.owner_of(g.obj) == parent.holder


BASE = """
[system]
name = "t"
version = 1
[[pd]]
name = "pd-a"
priority = 1
badge = 1
serves = ["x", "ledger.append"]
journals = []
[[pd]]
name = "pd-b"
priority = 2
badge = 2
serves = []
journals = []
"""


@pytest.mark.parametrize(("extra", "needle"), [
    ('[[pd]]\nname = "pd-a"\npriority = 3\nbadge = 3\nserves = []\njournals = []\n',
     "pd[2].name: duplicate PD 'pd-a'"),
    ('[[pd]]\nname = "pd-c"\npriority = 3\nbadge = 2\nserves = []\njournals = []\n',
     "pd[2].badge: 2 is another PD's badge"),
    ('[[pd]]\nname = "pd-c"\npriority = 3\nbadge = 3\nserves = []\njournals = ["cap"]\n',
     "pd[2].journals: 'cap' is not an event family a PD may journal"),
    ('[[pd]]\nname = "pd-c"\npriority = 3\nbadge = 3\nserves = []\njournals = ["zz"]\n',
     "pd[2].journals: 'zz' is not an event family"),
    ('[[pd]]\nname = "pd-c"\npriority = 3\nbadge = 3\nserves = []\njournals = ["mesh"]\n',
     "pd[2].journals: pd-c journals, but no [[cap]] gives it write on ledger.append"),
    ('[[cap]]\nholder = "pd-b"\nobject = "ledger.append"\nrights = ["write"]\n',
     "cap[0]: pd-b may journal no family"),
    ('[[cap]]\nholder = "pd-b"\nobject = "endpoint:pd-a"\nrights = ["write"]\n',
     "cap[0].object: endpoint caps come from [[channel]]s"),
    ('[[channel]]\nfrom = "pd-a"\nto = "pd-a"\n', "channel[0]: pd-a -> pd-a is a loop"),
    ('[[channel]]\nfrom = "pd-a"\nto = "pd-z"\n', "channel[0].to: no PD named 'pd-z'"),
    ('[[cap]]\nholder = "pd-b"\nobject = "y"\nrights = ["read"]\n',
     "cap[0].object: no PD serves 'y'"),
    ('[[cap]]\nholder = "pd-q"\nobject = "x"\nrights = ["read"]\n', "cap[0].holder: no PD named"),
    ('[[cap]]\nholder = "pd-b"\nobject = "x"\nrights = ["root"]\n', "cap[0].rights"),
    ('[[cap]]\nholder = "pd-b"\nobject = "x"\nrights = ["read"]\nbadge = 9\n',
     "cap[0].badge: unknown key"),
    ('[[cap]]\nholder = "pd-b"\nobject = "x"\nrights = ["read"]\ncolour = 1\n',
     "cap[0].colour: unknown key"),
    ('[[pd]]\nname = "pd-c"\npriority = "high"\nbadge = 3\nserves = []\njournals = []\n',
     "pd[2].priority: must be int"),
    ('[[pd]]\nname = "pd-c"\npriority = 1\nbadge = 3\nserves = ["x"]\njournals = []\n',
     "pd[2].serves: 'x'"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_descriptions_name_the_key(extra: str, needle: str) -> None:
    with pytest.raises(SystemDescriptionError) as err:
        parse(BASE + extra)
    assert needle in str(err.value)


def test_every_entry_of_the_shipped_description_is_used() -> None:
    """Channels are the endpoint caps; journals are what the kernel lets each PD append,
    each under a cap on ledger.append; every derived cap carries its holder's badge."""
    sd = load_default()
    grants = [e for e in sd.initial_events() if isinstance(e, CapGranted)]
    derived = [g for g in grants if g.parent is not None]
    badge = {p.name: p.badge for p in sd.pds}
    endpoint_caps = {(g.holder, g.obj.removeprefix("endpoint:")) for g in derived
                     if g.obj.startswith("endpoint:")}
    assert endpoint_caps == set(sd.channels) and len(sd.channels) == 5
    assert all(g.badge == badge[g.holder] for g in derived)
    journalling = {g.holder for g in derived if g.obj == "ledger.append"}
    assert journalling == {p.name for p in sd.pds if p.journals} == {
        "pd-genesis", "pd-network-admin", "pd-wireguard", "pd-vmm"}
    assert sd.journals["pd-network-admin"] == frozenset({"mesh"})
    assert sd.journals["pd-vmm"] == frozenset({"vm"})
    assert sd.journals["pd-fleet"] == frozenset()
