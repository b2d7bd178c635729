"""Typed reads of decoded JSON/YAML values, one family for every parser of the core.

Each parser (AdmissionReview, workloads, in-toto statements, Promotion specs) reads untrusted,
already-decoded data; a wrong shape must become its own :class:`~webhook.core.errors.InvalidInput`
subclass with a message that names the field, never a ``KeyError`` from deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.core.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class FieldReader:
    """Reads fields and raises ``error`` naming ``where`` (e.g. ``request.userInfo.groups``)."""

    error: type[InvalidInput]

    def text(self, value: Any, where: str, *, required: bool = False, max_length: int | None = None) -> str:
        if value is None:
            if required:
                raise self.error(f"{where} is required")
            return ""
        if not isinstance(value, str):
            raise self.error(f"{where} must be a string")
        if max_length is not None and len(value) > max_length:
            raise self.error(f"{where} is longer than {max_length} characters")
        return value

    def mapping(self, value: Any, where: str, *, required: bool = False) -> Mapping[str, Any]:
        """An object; an absent one reads as empty unless ``required``."""
        if value is None and not required:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(f"{where} must be an object")
        return value

    def nullable_mapping(self, value: Any, where: str) -> Mapping[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(f"{where} must be an object or null")
        return value

    def count(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"{where} must be a non-negative integer")
        return value

    def strings(self, value: Any, where: str) -> tuple[str, ...]:
        """A list of strings; absent reads as empty."""
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(f"{where} must be a list of strings")
        return tuple(value)

    def string_map(self, value: Any, where: str) -> dict[str, str]:
        result: dict[str, str] = {}
        for key, item in self.mapping(value, where).items():
            if not isinstance(item, str):
                raise self.error(f"{where}.{key} must be a string")
            result[str(key)] = item
        return result
