"""Loose edges of the capability kernel (issue 8, part 1): malformed tokens and badges are
counted refusals, never a TypeError in the kernel or a cap with a bool badge."""

from __future__ import annotations

from typing import Any

import pytest
import test_attacks
from test_attacks import FLEET, WG, refused, token

from actors import kernel as kernel_module
from actors.pds.base import ReplyCap
from ledger.caps import CapRefused, Token
from sims.node import SimNode

node = test_attacks.node  # the same fixture: a simulated node, real ledger and kernel


@pytest.mark.parametrize("make", [
    lambda own: Token(own.cap_id, FLEET, own.signature.hex()),       # a str signature
    lambda own: Token(own.cap_id, FLEET, None),                      # no signature
    lambda own: Token(own.cap_id, FLEET, own.signature[:32]),        # a short one
    lambda own: Token([own.cap_id], FLEET, own.signature),           # an unhashable cap id
    lambda own: Token(float(own.cap_id), FLEET, own.signature),      # a float cap id
    lambda own: Token(True, FLEET, own.signature),                   # a bool cap id
    lambda own: Token(own.cap_id, None, own.signature),              # no holder
    lambda own: (own.cap_id, FLEET, own.signature),                  # not a Token at all
], ids=["str-sig", "none-sig", "short-sig", "list-id", "float-id", "bool-id", "none-holder",
        "tuple"])
def test_malformed_tokens_are_counted_refusals(node: SimNode, make: Any) -> None:
    fleet = node.port(FLEET)
    bad = make(token(node, FLEET, "tunnel"))
    cap_id = bad.cap_id if isinstance(bad, Token) and type(bad.cap_id) is int else None
    refused(node, FLEET, lambda: fleet.send(bad, {"op": "x"}), "bad-token", cap_id, "write")
    refused(node, FLEET, lambda: fleet.mint(bad, ("read",)), "bad-token", cap_id)
    good = token(node, FLEET, "tunnel")
    fleet.send(good, {"op": "still-fine"})
    node.host.run_until_idle()
    assert node.host.cores[WG].received["still-fine"] == 1


@pytest.mark.parametrize("badge", [True, False, 1.5, "7", -1, 2**64])
def test_badges_must_be_small_whole_numbers(node: SimNode, badge: Any) -> None:
    wg = node.port(WG)
    original = token(node, WG, "tunnel")  # the unbadged original: a badge may be set
    assert node.kernel.state.caps[original.cap_id].badge is None
    refused(node, WG, lambda: wg.mint(original, ("read",), badge=badge, to=FLEET),
            "bad-request", original.cap_id)
    assert wg.mint(original, ("read",), badge=5) is not None  # control: a real badge


def test_a_callee_cannot_guess_the_reply_cap_of_a_call_in_flight(node: SimNode) -> None:
    """Reply ids were 1, 2, 3...: pd-wireguard (the callee) could answer a call before it
    was handed to it.  Now they are unguessable (seeded in the simulator)."""
    wg, fleet = node.port(WG), node.port(FLEET)
    callable_tun = wg.mint(token(node, WG, "tunnel"), ("write", "grant-reply"), to=FLEET)
    fleet.call(callable_tun, {"op": "ping"})
    node.host.run_until_idle()
    for guess in range(1, 50):  # the ids a counter would have given the next calls
        fleet.call(callable_tun, {"op": "ping"})
        with pytest.raises(CapRefused):
            wg.reply(ReplyCap(guess), {"op": "pong", "from": "before it was asked"})
        node.host.run_until_idle()
    assert node.host.cores[FLEET].received["pong"] == 50  # every real answer went through


def test_unanswered_calls_are_bounded(node: SimNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_module, "MAX_PENDING_CALLS", 5)
    wg, fleet = node.port(WG), node.port(FLEET)
    callable_tun = wg.mint(token(node, WG, "tunnel"), ("write", "grant-reply"), to=FLEET)
    for _ in range(5):
        fleet.call(callable_tun, {"op": "ping"})  # not delivered yet: five waiting
    before = node.kernel.refused[(FLEET, "too-many-calls")]
    with pytest.raises(CapRefused) as err:
        fleet.call(callable_tun, {"op": "ping"})
    assert (err.value.code, err.value.cap_id) == ("too-many-calls", callable_tun.cap_id)
    assert node.kernel.refused[(FLEET, "too-many-calls")] == before + 1
    node.host.run_until_idle()  # answered: the table is empty again
    fleet.call(callable_tun, {"op": "ping"})
    node.host.run_until_idle()
    assert node.host.cores[FLEET].received["pong"] == 6


def test_a_port_cannot_be_turned_into_another_pds(node: SimNode) -> None:
    fleet = node.port(FLEET)
    with pytest.raises(AttributeError):
        fleet.pd = "pd-ledger"  # type: ignore[misc]
    assert fleet.pd == FLEET
    wg_tok = token(node, WG, "tunnel")  # a token of another PD's stays useless to this port
    refused(node, FLEET, lambda: fleet.send(wg_tok, {"op": "x"}), "not-holder", wg_tok.cap_id,
            "write")
