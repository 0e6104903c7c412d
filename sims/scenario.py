"""A seeded scenario of capability traffic between the PDs of one simulated node.

Each step lets virtual time pass (the host delivers what is due), then one PD,
chosen by the scenario's ``random.Random``, does one thing through its port:
mints, copies, moves, deletes or revokes a capability, passes one inside a
message, pings another PD, tries a bad token (stolen, forged, made up), or the
harness injects a crash into another PD's core (no message can make a PD crash).
Refusals are expected -- a PD may try what its caps do not allow -- and are
tallied by code.  The same seed gives the same run: the same
ledger bytes and Merkle root.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from actors.kernel import Port
from ledger.caps import CapRefused, Token
from ledger.catalog import RIGHTS
from ledger.state import Cap
from sims.node import SimNode, build_node

DEFAULT_STEPS = 300

WEIGHTS = {"mint": 22, "copy": 8, "transfer": 10, "move": 5, "delete": 7, "revoke": 4,
           "ping": 24, "send": 10, "forge": 7, "crash": 3}
"""How often each kind of step is chosen (relative)."""


@dataclass
class ScenarioReport:
    """What a run did: per-op successes, refusals by code, and the ledger it left."""

    seed: int
    steps: int
    done: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    handled: int = 0
    restarts: int = 0
    size: int = 0
    root: bytes = b""
    elapsed: float = 0.0

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.done.items()))
        refused = ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items()))
        return (f"seed {self.seed}: {self.steps} steps over {self.elapsed:.3f} virtual s; "
                f"done: {ops}; refused: {refused or 'none'}; dropped at receiver: "
                f"{self.dropped}; handled by cores: {self.handled}; restarts: {self.restarts}; "
                f"ledger: {self.size} records, root {self.root.hex()}")


class Scenario:
    """Drives one node's ports from a seeded ``random.Random``."""

    def __init__(self, node: SimNode, seed: int, *, step_s: float = 0.002) -> None:
        self.node = node
        self.rng = random.Random(f"ppn-sim-scenario/{seed}")
        self.step_s = step_s
        self.report = ScenarioReport(seed, 0)
        self._ops: dict[str, Callable[[Port, list[Token]], None]] = {
            "mint": self._mint, "copy": self._copy, "transfer": self._transfer,
            "move": self._move, "delete": self._delete, "revoke": self._revoke,
            "ping": self._ping, "send": self._send, "forge": self._forge, "crash": self._crash,
        }

    # ----------------------------------------------------------------- driving
    def step(self) -> None:
        node, rng = self.node, self.rng
        # Steps about as far apart as a message's latency: some ops overtake messages in flight.
        node.host.run_for(rng.expovariate(1 / self.step_s))
        pd = rng.choice(self._running())
        port = node.port(pd)
        tokens = port.tokens()
        op = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        self.report.steps += 1
        if not tokens:
            self.report.done["idle"] += 1
            return
        try:
            self._ops[op](port, tokens)
        except CapRefused as exc:
            self.report.refused[exc.code] += 1
        else:
            self.report.done[op] += 1

    def run(self, steps: int = DEFAULT_STEPS) -> ScenarioReport:
        for _ in range(steps):
            self.step()
        host = self.node.host
        host.run_until_idle()
        r = self.report
        r.dropped, r.handled = self.node.kernel.dropped, host.handled
        r.restarts = sum(self.node.kernel.state.restarts.values())
        r.size, r.root = self.node.ledger.size, self.node.ledger.root()
        r.elapsed = host.clock.elapsed
        return r

    # ----------------------------------------------------------------- choices
    def _running(self) -> list[str]:
        state = self.node.kernel.state
        return [pd for pd in state.pds if state.pd_status.get(pd) == "running"]

    def _other(self, pd: str) -> str:
        return self.rng.choice([p for p in self.node.kernel.state.pds if p != pd])

    def _cap(self, token: Token) -> Cap:
        return self.node.kernel.state.caps[token.cap_id]

    def _with(self, tokens: list[Token], *rights: str) -> Token:
        """A token whose cap has one of ``rights`` if there is one, else any token."""
        fit = [t for t in tokens if any(r in self._cap(t).rights for r in rights)]
        return self.rng.choice(fit or tokens)

    # ----------------------------------------------------------------- operations
    def _mint(self, port: Port, tokens: list[Token]) -> None:
        rng, tok = self.rng, self.rng.choice(tokens)
        rights = tuple(r for r in RIGHTS if rng.random() < 0.5)
        badge = rng.randrange(1, 1000) if rng.random() < 0.3 else None
        to = self._other(port.pd) if rng.random() < 0.5 else None
        port.mint(tok, rights, badge, to)

    def _copy(self, port: Port, tokens: list[Token]) -> None:
        to = self._other(port.pd) if self.rng.random() < 0.5 else None
        port.copy(self.rng.choice(tokens), to)

    def _transfer(self, port: Port, tokens: list[Token]) -> None:
        send = self._with(tokens, "grant")
        port.send(send, {"op": "gift"}, transfer=self.rng.choice(tokens))

    def _move(self, port: Port, tokens: list[Token]) -> None:
        port.move(self.rng.choice(tokens), self._other(port.pd))

    def _delete(self, port: Port, tokens: list[Token]) -> None:
        port.delete(self.rng.choice(tokens))

    def _revoke(self, port: Port, tokens: list[Token]) -> None:
        port.revoke(self.rng.choice(tokens))

    def _ping(self, port: Port, tokens: list[Token]) -> None:
        port.call(self._with(tokens, "grant", "grant-reply"), {"op": "ping"})

    def _send(self, port: Port, tokens: list[Token]) -> None:
        port.send(self._with(tokens, "write"), {"op": "note", "step": self.report.steps})

    def _crash(self, port: Port, tokens: list[Token]) -> None:
        victim = self._other(port.pd)
        if self.node.kernel.state.pd_status.get(victim) == "running":
            self.node.host.crash(victim, f"fault injected at step {self.report.steps}")

    def _forge(self, port: Port, tokens: list[Token]) -> None:
        """Present a token this PD must not be able to use."""
        rng, state = self.rng, self.node.kernel.state
        kind = rng.randrange(3)
        others = sorted((c for c in state.caps.values() if c.holder != port.pd),
                        key=lambda c: c.cap_id)
        if kind == 0 and others:  # stolen: another PD's token, signature and all
            victim = rng.choice(others)
            assert victim.sig is not None
            forged = Token(victim.cap_id, victim.holder, victim.sig)
        elif kind == 1:  # its own cap id with a made-up signature
            forged = Token(rng.choice(tokens).cap_id, port.pd, rng.randbytes(64))
        else:  # a cap id nobody was granted
            forged = Token(state.next_cap_id + rng.randrange(1000), port.pd, rng.randbytes(64))
        port.send(forged, {"op": "note"})


def run_scenario(directory: Path, seed: int, steps: int = DEFAULT_STEPS) -> ScenarioReport:
    """Build a node in ``directory`` (new or empty), run the scenario, close the ledger."""
    node = build_node(directory, seed)
    try:
        return Scenario(node, seed).run(steps)
    finally:
        node.close()
