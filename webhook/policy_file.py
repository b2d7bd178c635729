"""The policy file: YAML, validated once at start-up, built into the frozen :class:`Policy`.

The file is checked against ``schemas/policy.schema.json``; any unknown key or bad value stops
start-up with a :class:`PolicyError` that names the key (``environments[1].mode``). Key files the
policy names are read here too, so that nothing below this module touches the filesystem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from webhook import key_files
from webhook.core import keys, references
from webhook.core.policy import (
    DEFAULT_CONTROLLERS,
    SYSTEM_NAMESPACES,
    ApiToken,
    Environment,
    Evidence,
    ImageExemption,
    Mode,
    OnWriteFailure,
    Policy,
    PolicyError,
    Unmapped,
    default_policy,
)
from webhook.core.workloads import BUILT_IN_KINDS, WorkloadKind

__all__ = ["Policy", "PolicyError", "default_policy", "load", "parse"]

MAX_POLICY_BYTES = 1024 * 1024


def _schema() -> dict[str, Any]:
    text = resources.files("webhook").joinpath("schemas/policy.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _key_path(path: Any) -> str:
    parts: list[str] = []
    for item in path:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        instance = error.instance if isinstance(error.instance, Mapping) else {}
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        names = ", ".join(f"{where}.{k}" if where != "(top level)" else k for k in extra)
        return f"unknown key {names}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "pattern" and isinstance(error.schema, Mapping) and error.schema.get("description"):
        # The pattern itself is for machines; the description says what the value must be.
        return f"{where}: {error.instance!r} is not {error.schema['description']}"
    if error.validator == "oneOf" and isinstance(error.instance, Mapping):
        return f"{where}: give exactly one of publicKeyFile or publicKey"
    return f"{where}: {error.message}"


def parse(document: Any, *, base_dir: Path, source: str = "policy") -> Policy:
    """Validate a decoded policy document and build the :class:`Policy`."""
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: (len(e.absolute_path), list(map(str, e.path))))
    if errors:
        raise PolicyError(f"{source}: {_describe(errors[0])}")
    assert isinstance(document, dict)

    key_table: dict[str, keys.VerifyingKey] = {}
    for name, spec in (document.get("keys") or {}).items():
        try:
            if "publicKeyFile" in spec:
                key_file = Path(spec["publicKeyFile"])
                key_table[name] = key_files.load_verifying_key(
                    key_file if key_file.is_absolute() else base_dir / key_file)
            else:
                key_table[name] = keys.parse_public_key(spec["publicKey"].encode(), f"keys.{name}.publicKey")
        except keys.InvalidKey as exc:
            raise PolicyError(f"{source}: keys.{name}: {exc}") from exc

    environments: list[Environment] = []
    default_mode = Mode(document.get("defaultMode", "enforce"))
    for index, env in enumerate(document.get("environments") or []):
        where = f"environments[{index}]"
        trusted = []
        for key_name in env.get("trustedKeys", []):
            if key_name not in key_table:
                raise PolicyError(f"{source}: {where}.trustedKeys: no key named {key_name!r} under keys")
            trusted.append(key_table[key_name])
        required = env.get("requiredSignatures", 1)
        if trusted and required > len(trusted):
            raise PolicyError(
                f"{source}: {where}.requiredSignatures: {required} signatures required but only "
                f"{len(trusted)} trusted keys listed"
            )
        evidence = env.get("evidence") or {}
        environments.append(
            Environment(
                name=env["name"],
                mode=Mode(env.get("mode", default_mode)),
                trusted_keys=tuple(trusted),
                required_signatures=required,
                require_previous=env.get("requirePrevious", True),
                evidence=Evidence(
                    max_tests_failed=evidence.get("maxTestsFailed"),
                    min_tests_passed=evidence.get("minTestsPassed"),
                    max_scan_findings=dict(evidence.get("maxScanFindings") or {}),
                    require_source=evidence.get("requireSource", False),
                    require_image_labels=evidence.get("requireImageLabels", False),
                ),
            )
        )
    names = [e.name for e in environments]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise PolicyError(f"{source}: environments[{index}].name: duplicate environment {name!r}")

    namespaces = document.get("namespaces") or {}
    mapping = dict(namespaces.get("environments") or {})
    for ns, env_name in mapping.items():
        if env_name not in names:
            raise PolicyError(f"{source}: namespaces.environments.{ns}: no environment named {env_name!r}")
    exempt = set(namespaces.get("exempt") or [])
    if namespaces.get("exemptSystemNamespaces", True):
        exempt.update(SYSTEM_NAMESPACES)
    if namespaces.get("releaseNamespace"):
        exempt.add(namespaces["releaseNamespace"])

    exemptions = []
    for index, item in enumerate(document.get("exemptImages") or []):
        try:
            ref = references.parse(item["repository"])
        except references.InvalidReference as exc:
            raise PolicyError(f"{source}: exemptImages[{index}].repository: {exc}") from exc
        if ref.tag or ref.digest:
            raise PolicyError(
                f"{source}: exemptImages[{index}].repository: give the repository without tag or digest "
                "(put a digest under 'digest')"
            )
        exemptions.append(ImageExemption(ref.repository, item.get("digest"), item.get("reason", "")))

    kinds = _workload_kinds(document.get("workloadKinds") or [], source)
    break_glass = document.get("breakGlass") or {}
    store = document.get("store") or {}
    audit = document.get("audit") or {}
    checkpoint_keys = []
    for key_name in audit.get("checkpointKeys", []):
        if key_name not in key_table:
            raise PolicyError(f"{source}: audit.checkpointKeys: no key named {key_name!r} under keys")
        checkpoint_keys.append(key_table[key_name])
    api = document.get("api") or {}
    tokens = list(api.get("tokens") or [])
    if api.get("tokensFile"):
        tokens_path = Path(api["tokensFile"])
        tokens.extend(_load_tokens_file(tokens_path if tokens_path.is_absolute() else base_dir / tokens_path, source))
    for index, token in enumerate(tokens):
        for env_name in token.get("environments", []):
            if env_name not in names:
                raise PolicyError(f"{source}: api.tokens[{index}] ({token['identity']}).environments: no environment "
                                  f"named {env_name!r}")
    api_tokens = tuple(
        ApiToken(t["identity"], t["sha256"], frozenset(t.get("environments", [])), t.get("admin", False))
        for t in tokens
    )
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return Policy(
        default_mode=default_mode,
        environments=tuple(environments),
        namespace_environments=mapping,
        unmapped=Unmapped(namespaces.get("unmapped", "deny")),
        exempt_namespaces=frozenset(exempt),
        watch_namespaces=namespaces.get("watch", False),
        exempt_images=tuple(exemptions),
        break_glass_users=frozenset(break_glass.get("users", [])),
        break_glass_groups=frozenset(break_glass.get("groups", [])),
        break_glass_controllers=frozenset(break_glass.get("controllers", DEFAULT_CONTROLLERS)),
        store_timeout_seconds=float(store.get("timeoutSeconds", 2.0)),
        cache_seconds=float(store.get("cacheSeconds", 30.0)),
        audit_on_write_failure=OnWriteFailure(audit.get("onWriteFailure", "deny")),
        audit_checkpoint_every=audit.get("checkpointEvery", 100),
        audit_checkpoint_seconds=audit.get("checkpointSeconds", 60),
        audit_checkpoint_keys=tuple(checkpoint_keys),
        audit_to_store=audit.get("store", True),
        api_open_reads=api.get("openReads", False),
        api_tokens=api_tokens,
        workload_kinds=(*BUILT_IN_KINDS, *kinds),
        named_keys=key_table,
        digest=hashlib.sha256(canonical).hexdigest(),
    )


def _workload_kinds(entries: list[dict[str, str]], source: str) -> tuple[WorkloadKind, ...]:
    kinds: list[WorkloadKind] = []
    for index, entry in enumerate(entries):
        kind = WorkloadKind(entry["apiGroup"], entry["kind"], entry["resource"], tuple(entry["podSpecPath"].split(".")))
        where = f"{source}: workloadKinds[{index}]"
        if any(k.group == kind.group and k.kind == kind.kind for k in BUILT_IN_KINDS):
            raise PolicyError(f"{where}: {kind.group_kind} is a built-in workload kind")
        if any(k.group == kind.group and k.kind == kind.kind for k in kinds):
            raise PolicyError(f"{where}: {kind.group_kind} is listed twice")
        if any(k.group == kind.group and k.resource == kind.resource for k in (*BUILT_IN_KINDS, *kinds)):
            raise PolicyError(f"{where}: resource {kind.resource!r} of group {kind.group!r} is already listed")
        kinds.append(kind)
    return tuple(kinds)


def _load_tokens_file(path: Path, source: str) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(_read_limited(path))
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{source}: api.tokensFile: cannot read {path}: {exc}") from exc
    schema = {"$defs": _schema()["$defs"], "$ref": "#/$defs/tokens"}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if errors:
        raise PolicyError(f"{source}: api.tokensFile {path}: {_describe(errors[0])}")
    assert isinstance(data, list)
    return data


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_POLICY_BYTES + 1)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: file is larger than {MAX_POLICY_BYTES} bytes")
    return data


def load(path: Path) -> Policy:
    """Read, validate and build the policy at ``path``."""
    try:
        raw = _read_limited(path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise PolicyError(f"{path}: the policy must be a YAML mapping with apiVersion and kind")
    return parse(document, base_dir=path.parent, source=str(path))


