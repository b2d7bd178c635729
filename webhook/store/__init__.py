"""The attestation store: append-only promotion records and the hash-chained decision log.

One SQLAlchemy Core implementation serves both backends: SQLite (the embedded default, one file)
and PostgreSQL (several webhook replicas). ``open_store`` picks the engine from the URL.
"""

from __future__ import annotations

from webhook.store.errors import DuplicateRecord, StoreError, StoreUnavailable
from webhook.store.sql import SqlStore, open_store, redact

__all__ = ["DuplicateRecord", "SqlStore", "StoreError", "StoreUnavailable", "open_store", "redact"]
