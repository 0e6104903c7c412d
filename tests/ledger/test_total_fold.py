"""No sequence of appends can brick the log: the fold is total (issue 8, part 1).

The review's batch ``[CapGranted(n, parent=1), CapGranted(n, parent=9), CapDeleted(n),
CapDeleted(1)]`` made the fold raise KeyError: every later append failed, the ledger
never opened again and ``ppn ledger verify`` printed a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import NO_FLAG, append_fitting, counting_clock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import audit
from ledger import log as log_module
from ledger.catalog import (
    CapDeleted,
    CapGranted,
    CapMoved,
    CapRevoked,
    MemberAdded,
    MemberRemoved,
    PdDeclared,
    PdReaped,
    PdSpawned,
)
from ledger.keys import NodeKeys
from ledger.log import EventUnfit, Ledger
from ledger.scan import LogReader
from ledger.state import INAPPLICABLE, State, apply_items

ROOT = Path(__file__).resolve().parents[2]
PDS = ["pd-a", "pd-b", "pd-c"]
KEYS = NodeKeys.generate()


def grant(cap_id: int, parent: int | None, holder: str = "pd-a") -> CapGranted:
    return CapGranted(cap_id, holder, "tunnel", ("read",), None, parent, "mint")


def review_batch() -> list[object]:
    return [grant(1, None), grant(9, None), grant(5, 1), grant(5, 9), CapDeleted(5, "pd-a", "x"),
            CapDeleted(1, "pd-a", "x")]


def test_the_ledger_refuses_a_batch_its_fold_cannot_apply(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led = Ledger.create(d, KEYS, "t.ppn/ledger", clock=counting_clock(), options=NO_FLAG)
    size, root = led.size, led.root()
    with pytest.raises(EventUnfit, match=r"event 4 of 6 \(cap.granted\): cap #5 exists"):
        led.append_many(review_batch())
    assert (led.size, led.root()) == (size, root) and not led.state.caps
    led.append(PdDeclared("after", 1))  # later appends still work
    led.close()
    with Ledger.open(d, KEYS, options=NO_FLAG) as again:
        assert again.size == size + 1


def test_a_log_an_older_writer_filled_with_unfit_events_still_replays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold stays total for logs this writer did not check (an older one's, say)."""
    monkeypatch.setattr(log_module, "unfit", lambda state, events: None)
    d = tmp_path / "l"
    led = Ledger.create(d, KEYS, "t.ppn/ledger", clock=counting_clock(), options=NO_FLAG)
    led.append_many(review_batch())
    led.append(PdDeclared("after", 1))
    counts = dict(led.state.event_counts)
    led.close()
    assert counts["cap.granted" + INAPPLICABLE] == 1  # the second grant of id 5
    with Ledger.open(d, KEYS, options=NO_FLAG) as again:
        assert again.state.to_obj() == replayed(d).to_obj()
        assert set(again.state.caps) == {9}  # 5 (the first grant, under 1) and 1 deleted
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "ledger", "verify", d],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr


def replayed(d: Path) -> State:
    state = State()
    LogReader(d).fold(state, apply_items)
    return state


ids = st.integers(1, 6)
events = st.one_of(
    st.builds(grant, ids, st.none() | ids, st.sampled_from(PDS)),
    st.builds(CapMoved, ids, st.sampled_from(PDS), st.sampled_from(PDS)),
    st.builds(CapDeleted, ids, st.sampled_from(PDS), st.just("gone")),
    st.builds(CapRevoked, ids, st.integers(0, 5)),
    st.builds(PdReaped, st.sampled_from(PDS), st.just("done")),
    st.builds(PdSpawned, st.sampled_from(PDS), st.just("again")),
    st.builds(PdDeclared, st.sampled_from(PDS), st.integers(0, 9)),
    st.builds(lambda n: MemberAdded(f"n{n}", bytes(32), bytes(32), "10.8.0.9", None, "node"),
              st.integers(0, 2)),
    st.builds(lambda n: MemberRemoved(f"n{n}", "left"), st.integers(0, 2)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(events, min_size=1, max_size=6), min_size=1, max_size=8))
def test_no_sequence_of_appends_bricks_the_log(batches: list[list[Any]]) -> None:
    """Any events, any fields, in any batches: each batch commits whole or is refused whole
    (changing nothing), nothing unfit ever lands, the ledger reopens, verify passes, and
    replay gives the live state exactly."""
    d = Path(tempfile.mkdtemp()) / "l"
    try:
        led = Ledger.create(d, KEYS, "t.ppn/ledger", clock=counting_clock(), options=NO_FLAG)
        appended = append_fitting(led, batches)
        live = led.state.to_obj()
        led.close()
        assert not [k for k in live["event_counts"] if k.endswith(INAPPLICABLE)]
        assert replayed(d).to_obj() == live
        with Ledger.open(d, KEYS, options=NO_FLAG) as again:
            assert again.state.to_obj() == live
        assert audit.verify(d, jobs=1).records == 1 + appended
        for cap in replayed(d).caps.values():  # the derivation tree stays a tree
            assert cap.parent is None or cap.parent in live_caps(live)
    finally:
        shutil.rmtree(d.parent)


def live_caps(obj: dict[str, Any]) -> set[int]:
    return {c[0] for c in obj["caps"]}
