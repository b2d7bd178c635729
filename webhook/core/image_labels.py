"""What an image's own labels say about its source, and whether the pipeline's flags agree with them.

The seed puts the commit and the CI run into the image when it is built
(``docker build --label git.commit=… --label ci.run=…``); docker/metadata-action and buildx write the
OCI names (``org.opencontainers.image.revision``, ``org.opencontainers.image.source``). ``record``
reads them from the config of every platform of the image and reconciles them with its flags here:

* a flag that is absent is filled from the label, and the field is *confirmed*;
* a flag that equals the label is confirmed;
* a flag that contradicts the label is refused (:class:`LabelConflict`): a record must never say
  something about an image that the image itself denies;
* a label that is absent (on any platform) confirms nothing, and the flag, if any, stands alone.

Pure: the labels arrive already read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from webhook.core.errors import Refused
from webhook.core.records import MAX_TEXT, Source


@dataclass(frozen=True, slots=True)
class SourceField:
    name: str  # the predicate's name: source.<name>, and in confirmedByImageLabels
    flag: str
    labels: tuple[str, ...]  # label names that carry it, the OCI name first
    words: str  # how a person calls it


FIELDS = (
    SourceField("gitCommit", "--git-commit", ("org.opencontainers.image.revision", "git.commit"), "git commit"),
    SourceField("ciRunId", "--ci-run", ("ci.run",), "CI run"),
    SourceField("repository", "--git-repository", ("org.opencontainers.image.source",), "source repository"),
)
LABEL_NAMES = tuple(name for f in FIELDS for name in f.labels)


class LabelConflict(Refused):
    """The image's labels contradict a flag, or each other: nothing may be recorded."""


@dataclass(frozen=True, slots=True)
class PlatformLabels:
    platform: str  # "linux/amd64"; for an image without an index, its config's platform
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ConfirmedSource:
    source: Source
    confirmed: tuple[str, ...]  # predicate names of the fields the labels confirmed, sorted
    notes: tuple[str, ...] = ()  # what could not be confirmed, for the person running record


def _given(source: Source, name: str) -> str:
    return {"gitCommit": source.git_commit, "ciRunId": source.ci_run_id, "repository": source.git_repository}[name]


def _same(field: SourceField, flag: str, label: str) -> bool:
    if field.name == "gitCommit":
        return flag.lower() == label.lower()
    if field.name == "repository":
        return _repository_key(flag) == _repository_key(label)
    return flag == label


def _repository_key(url: str) -> str:
    text = url.strip().lower()
    for scheme in ("https://", "http://", "git+https://", "ssh://git@"):
        text = text.removeprefix(scheme)
    return text.rstrip("/").removesuffix(".git")


def _label_value(field: SourceField, image: PlatformLabels) -> tuple[str, str] | None:
    """(label name, value) of one platform, or None; two names that disagree are a conflict."""
    found = [(name, image.labels[name]) for name in field.labels if image.labels.get(name)]
    for name, value in found:
        if len(value) > MAX_TEXT:
            raise LabelConflict(f"label {name} of {image.platform or 'the image'} is longer than {MAX_TEXT} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise LabelConflict(f"label {name} of {image.platform or 'the image'} holds control characters")
    if len({value for _, value in found}) > 1:
        (first, a), (second, b) = found[0], found[1]
        raise LabelConflict(f'the labels of {image.platform or "the image"} disagree: {first} is "{a}" but {second} '
                            f'is "{b}"')
    return found[0] if found else None


def reconcile(given: Source, images: Sequence[PlatformLabels], reference: str) -> ConfirmedSource:
    """The record's source: the flags, filled and confirmed by the labels of every platform of the image."""
    values = {"gitCommit": given.git_commit, "ciRunId": given.ci_run_id, "repository": given.git_repository}
    confirmed: list[str] = []
    notes: list[str] = []
    for field in FIELDS:
        per_platform = [(image, _label_value(field, image)) for image in images]
        labelled = [(image, found) for image, found in per_platform if found is not None]
        if not labelled:
            continue
        distinct = {value for _, (_, value) in labelled}
        if len(distinct) > 1:
            sides = ", ".join(f'{image.platform} has "{value}"' for image, (_, value) in labelled)
            raise LabelConflict(f"the platforms of {reference} disagree on the {field.words}: {sides}")
        missing = [image.platform for image, found in per_platform if found is None]
        label, value = labelled[0][1]
        if missing:
            notes.append(f"the {field.words} is not confirmed: {label} is missing on {', '.join(missing)}")
            continue
        flag = _given(given, field.name)
        if flag and not _same(field, flag, value):
            raise LabelConflict(f'{field.flag} "{flag}" contradicts the image: its label {label} is "{value}" '
                                f"({reference})")
        values[field.name] = flag or value
        confirmed.append(field.name)
    for field in FIELDS:
        if field.name not in confirmed and not any(f"the {field.words} " in note for note in notes):
            names = " or ".join(field.labels)
            notes.append(f"the {field.words} is not confirmed: the image has no {names} label")
    source = Source(values["gitCommit"], values["repository"], values["ciRunId"], given.ci_run_url)
    return ConfirmedSource(source, tuple(sorted(confirmed)), tuple(notes))
