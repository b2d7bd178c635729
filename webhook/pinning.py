"""Pinning tags in files kept in git to the digests promoted to an environment (``promotion-gate pin``).

GitOps repositories hold the desired state: a mutating webhook that rewrote tags at admission would
make the cluster disagree with git, and the GitOps tool would fight it. ``pin`` rewrites the files
themselves, so the change is reviewed and committed like any other.

**Only the image values change.** ruamel.yaml's round-trip mode keeps comments, but dumping a document
re-indents sequences, re-wraps long lines and re-quotes strings. So its round-trip parser is used to
find where each image value was written (line and column), and only those characters are replaced in
the original text; every other byte of the file is kept. The result is read again, and written only
when it reads as the original with just the planned image values changed.

What is an image:

* in Kubernetes manifests (multi-document YAML, ``kind: List``, a JSON object): the ``image`` of every
  container, init container and ephemeral container of a workload kind (the built-in kinds and the
  policy's ``workloadKinds``); ``repo:tag`` becomes ``repo@sha256:…``;
* in Helm values files (``--values``): any mapping with string ``repository`` and ``tag`` (the layout
  ``helm create`` generates, with an optional ``registry`` in front), whose ``tag`` becomes
  ``TAG@sha256:…`` so that ``{{ .repository }}:{{ .tag }}`` renders ``repo:TAG@sha256:…``, a pinned
  reference; and any string value of a key named ``image``, rewritten like a manifest's.

The digest comes only from the records: the one a valid record says was built as the tag and that
stands promoted to the environment (:func:`webhook.core.promotion_rules.promoted_for_tag`). The
registry is never asked, so a tag that moved since it was recorded is pinned to the promoted build.
"""

from __future__ import annotations

import codecs
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from webhook import manifests
from webhook.core import references, workloads
from webhook.core.policy import Policy
from webhook.core.promotion import TagPromotion, TagSubject

MAX_DEPTH = 64  # values files are walked to this depth
MAX_NODES = 200_000  # and to this many nodes: an alias "bomb" costs neither memory nor time
Path_ = tuple[str | int, ...]


class PinError(ValueError):
    """A file that cannot be pinned at all; the message names the file."""


@dataclass(frozen=True)
class Occurrence:
    """One image written in a file: where it is, what it means, and which characters hold it."""

    where: str  # 'k8s/deploy.yaml document 1 spec.template.spec.containers[0] "api"'
    image: str  # the reference it stands for (for a values tag: registry/repository:tag)
    document: int  # 0-based document of the file
    path: Path_  # keys from the document's root to the scalar that is replaced
    start: int  # characters [start, end) of the file's text hold the scalar's value
    end: int
    tag_field: bool = False  # a values file's ``tag``: it becomes TAG@DIGEST, not REPO@DIGEST
    problem: str = ""  # why this one cannot be rewritten, when it cannot

    def replacement(self, ref: references.ImageReference, digest: str) -> str:
        return f"{ref.tag or 'latest'}@{digest}" if self.tag_field else f"{ref.written_name}@{digest}"


@dataclass
class SourceFile:
    path: str
    text: str
    bom: bool = False
    occurrences: list[Occurrence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # documents skipped (templates, non-workloads are silent)
    errors: list[str] = field(default_factory=list)  # the file is not rewritten


@dataclass(frozen=True)
class Pinned:
    where: str
    image: str
    pinned: str  # the text written in its place


@dataclass(frozen=True)
class NotPinned:
    where: str
    image: str
    why: str


@dataclass
class PinReport:
    pinned: list[Pinned] = field(default_factory=list)
    not_pinned: list[NotPinned] = field(default_factory=list)
    already: int = 0  # images already pinned by digest
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # files rewritten (or, in a dry run, that would be)

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 2
        return 1 if self.not_pinned else 0


# --- reading --------------------------------------------------------------------------------------


def _round_trip() -> YAML:
    parser = YAML(typ="rt", pure=True)
    parser.allow_duplicate_keys = False
    return parser


def read_source(path: str) -> SourceFile:
    try:
        with open(path, "rb") as handle:
            data = handle.read(manifests.MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise PinError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > manifests.MAX_MANIFEST_BYTES:
        raise PinError(f"{path}: file is larger than {manifests.MAX_MANIFEST_BYTES} bytes")
    bom = data.startswith(codecs.BOM_UTF8)
    try:
        text = data[len(codecs.BOM_UTF8) if bom else 0:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PinError(f"{path}: not UTF-8 text; pin rewrites UTF-8 files only") from exc
    return SourceFile(path, text, bom)


def _documents(text: str) -> Iterator[tuple[int, str]]:
    """(offset of its first character, text) of each document, split at ``---`` lines as kubectl splits."""
    offset, start, lines = 0, 0, list[str]()
    for line in text.split("\n"):
        if manifests.SEPARATOR.match(line.rstrip("\r")) is not None:
            yield start, "\n".join(lines)
            start, lines = offset + len(line) + 1, []
        else:
            lines.append(line)
        offset += len(line) + 1
    yield start, "\n".join(lines)


def _line_starts(chunk: str) -> list[int]:
    starts = [0]
    for index, char in enumerate(chunk):
        if char == "\n":
            starts.append(index + 1)
    return starts


def _scalar_span(text: str, offset: int, value: str) -> tuple[int, int, str]:
    """Where a one-line scalar's characters are: (start, end, problem). Quotes are kept, not replaced."""
    rest = text[offset:]
    anchor = re.match(r"&[^\s]+[ \t]+", rest)
    if anchor:
        offset += anchor.end()
        rest = rest[anchor.end():]
    if rest[:1] in ("*", "|", ">", "!", "&"):
        return offset, offset, "written as an alias, a tag or a block scalar; pin rewrites one-line values only"
    quote = rest[:1] if rest[:1] in ("'", '"') else ""
    body = offset + len(quote)
    if text[body:body + len(value)] != value or (quote and text[body + len(value):body + len(value) + 1] != quote):
        return offset, offset, "written with escapes or on several lines; pin rewrites one-line values only"
    return body, body + len(value), ""


def _describe(path: Path_) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _occurrence(source: SourceFile, document: int, base: int, starts: list[int], parent: Any, key: str | int,
                path: Path_, where: str, image: str, *, tag_field: bool = False) -> Occurrence:
    line, column = parent.lc.value(key) if isinstance(parent, CommentedMap) else parent.lc.item(key)
    value = parent[key]
    start, end, problem = _scalar_span(source.text, base + starts[line] + column, value)
    return Occurrence(where, image, document, (*path, key), start, end, tag_field, problem)


def _walk(root: Any, path: tuple[str, ...]) -> Any:
    node = root
    for key in path:
        if not isinstance(node, CommentedMap):
            return None
        node = node.get(key)
    return node


def _manifest_images(source: SourceFile, document: int, base: int, starts: list[int], body: CommentedMap,
                     item_path: Path_, where: str, policy: Policy) -> None:
    group = workloads.group_of(body.get("apiVersion"))
    kind = policy.workload_kind(group, str(body.get("kind", ""))) if group is not None else None
    if kind is None:
        return
    spec = _walk(body, kind.pod_spec)
    if not isinstance(spec, CommentedMap):
        return
    for field_name in workloads.CONTAINER_FIELDS:
        containers = spec.get(field_name)
        if not isinstance(containers, CommentedSeq):
            continue
        for index, container in enumerate(containers):
            if not isinstance(container, CommentedMap) or not isinstance(container.get("image"), str):
                continue
            path = (*item_path, *kind.pod_spec, field_name, index)
            here = f'{where} {".".join(kind.pod_spec)}.{field_name}[{index}] "{container.get("name", "")}"'
            source.occurrences.append(_occurrence(source, document, base, starts, container, "image", path, here,
                                                  container["image"]))


def _values_images(source: SourceFile, document: int, base: int, starts: list[int], node: Any, path: Path_,
                   where: str, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0 or len(path) > MAX_DEPTH:
        raise PinError(f"{where}: nested too deeply or too large to walk")
    if isinstance(node, CommentedSeq):
        for index, item in enumerate(node):
            _values_images(source, document, base, starts, item, (*path, index), where, budget)
        return
    if not isinstance(node, CommentedMap):
        return
    if isinstance(node.get("repository"), str) and "tag" in node:
        _values_tag(source, document, base, starts, node, path, where)
    for key, value in node.items():
        if key == "image" and isinstance(value, str):
            source.occurrences.append(_occurrence(source, document, base, starts, node, key, path,
                                                  f"{where} {_describe((*path, key))}", value))
        elif isinstance(value, (CommentedMap, CommentedSeq)):
            _values_images(source, document, base, starts, value, (*path, key), where, budget)


def _values_tag(source: SourceFile, document: int, base: int, starts: list[int], node: CommentedMap, path: Path_,
                where: str) -> None:
    here = f"{where} {_describe((*path, 'tag'))}"
    registry = node.get("registry")
    repository = f"{registry}/{node['repository']}" if isinstance(registry, str) and registry else node["repository"]
    tag = node.get("tag")
    if isinstance(node.get("digest"), str) and node["digest"]:
        source.occurrences.append(Occurrence(here, f"{repository}@{node['digest']}", document, (*path, "tag"), 0, 0))
        return
    if not isinstance(tag, str):
        problem = (f"the tag is not a string in YAML ({tag}); quote it so the chart renders it as written"
                   if tag is not None else "the tag is empty (the chart's default, such as its appVersion, is used)")
        source.occurrences.append(Occurrence(here, f"{repository}:{tag}", document, (*path, "tag"), 0, 0,
                                             True, problem))
        return
    if not tag:
        source.occurrences.append(Occurrence(here, repository, document, (*path, "tag"), 0, 0, True,
                                             "the tag is empty (the chart's default, such as its appVersion, is "
                                             "used)"))
        return
    source.occurrences.append(_occurrence(source, document, base, starts, node, "tag", path, here,
                                          f"{repository}:{tag}", tag_field=True))


def scan(path: str, policy: Policy, *, values: bool) -> SourceFile:
    """The images written in one file (a manifest file, or with ``values`` a Helm values file)."""
    source = read_source(path)
    for document, (base, chunk) in enumerate(_documents(source.text)):
        where = f"{path} document {document + 1}"
        if not chunk.strip() or all(not line.strip() or line.lstrip().startswith("#") for line in chunk.split("\n")):
            continue
        if manifests.HELM_ACTIONS.search(chunk):
            source.notes.append(f"{where}: a Helm template, not a manifest: pin its values file (--values), skipped")
            continue
        try:
            body = _round_trip().load(chunk)
        except (YAMLError, RecursionError) as exc:
            source.errors.append(f"{where}: not valid YAML: {str(exc).splitlines()[0][:200]}")
            continue
        starts = _line_starts(chunk)
        if values:
            _values_images(source, document, base, starts, body, (), where, [MAX_NODES])
            continue
        if not isinstance(body, CommentedMap):
            continue
        items = body.get("items")
        if str(body.get("kind", "")).endswith("List") and isinstance(items, CommentedSeq):
            for position, item in enumerate(items):
                if isinstance(item, CommentedMap):
                    _manifest_images(source, document, base, starts, item, ("items", position),
                                     f"{where} item {position}", policy)
        else:
            _manifest_images(source, document, base, starts, body, (), where, policy)
    return source


# --- deciding and rewriting -------------------------------------------------------------------------


def _question(occurrence: Occurrence) -> tuple[references.ImageReference | None, str]:
    try:
        ref = references.parse(occurrence.image)
    except references.InvalidReference as exc:
        return None, f"not a valid image reference: {exc}"
    return ref, ""


def _why_not(ref: references.ImageReference, answer: TagPromotion | None, environment: str) -> str:
    tag = ref.tag or "latest"
    if answer is None or not answer.built:
        return f"no valid record says a digest of {ref.repository} was built as :{tag}"
    builds = ", ".join(f"{d[:19]}…" for d in answer.built[:3]) + (" and others" if len(answer.built) > 3 else "")
    return f"built as :{tag}: {builds}; none of them is promoted to {environment}"


def _value_at(root: Any, path: Path_) -> Any:
    node = root
    for key in path:
        node = node[key]
    return node


def _verify(source: SourceFile, new_text: str, changes: Mapping[tuple[int, Path_], str]) -> bool:
    """Whether ``new_text`` reads as the original with exactly ``changes`` applied (document, path -> value)."""
    old = list(_documents(source.text))
    new = list(_documents(new_text))
    if len(old) != len(new):
        return False
    for document, ((_, before), (_, after)) in enumerate(zip(old, new, strict=True)):
        if before == after:
            continue
        try:
            expected, actual = _round_trip().load(before), _round_trip().load(after)
        except (YAMLError, RecursionError):
            return False
        for (doc, path), value in changes.items():
            if doc == document:
                parent = _value_at(expected, path[:-1])
                parent[path[-1]] = value
        if expected != actual:
            return False
    return True


def _write(path: str, text: str, bom: bool) -> None:
    target = Path(path)
    mode = target.stat().st_mode & 0o7777
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".pin")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)  # all or nothing: a reader never sees half a file
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


Answers = Callable[[Sequence[TagSubject]], Mapping[TagSubject, TagPromotion]]


def pin(files: Sequence[tuple[str, bool]], policy: Policy, environment: str, answers: Answers, *,
        write: bool = True) -> PinReport:
    """Pin every tag in ``files`` ((path, is a values file)) to the digest promoted to ``environment``.

    ``answers`` is asked once, for every tag of every file; its errors (the store or server is
    unreachable) propagate before anything is written.
    """
    report = PinReport()
    sources: list[SourceFile] = []
    for path, values in files:
        try:
            source = scan(path, policy, values=values)
        except PinError as exc:
            report.errors.append(str(exc))
            continue
        report.notes.extend(source.notes)
        report.errors.extend(source.errors)
        sources.append(source)
    tags: list[TagSubject] = []
    for source in sources:
        for occurrence in source.occurrences:
            ref, _ = _question(occurrence)
            if ref is not None and ref.digest is None and not occurrence.problem:
                tags.append((ref.repository, ref.tag or "latest"))
    found = answers(list(dict.fromkeys(tags))) if tags else {}
    for source in sources:
        edits: dict[tuple[int, int], str] = {}
        changes: dict[tuple[int, Path_], str] = {}
        pinned_here: list[Pinned] = []
        for occurrence in source.occurrences:
            ref, problem = _question(occurrence)
            if ref is not None and ref.digest is not None:
                report.already += 1
                continue
            if ref is None or occurrence.problem:
                report.not_pinned.append(NotPinned(occurrence.where, occurrence.image, problem or occurrence.problem))
                continue
            answer = found.get((ref.repository, ref.tag or "latest"))
            if answer is None or not answer.digest:
                report.not_pinned.append(NotPinned(occurrence.where, occurrence.image,
                                                   _why_not(ref, answer, environment)))
                continue
            text = occurrence.replacement(ref, answer.digest)
            edits[(occurrence.start, occurrence.end)] = text
            changes[(occurrence.document, occurrence.path)] = text
            pinned_here.append(Pinned(occurrence.where, occurrence.image, text))
        if not edits:
            continue
        if source.errors:
            report.errors.append(f"{source.path}: not rewritten, because a document of it cannot be read")
            continue
        new_text = source.text
        for (start, end), text in sorted(edits.items(), reverse=True):
            new_text = new_text[:start] + text + new_text[end:]
        if not _verify(source, new_text, changes):
            report.errors.append(f"{source.path}: not rewritten: the result would not read back as the original "
                                 "with only the image values changed")
            continue
        if write:
            try:
                _write(source.path, new_text, source.bom)
            except OSError as exc:
                report.errors.append(f"{source.path}: cannot write: {exc.strerror}")
                continue
        report.pinned.extend(pinned_here)
        report.changed.append(source.path)
    return report
