"""How big an audit event may get, and how a bigger one is cut.

Whoever reaches ``/validate`` chooses what an AdmissionReview holds: a name of a megabyte, ten
thousand containers, a thousand groups. The audit event keeps its fields but bounds each of them, so
that one event is at most :data:`MAX_EVENT_BYTES` as JSON (UTF-8), whatever was posted:

- a text field longer than its limit is cut and ends with ``…``;
- a list longer than its limit keeps its first entries;
- an event that is still too big loses entries from the end of its longest lists (findings,
  images, groups) until it fits.

Every cut is named in the event's ``truncated`` field: the field's name, with its original length
(characters of a text, entries of a list). An event that needed no cut has no ``truncated`` field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

MAX_EVENT_BYTES = 64 * 1024
ELLIPSIS = "…"

# Characters per text field. uid, namespace and user also fit the store's indexed columns.
TEXT_LIMITS = {
    "uid": 128, "user": 512, "namespace": 253, "kind": 128, "name": 253, "operation": 16, "subResource": 64,
    "environment": 253, "breakGlass": 1024, "breakGlassRefused": 1024, "skipped": 512, "policy": 64,
}
GROUP_CHARS = 256
FINDING_CHARS = 2048
IMAGE_TEXT_LIMITS = {"container": 253, "field": 256, "image": 1024, "repository": 512}
DIGEST_CHARS = 140  # longer is not a digest the store can index: dropped, never cut
RECORD_ID_CHARS = 64
LIST_LIMITS = {"groups": 64, "findings": 100, "images": 100}
RECORDS_PER_IMAGE = 16


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def size_of(event: dict[str, Any]) -> int:
    return len(orjson.dumps(event))


def bound_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event with every field within its limit, and a ``truncated`` entry for each field that was cut."""
    truncated: dict[str, int] = {}
    bounded = dict(event)

    def note(name: str, original: int) -> None:
        truncated.setdefault(name, original)

    for name, limit in TEXT_LIMITS.items():
        value = bounded.get(name)
        if isinstance(value, str) and len(value) > limit:
            note(name, len(value))
            bounded[name] = _cut(value, limit)

    def bound_list(name: str, bound_item: Callable[[Any], tuple[Any, bool]]) -> None:
        items = bounded.get(name)
        if not isinstance(items, list):
            return
        kept, cut = [], len(items) > LIST_LIMITS[name]
        for item in items[: LIST_LIMITS[name]]:
            item, item_cut = bound_item(item)
            kept.append(item)
            cut = cut or item_cut
        if cut:
            note(name, len(items))
        bounded[name] = kept

    def text_item(limit: int) -> Callable[[Any], tuple[Any, bool]]:
        def bound(item: Any) -> tuple[Any, bool]:
            return (_cut(item, limit), len(item) > limit) if isinstance(item, str) else (item, False)
        return bound

    def image_item(item: Any) -> tuple[Any, bool]:
        if not isinstance(item, dict):
            return item, False
        image, cut = dict(item), False
        for key, limit in IMAGE_TEXT_LIMITS.items():
            value = image.get(key)
            if isinstance(value, str) and len(value) > limit:
                image[key], cut = _cut(value, limit), True
        digest = image.get("digest")
        if isinstance(digest, str) and len(digest) > DIGEST_CHARS:
            image["digest"], cut = "", True
        records = image.get("records")
        if isinstance(records, list):
            kept = [_cut(r, RECORD_ID_CHARS) if isinstance(r, str) else r for r in records[:RECORDS_PER_IMAGE]]
            cut = cut or kept != records
            image["records"] = kept
        return image, cut

    bound_list("groups", text_item(GROUP_CHARS))
    bound_list("findings", text_item(FINDING_CHARS))
    bound_list("images", image_item)

    # Still too big (text that escapes to several bytes a character): halve the longest list.
    while size_of({**bounded, "truncated": truncated}) > MAX_EVENT_BYTES:
        name = max(("findings", "images", "groups"), key=lambda n: len(bounded.get(n) or []))
        items = bounded.get(name) or []
        if not items:
            break  # unreachable with the limits above: the text fields alone stay far below the bound
        note(name, len(event.get(name) or []))
        bounded[name] = items[: len(items) // 2]
    if truncated:
        bounded["truncated"] = truncated
    return bounded
