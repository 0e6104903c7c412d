"""pd-vmm: QEMU guests and the resource pool (issue 10).

No real work yet: the stock core (``ping``, ``note``).
"""

from __future__ import annotations

from actors.pds.base import Core


class VmmCore(Core):
    """The stock behaviour, until this PD's issue gives it its own."""
