"""Loose edges of the capability kernel (issue 8, part 1): malformed tokens and badges are
counted refusals, never a TypeError in the kernel or a cap with a bool badge."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing
from test_attacks import FLEET, WG, refused, token

from ledger.caps import Token
from sims.node import SimNode, build_node, scratch_directory


@pytest.fixture
def node() -> Iterator[SimNode]:
    with scratch_directory("ppn-loose-") as d, structlog.testing.capture_logs():
        n = build_node(d / "ledger", seed=12)
        try:
            yield n
        finally:
            n.close()


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
