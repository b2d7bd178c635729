"""The promotion vocabulary: what the rules answer about a digest, and what the store holds.

The rule engine (:mod:`webhook.core.promotion_rules`) produces these answers, the decision
(:mod:`webhook.core.decision`) consumes them through a :class:`RecordView`, and persistence stores and
returns :class:`StoredRecord` values. Keeping them here lets every one of those depend on this module
instead of on each other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from webhook.core import dsse
from webhook.core.records import Record


class Promotion(enum.Enum):
    PROMOTED = "promoted"
    NOT_PROMOTED = "not-promoted"
    UNTRUSTED = "untrusted"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class PromotionStatus:
    state: Promotion
    record_ids: tuple[str, ...] = ()
    promoted_to: tuple[str, ...] = ()
    detail: str = ""
    revoked_from: str = ""  # not promoted because of a revocation in this environment (itself or upstream)


NOT_PROMOTED = PromotionStatus(Promotion.NOT_PROMOTED)

Subject = tuple[str, str]  # (normalised repository, digest)


@dataclass(frozen=True, kw_only=True)
class StoredRecord:
    """A record as the store holds it: its place in the log, its content address, who submitted it."""

    seq: int
    id: str
    record: Record
    envelope: dsse.Envelope
    submitted_by: str = ""
    stored_at: str = ""


class RecordView(Protocol):
    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        """The promotion state of each subject in one environment: one round trip per request."""
        ...


class NoRecords:
    """A view for policies without environments: nothing is ever promoted."""

    def statuses(self, subjects: Sequence[Subject], environment: str) -> Mapping[Subject, PromotionStatus]:
        return dict.fromkeys(subjects, NOT_PROMOTED)
