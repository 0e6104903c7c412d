"""pd-ledger: signs and appends every event; its journalling is the kernel's (journal_as).

No real work yet: the stock core (``ping``, ``note``).
"""

from __future__ import annotations

from actors.pds.base import Core


class LedgerCore(Core):
    """The stock behaviour, until this PD's issue gives it its own."""
