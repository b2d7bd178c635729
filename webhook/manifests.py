"""Reading Kubernetes manifests from files, directories and stdin, the way kubectl reads them.

kubectl splits a file into documents at ``---`` lines and reads each with a YAML 1.2-ish parser that
lets anchors be redefined, takes ``=`` for a string and JSON streams of several objects; PyYAML
refuses all three. ruamel.yaml (a maintained YAML 1.2 parser) reads them, with a constructor made
to turn what kubectl would read as text (timestamps, unknown tags) into text. Each document is read
on its own, so one broken document is reported with its path and number and the others are still
checked. What is not a manifest (a Helm template, a JSON patch) is named and skipped, not an error.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError, SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# A line that starts a new document, as kubectl's YAML reader splits them: "---", then nothing but
# blanks or a comment. (Content after the marker, which YAML allows, is kept as the document's start.)
_SEPARATOR = re.compile(r"^---(?:[ \t]+(?P<rest>.*))?$")
# Helm's template actions; Go templates in plain strings ({{inputs.parameters.x}} in Argo) do not match.
_HELM = re.compile(r"\{\{-?\s*(?:\.Values|\.Release|\.Chart|\.Capabilities|\.Files|include\s|template\s|if\s|"
                   r"else|end\b|range\s|with\s|define\s|toYaml|/\*)")
SEPARATOR = _SEPARATOR  # for `pin`, which splits documents the same way
HELM_ACTIONS = _HELM
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


class ManifestError(ValueError):
    """A file that cannot be read at all; the message names the file."""


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


@dataclass(frozen=True)
class Unreadable:
    """A document that could not be read: reported, exit status 2, and the next one is read."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass(frozen=True)
class NotAManifest:
    """A document that was read but is not a Kubernetes object (a template, a patch list): skipped."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}, skipped"


Read = Document | Unreadable | NotAManifest


class _KubectlConstructor(SafeConstructor):
    """Everything kubectl would read as text is text: timestamps, ``=``, unknown tags."""

    def construct_as_text(self, node: Any) -> Any:
        if node.id == "scalar":
            return str(node.value)
        if node.id == "sequence":
            return self.construct_sequence(node)
        return self.construct_mapping(node)


_KubectlConstructor.add_constructor("tag:yaml.org,2002:timestamp", _KubectlConstructor.construct_as_text)
_KubectlConstructor.add_constructor("tag:yaml.org,2002:value", _KubectlConstructor.construct_as_text)
_KubectlConstructor.add_constructor("tag:yaml.org,2002:binary", _KubectlConstructor.construct_as_text)
_KubectlConstructor.add_constructor(None, _KubectlConstructor.construct_as_text)  # any other tag


def _yaml() -> YAML:
    # Aliases are allowed (real manifests use anchors) and built as shared references; only the few
    # paths that hold containers are walked, so an alias "bomb" costs neither memory nor time.
    parser = YAML(typ="safe", pure=True)
    parser.Constructor = _KubectlConstructor
    return parser


def _decode(name: str, data: bytes) -> str:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding)
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{name}: not {encoding.upper()} text after its byte-order mark") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{name}: not UTF-8 text (nor UTF-16 or UTF-32 with a byte-order mark)") from exc


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
    return name, _decode(name, data)


def expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            files.extend(sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in MANIFEST_SUFFIXES))
        else:
            files.append(path)
    return files


def _chunks(text: str) -> Iterator[tuple[int, str]]:
    """The YAML documents of a file, split at ``---`` lines as kubectl does, with their first line number."""
    start, lines = 1, []
    for number, line in enumerate(text.splitlines(), start=1):
        separator = _SEPARATOR.match(line)
        if separator is None:
            lines.append(line)
            continue
        yield start, "\n".join(lines)
        rest = separator.group("rest") or ""
        if not rest or rest.lstrip().startswith("#"):
            start, lines = number + 1, []
        else:
            start, lines = number, [rest]
    yield start, "\n".join(lines)


def _json_stream(name: str, text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    position, index = 0, 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return
        index += 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise _JsonProblem(index, f"not valid JSON: {exc.msg} (line {exc.lineno})") from exc
        except RecursionError as exc:
            raise _JsonProblem(index, "nested too deeply") from exc
        yield index, value


class _JsonProblem(Exception):
    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index, self.problem = index, problem


def _objects(name: str, index: int, body: Any) -> Iterator[Read]:
    where = f"{name} document {index}"
    if body is None:
        return
    if isinstance(body, list):
        yield NotAManifest(where, "not a Kubernetes object (a list, such as a JSON patch)")
        return
    if not isinstance(body, dict):
        yield NotAManifest(where, f"not a Kubernetes object (a {type(body).__name__})")
        return
    kind = body.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in body:
        items = body.get("items")
        if not isinstance(items, list):
            yield Unreadable(where, "a List needs an 'items' list")
            return
        for position, item in enumerate(items):
            if isinstance(item, dict):
                yield Document(name, index, position, item)
            else:
                yield Unreadable(f"{where} item {position}", "expected a Kubernetes object")
        return
    yield Document(name, index, None, body)


def _yaml_problem(exc: YAMLError, first_line: int) -> str:
    if isinstance(exc, DuplicateKeyError):
        mark = exc.problem_mark
        key = exc.problem.split('"')[1] if '"' in (exc.problem or "") else "?"
        return (f'duplicate key "{key}" (line {first_line + mark.line}); kubectl refuses duplicate fields'
                if mark is not None else str(exc))
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark
        line = f" (line {first_line + mark.line})" if mark is not None else ""
        return f"not valid YAML{line}: {exc.problem or exc.context or 'syntax error'}"
    return f"not valid YAML: {exc}"


def read(path: str) -> Iterator[Read]:
    """Every document of one file (or ``-``), each read on its own; raises ManifestError if it cannot be read."""
    name, text = _read(path)
    if text.lstrip().startswith("{"):
        # kubectl reads a file that starts with "{" as a stream of JSON objects.
        try:
            for index, body in _json_stream(name, text):
                yield from _objects(name, index, body)
        except _JsonProblem as problem:
            where = f"{name} document {problem.index}"
            yield (NotAManifest(where, "a Helm template, not a manifest: render it first (helm template …)")
                   if _HELM.search(text) else Unreadable(where, problem.problem))
        return
    parser = _yaml()
    index = 0
    for first_line, chunk in _chunks(text):
        if not chunk.strip() or all(not line.strip() or line.lstrip().startswith("#")
                                    for line in chunk.splitlines()):
            continue
        index += 1
        try:
            bodies = list(parser.load_all(chunk))
        except YAMLError as exc:
            where = f"{name} document {index}"
            yield (NotAManifest(where, "a Helm template, not a manifest: render it first (helm template …)")
                   if _HELM.search(chunk) else Unreadable(where, _yaml_problem(exc, first_line)))
            continue
        except RecursionError:
            yield Unreadable(f"{name} document {index}", "nested too deeply")
            continue
        if _HELM.search(chunk):
            yield NotAManifest(f"{name} document {index}",
                               "a Helm template, not a manifest: render it first (helm template …)")
            continue
        for body in bodies:
            yield from _objects(name, index, body)
