"""The policy: frozen dataclasses, read once at start-up (:mod:`webhook.policy_file`) and passed in.

Nothing here reads a file; the rules only ask the policy questions (which environment comes before
which, which keys it trusts, which mode applies).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from webhook.core import keys
from webhook.core.errors import InvalidInput
from webhook.core.workloads import BUILT_IN_KINDS, WorkloadKind

SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
# The identities kube-controller-manager creates ReplicaSets, Pods and Jobs with: its own user, or one
# service account per controller (--use-service-account-credentials, the kubeadm default).
DEFAULT_CONTROLLERS = ("system:kube-controller-manager", *(
    f"system:serviceaccount:kube-system:{name}" for name in (
        "deployment-controller", "replicaset-controller", "statefulset-controller", "daemon-set-controller",
        "job-controller", "cronjob-controller", "replication-controller")))


class PolicyError(InvalidInput):
    """The policy file is unreadable or invalid; the message names the offending key."""


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    WARN = "warn"
    AUDIT = "audit"


class Unmapped(enum.StrEnum):
    """What a namespace without an environment gets (``namespaces.unmapped``)."""

    DENY = "deny"  # [no-environment]
    DIGEST_ONLY = "digest-only"  # only the digest rule


class OnWriteFailure(enum.StrEnum):
    """What happens to a judged request whose audit event cannot be stored (``audit.onWriteFailure``)."""

    DENY = "deny"
    ALLOW = "allow"


@dataclass(frozen=True)
class Evidence:
    max_tests_failed: int | None = None
    min_tests_passed: int | None = None
    max_scan_findings: Mapping[str, int] = field(default_factory=dict)
    require_source: bool = False
    require_image_labels: bool = False  # gitCommit and ciRunId confirmed by the image's own labels


@dataclass(frozen=True, kw_only=True)
class Environment:
    name: str
    mode: Mode
    trusted_keys: tuple[keys.VerifyingKey, ...] = ()
    required_signatures: int = 1
    require_previous: bool = True
    evidence: Evidence = field(default_factory=Evidence)

    @property
    def trusted_key_ids(self) -> frozenset[str]:
        return frozenset(k.key_id for k in self.trusted_keys)


@dataclass(frozen=True)
class ImageExemption:
    repository: str  # normalised
    digest: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class ApiToken:
    identity: str
    sha256: str
    environments: frozenset[str]
    admin: bool = False


@dataclass(frozen=True, kw_only=True)
class Policy:
    default_mode: Mode = Mode.ENFORCE
    environments: tuple[Environment, ...] = ()
    namespace_environments: Mapping[str, str] = field(default_factory=dict)
    unmapped: Unmapped = Unmapped.DENY
    exempt_namespaces: frozenset[str] = frozenset(SYSTEM_NAMESPACES)
    watch_namespaces: bool = False
    exempt_images: tuple[ImageExemption, ...] = ()
    break_glass_users: frozenset[str] = frozenset()
    break_glass_groups: frozenset[str] = frozenset()
    break_glass_controllers: frozenset[str] = frozenset()
    store_timeout_seconds: float = 2.0
    cache_seconds: float = 30.0
    audit_on_write_failure: OnWriteFailure = OnWriteFailure.DENY
    audit_checkpoint_every: int = 100
    audit_checkpoint_seconds: int = 60
    audit_checkpoint_keys: tuple[keys.VerifyingKey, ...] = ()  # the public halves of the server keys
    audit_to_store: bool = True
    api_open_reads: bool = False
    api_tokens: tuple[ApiToken, ...] = ()
    workload_kinds: tuple[WorkloadKind, ...] = BUILT_IN_KINDS  # the built-in kinds, then the policy's
    named_keys: Mapping[str, keys.VerifyingKey] = field(default_factory=dict)  # the policy's `keys:`, by name
    digest: str = ""  # sha256 of the policy document, reported in audit events

    def workload_kind(self, group: str, kind: str) -> WorkloadKind | None:
        """The workload kind of an object, matched by API group AND kind; None: it carries no images."""
        return next((k for k in self.workload_kinds if k.kind == kind and k.group == group), None)

    def environment(self, name: str) -> Environment | None:
        return next((e for e in self.environments if e.name == name), None)

    def mode_for(self, environment: str | None) -> Mode:
        env = self.environment(environment) if environment else None
        return env.mode if env else self.default_mode

    def previous_environment(self, name: str) -> Environment | None:
        names = [e.name for e in self.environments]
        index = names.index(name) if name in names else -1
        return self.environments[index - 1] if index > 0 else None

    def key_name(self, key_id: str) -> str:
        """The policy's name for a key (``release``), or "" when it names none with that id."""
        return next((name for name, key in self.named_keys.items() if key.key_id == key_id), "")

    @property
    def environment_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.environments)




def default_policy() -> Policy:
    """Digest-only enforcement everywhere; used when no policy file is given."""
    return Policy(unmapped=Unmapped.DIGEST_ONLY)
