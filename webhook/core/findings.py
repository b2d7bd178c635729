"""Reason codes and every line a developer reads when a deploy is refused or warned about.

All the words of a denial live here, next to the format they share (``[reason] subject: text``), so
that a change of wording is one change and the tests that assert the words have one place to follow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from webhook.core.references import ImageReference
from webhook.core.workloads import BREAK_GLASS_ANNOTATION, ContainerImage


class Reason(enum.StrEnum):
    # findings (deny in enforce mode)
    MUTABLE_TAG = "mutable-tag"
    INVALID_REFERENCE = "invalid-reference"
    NOT_PROMOTED = "not-promoted"
    UNTRUSTED_RECORD = "untrusted-record"
    NO_ENVIRONMENT = "no-environment"
    STORE_UNAVAILABLE = "store-unavailable"
    INTERNAL_ERROR = "internal-error"  # a fault of the gate itself, never a store outage
    # notes on allowed requests
    BREAK_GLASS = "break-glass"
    EXEMPT = "exempt"
    WARN_ONLY = "warn-only"


def line(reason: Reason, subject: str, text: str) -> str:
    """The one shape of every finding line: ``[reason] subject: text``."""
    return f"[{reason}] {subject}: {text}"


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
        return line(self.reason, where, self.message)


def warning_line(finding: Finding, limit: int = 120) -> str:
    """A finding as a warning of at most ``limit`` characters that still carries the fix.

    Warnings are printed by kubectl next to the object it applied, so the object's name and the
    field path are left out; the full line stays in the audit log and in ``check``'s output.
    """
    where = f' "{finding.container}"' if finding.field_path else ""
    text = f"[{finding.reason}]{where}: {finding.short or finding.message}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- findings about the namespace --------------------------------------------------------------------


def undefined_environment(subject: str, namespace: str, environment: str, defined: tuple[str, ...]) -> Finding:
    return Finding(
        Reason.NO_ENVIRONMENT, subject,
        f'namespace "{namespace}" is labelled environment "{environment}", which the policy does not define '
        f"(defined: {', '.join(defined)})",
        short=f'environment "{environment}" is not defined by the policy',
    )


def unlabelled_namespace(subject: str, namespace: str, defined: tuple[str, ...]) -> Finding:
    return Finding(
        Reason.NO_ENVIRONMENT, subject,
        f"namespace \"{namespace}\" has no environment; label it: kubectl label namespace {namespace} "
        f"promotion-gate.io/environment=<{'|'.join(defined) or 'env'}>",
        short=f'namespace "{namespace}" has no promotion-gate.io/environment label',
    )


# --- findings about one container's image ------------------------------------------------------------


def _where(container: ContainerImage) -> dict[str, str]:
    return {"field_path": container.field_path, "container": container.container, "image": container.image}


def invalid_reference(subject: str, container: ContainerImage, problem: str) -> Finding:
    return Finding(Reason.INVALID_REFERENCE, subject,
                   f'image "{container.image}" is not a valid reference: {problem}',
                   short=f'"{container.image}" {problem}', **_where(container))


def mutable_tag(subject: str, container: ContainerImage, ref: ImageReference,
                promoted: tuple[str, str] | None = None) -> Finding:
    """A tag instead of a digest; with ``promoted`` (environment, digest), the digest to deploy instead.

    ``promoted`` comes only from a valid record that states the digest was built as this tag and that
    stands promoted in the namespace's environment. The warning form puts that digest last, so a cut
    at 120 characters shortens the digest, never the words before it.
    """
    implicit = ' (no tag: implicitly "latest")' if ref.implicit_latest else ""
    if promoted is not None:
        environment, digest = promoted
        fix = f"{ref.written_name}@{digest}"
        tag = ref.tag or "latest"
        return Finding(Reason.MUTABLE_TAG, subject,
                       f'image "{container.image}" is a mutable tag{implicit}; the digest promoted to {environment} '
                       f"for :{tag} is {fix}",
                       short=f"mutable tag; promoted to {environment} for :{tag}: {fix}", **_where(container))
    return Finding(Reason.MUTABLE_TAG, subject,
                   f'image "{container.image}" is a mutable tag{implicit}; deploy by digest: '
                   f"{ref.written_name}@sha256:<digest>",
                   short=f'"{container.image}" is a mutable tag; use {ref.written_name}@sha256:<digest>',
                   **_where(container))


def tag_ignored(container: ContainerImage, tag: str) -> str:
    return f'{container.field_path} "{container.container}": tag "{tag}" is ignored, the digest is pulled'


def store_unavailable(subject: str, container: ContainerImage, ref: ImageReference, detail: str) -> Finding:
    return Finding(Reason.STORE_UNAVAILABLE, subject,
                   f"{ref.pinned_form}: the attestation store did not answer ({detail}); retry, or ask the "
                   "cluster operator", short=f"store did not answer ({detail})", **_where(container))


def untrusted_record(subject: str, container: ContainerImage, ref: ImageReference, environment: str,
                     detail: str) -> Finding:
    digest = ref.digest or ""
    return Finding(Reason.UNTRUSTED_RECORD, subject,
                   f'{ref.pinned_form} has a promotion record for environment "{environment}" that cannot be '
                   f"trusted: {detail}", short=f"{digest[:19]}… record for {environment} not trusted",
                   **_where(container))


def not_promoted(subject: str, container: ContainerImage, ref: ImageReference, environment: str,
                 promoted_to: tuple[str, ...], revoked_from: str) -> Finding:
    digest = ref.digest or ""
    promoted = ", ".join(promoted_to) or "none"
    if revoked_from:
        promoted += f"; revoked from {revoked_from}"
    return Finding(Reason.NOT_PROMOTED, subject,
                   f'{ref.pinned_form} has no promotion record for environment "{environment}" (promoted to: '
                   f"{promoted}). Promote it: promotion-gate promote {ref.pinned_form} --to {environment}",
                   short=f"{digest[:19]}… not promoted to {environment}; promotion-gate promote … --to "
                         f"{environment}", **_where(container))


def internal_error(subject: str) -> Finding:
    return Finding(Reason.INTERNAL_ERROR, subject,
                   "internal error while judging the request; it was denied to fail closed. Retry, or ask the "
                   "cluster operator to check the webhook logs")


# --- break-glass -------------------------------------------------------------------------------------


def break_glass_not_allowed(username: str) -> str:
    return f'user "{username}" is not allowed to break glass'


BREAK_GLASS_NEEDS_REASON = "the annotation needs a non-empty reason or ticket"


def break_glass_setting_refused(subject: str, why: str) -> str:
    return line(Reason.BREAK_GLASS, subject, f"only people allowed to break glass may set the "
                                             f"{BREAK_GLASS_ANNOTATION} annotation; {why}")


def break_glass_admitted(subject: str, findings: int, username: str, reason: str) -> str:
    return f'[{Reason.BREAK_GLASS}] {subject} admitted despite {findings} finding(s) by "{username}": {reason}'


def break_glass_ignored(why: str) -> str:
    return f"[{Reason.BREAK_GLASS}] annotation {BREAK_GLASS_ANNOTATION} ignored: {why}"


# --- the audit log -----------------------------------------------------------------------------------


def audit_unwritable(reason: Reason, subject: str, detail: str) -> str:
    return line(reason, subject, f"the decision could not be written to the audit log ({detail}); denied "
                                 "because the policy requires an audit trail. Retry shortly")
