"""Finding the field that makes a protobuf message fail to parse.

protobuf refuses a message whose ``string`` field holds invalid UTF-8, and
grpc then answers with a status that names nothing a client can fix. This
walks the raw bytes with the message's descriptor (the wire format is four
kinds of field) to name the offending field, e.g. ``chat.messages[1].content``,
so the request is answered INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

_MAX_DEPTH = 32


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def find_bad_field(descriptor: Any, data: bytes, prefix: str = "", depth: int = 0) -> str | None:
    """The path of the first string field that is not UTF-8 (None: none found)."""
    if depth > _MAX_DEPTH:
        return None
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, kind = key >> 3, key & 7
            if kind == 0:
                _, pos = _varint(data, pos)
                continue
            if kind == 1:
                pos += 8
                continue
            if kind == 5:
                pos += 4
                continue
            if kind != 2:
                return None
            size, pos = _varint(data, pos)
            chunk = data[pos : pos + size]
            pos += size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = counts.get(number, 0)
            counts[number] = index + 1
            repeated = _is_repeated(field)
            path = f"{prefix}{field.name}" + (f"[{index}]" if repeated else "")
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry:
                    found = find_bad_field(
                        field.message_type, chunk, f"{prefix}{field.name}.", depth + 1
                    )
                else:
                    found = find_bad_field(field.message_type, chunk, f"{path}.", depth + 1)
                if found is not None:
                    return found
    except ValueError:
        return None
    return None


def _is_repeated(field: Any) -> bool:
    is_repeated = getattr(field, "is_repeated", None)
    if isinstance(is_repeated, bool):
        return is_repeated
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)
