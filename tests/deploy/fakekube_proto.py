"""Decode the Kubernetes protobuf wire format of request bodies, for the fake API server.

client-go's typed clients (Helm's release storage among them) send built-in objects as
``application/vnd.kubernetes.protobuf``: the magic ``k8s\\0``, then a ``runtime.Unknown``
envelope whose ``raw`` field holds the object's protobuf message. The decoder is generic over
the protobuf wire format; the table below maps field numbers to JSON names for the kinds typed
clients send here (from k8s.io/api's generated.proto). Responses are always JSON, which every
client accepts.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any

MAGIC = b"k8s\x00"

# message -> field number -> (json name, type); a type is a message name, "string", "bytes",
# "int", "bool", "time", "map_string", "map_bytes", or "[T]" for repeated.
SCHEMAS: dict[str, dict[int, tuple[str, str]]] = {
    "Unknown": {1: ("typeMeta", "TypeMeta"), 2: ("raw", "bytes"),
                3: ("contentEncoding", "string"), 4: ("contentType", "string")},
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "ObjectMeta": {1: ("name", "string"), 2: ("generateName", "string"),
                   3: ("namespace", "string"), 5: ("uid", "string"),
                   6: ("resourceVersion", "string"), 7: ("generation", "int"),
                   8: ("creationTimestamp", "time"), 11: ("labels", "map_string"),
                   12: ("annotations", "map_string"),
                   13: ("ownerReferences", "[OwnerReference]"), 14: ("finalizers", "[string]")},
    "OwnerReference": {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                       5: ("apiVersion", "string"), 6: ("controller", "bool"),
                       7: ("blockOwnerDeletion", "bool")},
    "Secret": {1: ("metadata", "ObjectMeta"), 2: ("data", "map_bytes"), 3: ("type", "string"),
               4: ("stringData", "map_string"), 5: ("immutable", "bool")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map_string"),
                  3: ("binaryData", "map_bytes"), 4: ("immutable", "bool")},
    "Namespace": {1: ("metadata", "ObjectMeta")},
}


class ProtoError(ValueError):
    """The body is not a protobuf message this decoder knows."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) of every field in a message."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _scalar(kind: str, raw: Any) -> Any:
    if kind == "string":
        return raw.decode()
    if kind == "bytes":
        return raw
    if kind == "int":
        return raw
    if kind == "bool":
        return bool(raw)
    if kind == "time":
        fields = {n: v for n, _, v in _fields(raw)}
        seconds = fields.get(1, 0)
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return decode_message(kind, raw)


def decode_message(name: str, buf: bytes) -> dict[str, Any]:
    """One message as the JSON object the API would accept."""
    schema = SCHEMAS[name]
    out: dict[str, Any] = {}
    for number, _, raw in _fields(buf):
        if number not in schema:
            continue
        key, kind = schema[number]
        if kind.startswith("map_"):
            entry = {n: v for n, _, v in _fields(raw)}
            value = entry.get(2, b"")
            out.setdefault(key, {})[entry.get(1, b"").decode()] = (
                base64.b64encode(value).decode() if kind == "map_bytes" else value.decode())
        elif kind.startswith("["):
            out.setdefault(key, []).append(_scalar(kind[1:-1], raw))
        else:
            out[key] = _scalar(kind, raw)
    return out


def decode(body: bytes) -> dict[str, Any]:
    """A ``k8s\\0``-framed protobuf object as JSON."""
    if not body.startswith(MAGIC):
        raise ProtoError("missing the k8s protobuf magic")
    unknown = decode_message("Unknown", body[len(MAGIC):])
    type_meta = unknown.get("typeMeta", {})
    kind = type_meta.get("kind", "")
    if kind not in SCHEMAS:
        raise ProtoError(f"no protobuf schema for kind {kind!r} in the fake server")
    obj = decode_message(kind, unknown.get("raw", b""))
    return {"apiVersion": type_meta.get("apiVersion"), "kind": kind, **obj}
