"""Reading Kubernetes manifests from files, directories and stdin, for the offline check."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A file or document that cannot be read; the message names the file and document number."""


@dataclass(frozen=True)
class Document:
    source: str
    index: int  # 1-based document number within the source
    item: int | None  # position inside a kind: List
    body: dict[str, Any]

    @property
    def where(self) -> str:
        suffix = f" item {self.item}" if self.item is not None else ""
        return f"{self.source} document {self.index}{suffix}"


# Aliases are allowed (real manifests use anchors); PyYAML builds them as shared references, and we
# only walk the few paths that hold containers, so an alias "bomb" costs neither memory nor time.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        data = sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1)
        name = "<stdin>"
    else:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
        name = path
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{name}: file is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{name}: not UTF-8 text") from exc


def expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in MANIFEST_SUFFIXES)
            files.extend(found)
        else:
            files.append(path)
    return files


def documents(path: str) -> Iterator[Document]:
    name, text = _read(path)
    try:
        if name.endswith(".json") or text.lstrip().startswith(("{", "[")):
            loaded = [json.loads(text)]
        else:
            loaded = list(yaml.load_all(text, Loader=_Loader))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{name} document 1: not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"{name}: not valid YAML{line}: {problem}") from exc
    except RecursionError as exc:
        raise ManifestError(f"{name}: nested too deeply") from exc
    for index, body in enumerate(loaded, start=1):
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ManifestError(f"{name} document {index}: expected a Kubernetes object (a mapping)")
        if body.get("kind") == "List" or (isinstance(body.get("kind"), str) and body["kind"].endswith("List")
                                          and isinstance(body.get("items"), list)):
            items = body.get("items")
            if not isinstance(items, list):
                raise ManifestError(f"{name} document {index}: a List needs an 'items' list")
            for position, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ManifestError(f"{name} document {index} item {position}: expected a Kubernetes object")
                yield Document(name, index, position, item)
        else:
            yield Document(name, index, None, body)
