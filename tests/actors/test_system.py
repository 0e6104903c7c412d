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
serves = ["x"]
[[pd]]
name = "pd-b"
priority = 2
serves = []
"""


@pytest.mark.parametrize(("extra", "needle"), [
    ('[[pd]]\nname = "pd-a"\npriority = 3\nserves = []\n', "pd[2].name: duplicate PD 'pd-a'"),
    ('[[channel]]\nfrom = "pd-a"\nto = "pd-z"\n', "channel[0].to: no PD named 'pd-z'"),
    ('[[cap]]\nholder = "pd-b"\nobject = "y"\nrights = ["read"]\n',
     "cap[0].object: no PD serves 'y'"),
    ('[[cap]]\nholder = "pd-q"\nobject = "x"\nrights = ["read"]\n', "cap[0].holder: no PD named"),
    ('[[cap]]\nholder = "pd-b"\nobject = "x"\nrights = ["root"]\n', "cap[0].rights"),
    ('[[cap]]\nholder = "pd-b"\nobject = "x"\nrights = ["read"]\nbadge = -1\n', "cap[0].badge"),
    ('[[cap]]\nholder = "pd-b"\nobject = "x"\nrights = ["read"]\ncolour = 1\n',
     "cap[0].colour: unknown key"),
    ('[[pd]]\nname = "pd-c"\npriority = "high"\nserves = []\n', "pd[2].priority: must be int"),
    ('[[pd]]\nname = "pd-c"\npriority = 1\nserves = ["x"]\n', "pd[2].serves: 'x'"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_descriptions_name_the_key(extra: str, needle: str) -> None:
    with pytest.raises(SystemDescriptionError) as err:
        parse(BASE + extra)
    assert needle in str(err.value)
