"""Attacks on the capability kernel, on a simulated node (real ledger, kernel and cores).

Every attack must end the same way: a :class:`CapRefused` that names the code,
the cap and the right; one more in ``kernel.refused``; and nothing reaching the
receiver's core.  Messages already queued when a cap is revoked must die at the
receiver (``kernel.dropped``), unseen.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import structlog.testing

from actors.kernel import Kernel
from actors.pds.base import ReplyCap
from ledger.caps import CapRefused, Token
from sims.node import SimNode, build_node, scratch_directory
from tests.cores import recording

FLEET, ADMIN, WG, VMM = "pd-fleet", "pd-network-admin", "pd-wireguard", "pd-vmm"


@pytest.fixture
def node() -> Iterator[SimNode]:
    with scratch_directory("ppn-attacks-") as d, structlog.testing.capture_logs():
        n = build_node(d / "ledger", seed=11, make_core=recording)
        try:
            yield n
        finally:
            n.close()


def token(n: SimNode, pd: str, obj: str) -> Token:
    """``pd``'s token for ``obj`` (the one with most rights, if it holds several)."""
    held = [t for t in n.port(pd).tokens() if n.kernel.state.caps[t.cap_id].obj == obj]
    assert held, f"{pd} holds no cap on {obj}"
    return max(held, key=lambda t: len(n.kernel.state.caps[t.cap_id].rights))


def seen(n: SimNode) -> dict[str, Counter[str]]:
    return {pd: Counter(core.received) for pd, core in n.host.cores.items()}


def refused(n: SimNode, pd: str, attempt: Callable[[], object], code: str,
            cap_id: int | None, right: str | None = None) -> CapRefused:
    """The attempt is refused exactly so, counted once, and no core sees anything."""
    before_seen, before_count = seen(n), n.kernel.refused[(pd, code)]
    size = n.ledger.size
    with pytest.raises(CapRefused) as err:
        attempt()
    exc = err.value
    assert (exc.pd, exc.code, exc.cap_id, exc.right) == (pd, code, cap_id, right), str(exc)
    assert n.kernel.refused[(pd, code)] == before_count + 1
    n.host.run_until_idle()
    assert seen(n) == before_seen and n.ledger.size == size
    assert not n.kernel.state.restarts  # a refusal never crashes anybody
    return exc


def test_a_legitimate_send_arrives_with_the_senders_badge(node: SimNode) -> None:
    tun = token(node, FLEET, "tunnel")
    node.port(FLEET).send(tun, {"op": "hello"})
    node.host.run_until_idle()
    assert node.host.cores[WG].received["hello"] == 1
    assert node.kernel.refused == Counter() and node.kernel.dropped == 0


def test_forged_tokens(node: SimNode) -> None:
    fleet = node.port(FLEET)
    made_up = Token(9_999, FLEET, bytes(range(64)))
    refused(node, FLEET, lambda: fleet.send(made_up, {"op": "x"}), "no-such-cap", 9_999, "write")
    own = token(node, FLEET, "tunnel")
    wrong_sig = Token(own.cap_id, FLEET, bytes(64))
    refused(node, FLEET, lambda: fleet.send(wrong_sig, {"op": "x"}), "bad-token", own.cap_id,
            "write")
    refused(node, FLEET, lambda: fleet.mint(wrong_sig, ("read",)), "bad-token", own.cap_id)


def test_stolen_token(node: SimNode) -> None:
    stolen = token(node, FLEET, "vm.query")
    admin = node.port(ADMIN)
    refused(node, ADMIN, lambda: admin.send(stolen, {"op": "x"}), "not-holder", stolen.cap_id,
            "write")
    refused(node, ADMIN, lambda: admin.copy(stolen), "not-holder", stolen.cap_id)
    refused(node, ADMIN, lambda: admin.revoke(stolen), "not-holder", stolen.cap_id)
    refused(node, ADMIN, lambda: admin.delete(stolen), "not-holder", stolen.cap_id)
    assert stolen.cap_id in node.kernel.state.caps


def test_token_copied_from_the_ledger(node: SimNode) -> None:
    """``ppn ledger show`` prints every grant's signature; that is no key to the cap."""
    out = subprocess.run([sys.executable, "-m", "actors.cli", "ledger", "show", "--json",
                          "--type", "cap.granted", str(node.directory)],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    victim = token(node, FLEET, "tunnel")
    record = next(r for r in map(json.loads, out.splitlines())
                  if r["event"]["cap_id"] == victim.cap_id)
    sig = bytes.fromhex(record["signature"])
    assert sig == victim.signature and record["event"]["holder"] == FLEET
    admin = node.port(ADMIN)
    for copied in (Token(victim.cap_id, ADMIN, sig), Token(victim.cap_id, FLEET, sig)):
        refused(node, ADMIN, functools.partial(admin.send, copied, {"op": "x"}), "not-holder",
                victim.cap_id, "write")


def test_escalation_via_mint_names_the_right(node: SimNode) -> None:
    tun = token(node, FLEET, "tunnel")  # read, write
    fleet = node.port(FLEET)
    exc = refused(node, FLEET, lambda: fleet.mint(tun, ("read", "write", "grant")),
                  "escalation", tun.cap_id, "grant")
    assert "cannot derive 'grant'" in str(exc)


def test_transfer_without_grant(node: SimNode) -> None:
    fleet = node.port(FLEET)
    tun, query = token(node, FLEET, "tunnel"), token(node, FLEET, "vm.query")
    refused(node, FLEET, lambda: fleet.send(tun, {"op": "gift"}, transfer=query),
            "missing-right", tun.cap_id, "grant")
    refused(node, FLEET, lambda: fleet.mint(tun, ("read",), to=ADMIN), "missing-right",
            tun.cap_id, "grant")
    refused(node, FLEET, lambda: fleet.copy(query, to=ADMIN), "missing-right", query.cap_id,
            "grant")
    refused(node, FLEET, lambda: fleet.move(query, ADMIN), "missing-right", query.cap_id,
            "grant")
    assert query.cap_id not in [t.cap_id for t in node.port(ADMIN).tokens()]


def test_use_after_revoke(node: SimNode) -> None:
    wg = node.port(WG)
    original = token(node, WG, "tunnel")
    given = wg.mint(original, ("read", "write"), badge=42, to=FLEET)
    fleet = node.port(FLEET)
    fleet.send(given, {"op": "before"})
    node.host.run_until_idle()
    assert node.host.cores[WG].received["before"] == 1
    system_given = token(node, FLEET, "tunnel")
    assert wg.revoke(original) >= 2
    for dead in (given, system_given):
        refused(node, FLEET, functools.partial(fleet.send, dead, {"op": "after"}),
                "no-such-cap", dead.cap_id, "write")
    wg.send(original, {"op": "own"})  # revoke keeps the cap itself
    node.host.run_until_idle()
    assert node.host.cores[WG].received["own"] == 1


def test_descendant_after_an_ancestor_is_revoked(node: SimNode) -> None:
    wg, admin, fleet = node.port(WG), node.port(ADMIN), node.port(FLEET)
    a = wg.mint(token(node, WG, "tunnel"), ("read", "write", "grant"), to=ADMIN)
    b = admin.mint(a, ("read", "write"), badge=7, to=FLEET)
    c = fleet.copy(b)
    assert admin.revoke(a) == 2
    for dead in (b, c):
        refused(node, FLEET, functools.partial(fleet.send, dead, {"op": "x"}), "no-such-cap",
                dead.cap_id, "write")
    refused(node, FLEET, lambda: fleet.mint(c, ("read",)), "no-such-cap", c.cap_id)
    admin.send(a, {"op": "still"})
    node.host.run_until_idle()
    assert node.host.cores[WG].received["still"] == 1


def test_message_queued_before_revoke_never_arrives(node: SimNode) -> None:
    node.host.run_until_idle()  # what the cores asked at boot (pd-network-admin's bind)
    wg, admin, fleet = node.port(WG), node.port(ADMIN), node.port(FLEET)
    a = wg.mint(token(node, WG, "tunnel"), ("read", "write", "grant"), to=ADMIN)
    b = admin.mint(a, ("read", "write"), to=FLEET)
    fleet.send(b, {"op": "queued"})
    admin.send(a, {"op": "gift"}, transfer=admin.mint(a, ("read",)))
    assert node.host.pending == 2
    before = seen(node)
    admin.revoke(a)  # b and the gift go; a stays
    node.host.run_until_idle()
    assert node.kernel.dropped == 2
    assert seen(node) == before
    assert not [t for t in wg.tokens() if node.kernel.state.caps[t.cap_id].parent == a.cap_id]


def test_move_leaves_the_old_holder_nothing(node: SimNode) -> None:
    wg, admin = node.port(WG), node.port(ADMIN)
    a = wg.mint(token(node, WG, "peers"), ("read", "write", "grant"), to=ADMIN)
    moved = admin.move(a, FLEET)
    assert moved.holder == FLEET
    refused(node, ADMIN, lambda: admin.send(a, {"op": "x"}), "not-holder", a.cap_id, "write")
    node.port(FLEET).send(moved, {"op": "mine"})
    node.host.run_until_idle()
    assert node.host.cores[WG].received["mine"] == 1


def test_reaped_pd_tokens_are_dead(node: SimNode) -> None:
    wg = node.port(WG)
    handed = wg.mint(token(node, WG, "tunnel"), ("read", "write"), to="pd-genesis")
    node.host.reap("pd-genesis", "ceremony over")
    genesis = node.port("pd-genesis")
    refused(node, "pd-genesis", lambda: genesis.send(handed, {"op": "x"}), "no-such-cap",
            handed.cap_id, "write")
    refused(node, WG, lambda: wg.mint(token(node, WG, "tunnel"), (), to="pd-genesis"),
            "bad-target", token(node, WG, "tunnel").cap_id)


def test_reply_caps_are_one_shot(node: SimNode) -> None:
    wg, fleet, vmm = node.port(WG), node.port(FLEET), node.port(VMM)
    callable_tun = wg.mint(token(node, WG, "tunnel"), ("write", "grant-reply"), to=FLEET)
    fleet.call(callable_tun, {"op": "ping"})
    node.host.run_until_idle()  # pd-wireguard's core answers
    assert node.host.cores[WG].received["ping"] == 1
    assert node.host.cores[FLEET].received["pong"] == 1
    used = ReplyCap(1)
    refused(node, WG, lambda: wg.reply(used, {"op": "again"}), "bad-token", None)
    refused(node, VMM, lambda: vmm.reply(used, {"op": "forged"}), "bad-token", None)
    refused(node, VMM, lambda: vmm.reply(ReplyCap(77), {"op": "forged"}), "bad-token",
            None)


def test_a_guessed_reply_cap_cannot_cancel_a_call(node: SimNode) -> None:
    wg, fleet, vmm = node.port(WG), node.port(FLEET), node.port(VMM)
    callable_tun = wg.mint(token(node, WG, "tunnel"), ("write", "grant-reply"), to=FLEET)
    fleet.call(callable_tun, {"op": "ping"})
    with pytest.raises(CapRefused) as err:  # the call is in flight; pd-vmm guesses its id
        vmm.reply(ReplyCap(1), {"op": "pong", "from": "an impostor"})
    assert (err.value.code, err.value.pd) == ("bad-token", VMM)
    node.host.run_until_idle()
    assert node.host.refusals == []  # pd-wireguard's real answer goes through
    assert node.host.cores[FLEET].received["pong"] == 1


# --------------------------------------------------------------------- kernel bugs found here
def test_call_with_a_stolen_or_forged_token(node: SimNode) -> None:
    stolen = token(node, FLEET, "tunnel")  # read, write: no grant, no grant-reply
    forged = Token(stolen.cap_id, FLEET, bytes(64))
    for pd, tok, code in ((ADMIN, stolen, "not-holder"), (FLEET, forged, "bad-token")):
        with pytest.raises(CapRefused) as err:
            node.port(pd).call(tok, {"op": "ping"})
        assert (err.value.pd, err.value.code, err.value.cap_id) == (pd, code, stolen.cap_id)
        assert "read,write" not in str(err.value)  # nothing learnt about a cap not held
        assert node.kernel.refused[(pd, code)] == 1


def test_routing_is_the_same_after_a_kernel_restart(node: SimNode) -> None:
    net_driver = node.port("pd-net-driver")
    net_driver.delete(token(node, "pd-net-driver", "net"))
    assert node.kernel.owner("net") == "pd-net-driver"
    assert Kernel(node.ledger).owner("net") == "pd-net-driver"


def test_a_call_dropped_in_flight_leaves_no_reply_cap_behind(node: SimNode) -> None:
    wireguard, fleet = node.port("pd-wireguard"), node.port("pd-fleet")
    original = token(node, "pd-wireguard", "tunnel")
    callable_cap = wireguard.mint(original, ("write", "grant-reply"), to=FLEET)
    fleet.call(callable_cap, {"op": "ping"})
    wireguard.revoke(original)  # the call is still queued
    before = node.kernel.dropped
    node.host.run_until_idle()
    assert node.kernel.dropped == before + 1
    assert node.kernel._calls == {}
