"""Reason codes and finding lines: the words a developer reads when a deploy is refused."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(enum.StrEnum):
    # findings (deny in enforce mode)
    MUTABLE_TAG = "mutable-tag"
    INVALID_REFERENCE = "invalid-reference"
    NOT_PROMOTED = "not-promoted"
    UNTRUSTED_RECORD = "untrusted-record"
    NO_ENVIRONMENT = "no-environment"
    STORE_UNAVAILABLE = "store-unavailable"
    # notes on allowed requests
    BREAK_GLASS = "break-glass"
    EXEMPT = "exempt"
    WARN_ONLY = "warn-only"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem with one container (or, for ``no-environment``, with the whole request)."""

    reason: Reason
    subject: str  # 'Deployment payments/payment-api'
    message: str
    field_path: str = ""
    container: str = ""
    image: str = ""
    short: str = ""  # the fix in a few words, for warnings (kubectl already names the object)

    @property
    def line(self) -> str:
        where = f'{self.subject} {self.field_path} "{self.container}"' if self.field_path else self.subject
        return f"[{self.reason}] {where}: {self.message}"


def warning_line(finding: Finding, limit: int = 120) -> str:
    """A finding as a warning of at most ``limit`` characters that still carries the fix.

    Warnings are printed by kubectl next to the object it applied, so the object's name and the
    field path are left out; the full line stays in the audit log and in ``check``'s output.
    """
    where = f' "{finding.container}"' if finding.field_path else ""
    text = f"[{finding.reason}]{where}: {finding.short or finding.message}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
