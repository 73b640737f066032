"""Server-side apply bookkeeping: would an apply change anything? (pure)

A live object records, per field manager, which fields that manager set
(``metadata.managedFields[].fieldsV1``). ``compute_owned_view`` cuts the live
object down to the fields our manager owns; ``compute_needs_apply`` compares
that view with the desired manifest. Equal means an apply would be a no-op, so
the operator skips the write.

This catches every kind of drift an apply can repair:
- a child deleted: there is no live object;
- a field changed by hand (``kubectl edit``/``set``/``scale``): the other
  manager takes ownership of the field, so it is missing from our view
  (even when we want it false or 0: the whole object still has the key);
- a field we set before and no longer want: it is still in our view.
Fields that another manager added and we never set are left alone, as
server-side apply itself would leave them.
"""

from __future__ import annotations

import functools
import json
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils.quantity import parse_quantity

# Map keys whose string values are Kubernetes quantities: the API server may
# store them in canonical form ("0.5" -> "500m"), so they compare by value.
QUANTITY_KEYS = frozenset(
    {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu", "sizeLimit", "averageValue"}
)


def find_managed_fields(live: dict[str, Any], manager: str) -> dict[str, Any] | None:
    """The fieldsV1 set that ``manager`` owns through apply on the main resource."""
    merged: dict[str, Any] | None = None
    for entry in live.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        if entry.get("subresource"):
            continue
        merged = _merge_sets(merged or {}, entry.get("fieldsV1") or {})
    return merged


def _merge_sets(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_sets(out[k], v) if k in out else v
    return out


def compute_owned_view(obj: Any, fields: dict[str, Any], *, whole: bool = False) -> Any:
    """The part of ``obj`` that the field set ``fields`` covers.

    With ``whole``, maps keep every key of ``obj`` (the ones outside ``fields``
    as they are) while lists are still cut to the items ``fields`` covers: the
    live object aligned item for item with the owned view, so that
    ``compute_equal`` can tell a key absent from the object from a key that
    another manager owns.
    """
    if isinstance(obj, list):
        return _owned_list(obj, fields, whole)
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = dict(obj) if whole else {}
    for key, sub in fields.items():
        if not key.startswith("f:"):
            continue
        name = key[2:]
        if name not in obj:
            continue
        value = obj[name]
        out[name] = (
            value if not sub or sub == {".": {}} else compute_owned_view(value, sub, whole=whole)
        )
    return out


@functools.lru_cache(maxsize=8192)
def _parse_key(raw: str) -> Any:
    """A ``k:``/``v:`` key's JSON, parsed once (the same keys recur in every reconcile)."""
    return json.loads(raw)


def _owned_list(items: list[Any], fields: dict[str, Any], whole: bool) -> list[Any]:
    out: list[Any] = []
    for item in items:
        for key, sub in fields.items():
            if key.startswith("k:"):
                ident = _parse_key(key[2:])
                if isinstance(item, dict) and all(item.get(k) == v for k, v in ident.items()):
                    out.append(
                        compute_owned_view(item, sub, whole=whole)
                        if sub and sub != {".": {}}
                        else item
                    )
                    break
            elif key.startswith("v:") and item == _parse_key(key[2:]):
                out.append(item)
                break
    return out


def _is_zero(value: Any) -> bool:
    # The API server drops omitempty zero values, so "unset" equals these.
    return (
        value is None or value is False or value == 0 or value == "" or value == [] or value == {}
    )


def _quantity_equal(a: Any, b: Any) -> bool:
    try:
        return bool(Decimal(parse_quantity(a)) == Decimal(parse_quantity(b)))  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, InvalidOperation):
        return False


_SAME: Any = object()  # compute_equal's ``whole`` default: ``live`` is the whole object


def compute_equal(desired: Any, live: Any, key: str = "", whole: Any = _SAME) -> bool:
    """Semantic equality of a desired value and our owned view of the live one.

    ``whole`` is the same part of the whole live object (``compute_owned_view``
    with ``whole=True``); left out, ``live`` is taken to be the whole object.
    A desired zero value (false, 0, "") equals a key missing from our view only
    when the object lacks the key too (the API server drops omitempty zeros):
    when it has the key, another manager took the field over by hand (kubectl
    edit/patch/scale), whatever value it holds now, and an apply must win it back.
    """
    if whole is _SAME:
        whole = live
    if isinstance(desired, dict) and isinstance(live, dict):
        rest = whole if isinstance(whole, dict) else live
        for k in desired.keys() | live.keys():
            if k not in live:
                if k in rest or not _is_zero(desired[k]):
                    return False
            elif k not in desired:
                if not _is_zero(live[k]):
                    return False
            elif not compute_equal(desired[k], live[k], k, rest.get(k, live[k])):
                return False
        return True
    if isinstance(desired, list) and isinstance(live, list):
        rest_items = whole if isinstance(whole, list) and len(whole) == len(live) else live
        return len(desired) == len(live) and all(
            compute_equal(d, v, key, w) for d, v, w in zip(desired, live, rest_items, strict=True)
        )
    if desired == live:
        return True
    if isinstance(desired, str) and isinstance(live, str | int) and key in QUANTITY_KEYS:
        return _quantity_equal(desired, str(live))
    return False


IDENTITY_KEYS = ("apiVersion", "kind")


def compute_needs_apply(desired: dict[str, Any], live: dict[str, Any] | None, manager: str) -> bool:
    """True when applying ``desired`` as ``manager`` would change ``live``."""
    if live is None:
        return True
    fields = find_managed_fields(live, manager)
    if fields is None:
        return True
    owned = compute_owned_view(live, fields)
    aligned = compute_owned_view(live, fields, whole=True)
    want = {k: v for k, v in desired.items() if k not in IDENTITY_KEYS}
    want["metadata"] = {
        k: v for k, v in desired.get("metadata", {}).items() if k not in ("name", "namespace")
    }
    return not compute_equal(want, owned, whole=aligned)


def compute_last_writers(live: dict[str, Any]) -> set[str]:
    """Managers of the most recent managedFields entries (ties included)."""
    entries = live.get("metadata", {}).get("managedFields") or []
    times = [str(e.get("time", "")) for e in entries]
    if not times:
        return set()
    latest = max(times)
    return {str(e.get("manager", "")) for e, t in zip(entries, times, strict=True) if t == latest}


def compute_caused_by(live: dict[str, Any], manager: str) -> bool:
    """True when ``manager`` alone made the latest change to ``live`` (an echo of our own write)."""
    return compute_last_writers(live) == {manager}


# Fields another controller takes over once we stop setting them: kind -> path.
# (The HPA scales a Deployment through spec.replicas.)
HANDOVER_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("apps/v1", "Deployment"): ("spec", "replicas"),
}


def compute_handover(
    desired: dict[str, Any], live: dict[str, Any] | None, manager: str
) -> dict[str, Any] | None:
    """The apply that hands a field we stop setting over to another manager, or None.

    When ``desired`` drops a field that ``manager`` is the sole owner of, a plain
    apply would remove it from the object (``spec.replicas`` falls back to 1).
    Applying the field's live value under a separate handover manager first
    keeps the value; our next apply then gives up only our share of it. See
    "Transferring ownership" in the Kubernetes server-side apply docs.
    """
    path = HANDOVER_FIELDS.get((desired.get("apiVersion", ""), desired.get("kind", "")))
    if path is None or live is None:
        return None
    want: Any = desired
    for step in path:
        if not isinstance(want, dict) or step not in want:
            break
        want = want[step]
    else:
        return None  # we still set it
    fields: Any = find_managed_fields(live, manager)
    value: Any = live
    for step in path:
        if not isinstance(fields, dict) or f"f:{step}" not in fields:
            return None  # not ours: nothing to hand over
        if not isinstance(value, dict) or step not in value:
            return None  # absent from the object: nothing to keep
        fields, value = fields[f"f:{step}"], value[step]
    patch: Any = value
    for step in reversed(path):
        patch = {step: patch}
    meta = desired["metadata"]
    return {
        "apiVersion": desired["apiVersion"],
        "kind": desired["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        **patch,
    }
