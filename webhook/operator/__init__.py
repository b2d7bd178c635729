"""The operator shell (kopf): Promotion objects into the ledger, and the webhook's TLS certificate kept valid."""
