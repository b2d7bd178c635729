"""The promotion vocabulary: what the rules answer about a digest, and what the store holds.

The rule engine (:mod:`webhook.core.promotion_rules`) produces these answers, the decision
(:mod:`webhook.core.decision`) consumes them through a :class:`RecordView`, and persistence stores and
returns :class:`StoredRecord` values. Keeping them here lets every one of those depend on this module
instead of on each other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
TagSubject = tuple[str, str]  # (normalised repository, tag): "which digest was built as this tag?"


@dataclass(frozen=True, slots=True)
class TagPromotion:
    """What valid records say about a tag in one environment.

    ``digest`` is set only when a valid record states that a digest was built as the tag AND that
    digest stands promoted in the environment: never a guess. ``built`` lists every digest valid
    records state was built as the tag, newest first, promoted there or not.
    """

    digest: str = ""
    built: tuple[str, ...] = ()
    detail: str = ""  # the store did not answer: why


NO_TAG_PROMOTION = TagPromotion()


@dataclass(frozen=True, kw_only=True)
class StoredRecord:
    """A record as the store holds it: its place in the log, its content address, who submitted it."""

    seq: int
    id: str
    record: Record
    envelope: dsse.Envelope
    submitted_by: str = ""
    stored_at: str = ""


@dataclass(frozen=True)
class Lookup:
    """The answers to one request's promotion questions, in one environment."""

    statuses: Mapping[Subject, PromotionStatus]
    tags: Mapping[TagSubject, TagPromotion] = field(default_factory=dict)


class RecordView(Protocol):
    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        """The promotion state of each pinned subject, and the promoted digest of each tag, in one
        environment: one round trip per request. A tag without an answer is simply left out."""
        ...


class NoRecords:
    """A view for policies without environments: nothing is ever promoted."""

    def lookup(self, subjects: Sequence[Subject], tags: Sequence[TagSubject], environment: str) -> Lookup:
        return Lookup(dict.fromkeys(subjects, NOT_PROMOTED))
