"""Exception families of the ledger.

Two families, in the spirit of h11's local/remote split:

* ``LedgerUsageError`` -- our own code broke a rule (appended something that is
  not a registered event, asked for a record that does not exist).  Fix the caller.
* ``LedgerDataError`` -- bytes that came from outside (a segment file, a snapshot,
  a checkpoint note, a proof) are malformed or do not authenticate.  The data is
  at fault, not the code; nothing was changed because of it.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger package raises."""


class LedgerUsageError(LedgerError):
    """The calling code misused the ledger API; the ledger's state is unchanged."""


class LedgerDataError(LedgerError):
    """Bytes read from outside the process are malformed or fail authentication.

    Unlike :class:`LedgerUsageError` the caller did nothing wrong: a file, a note
    or a proof is bad.  The ledger refuses it and changes no state.
    """
