"""The error families every layer shares; each shell maps each family once.

- :class:`InvalidInput` — something a caller sent cannot be read (a body, a manifest, an envelope, a
  policy file, a key). The message names the field and what is wrong; shells answer 400 / exit 2.
- :class:`Refused` — well-formed input that the rules refuse (a promotion rule, a permission). Shells
  answer 403/409/422 / exit 1.

Persistence has its own family (``webhook.store.errors.StoreError``): the store did not answer, which
is neither the caller's fault nor a refusal.
"""

from __future__ import annotations


class GateError(Exception):
    """Base of every error Promotion Gate raises on purpose."""


class InvalidInput(GateError, ValueError):
    """Input that cannot be parsed or validated; the message names the offending field."""


class Refused(GateError):
    """Valid input that the rules refuse; the message says which rule and what is missing."""
