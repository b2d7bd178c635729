"""Store errors, in the words a caller can act on."""

from __future__ import annotations

from webhook.core.errors import GateError


class StoreError(GateError, RuntimeError):
    """The store cannot be opened or used (bad URL, failed migration, I/O error)."""


class StoreUnavailable(StoreError):
    """The store did not answer (in time)."""


class DuplicateRecord(StoreError):
    """A record with the same content address is already stored."""

    def __init__(self, record_id: str) -> None:
        super().__init__(f"record {record_id} is already stored")
        self.record_id = record_id


class AuditTampered(GateError):
    """What the audit log holds contradicts its own hashes: someone changed the database.

    Not a :class:`StoreError`: the store answered, and its answer cannot be trusted (exit 1, HTTP 409).
    """
