"""pd-genesis: one pairing ceremony, reaped when it ends (issue 11).

No real work yet: the stock core (``ping``, ``note``).
"""

from __future__ import annotations

from actors.pds.base import Core


class GenesisCore(Core):
    """The stock behaviour, until this PD's issue gives it its own."""
