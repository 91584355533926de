"""API keys of an instance, on any target: add (the key is shown once), list, revoke.

Only hashes are stored (the format is :mod:`weightship.runtime.keys`); each instance's servers
reload their key file when it changes, so a revoked key is refused within seconds. A target whose
servers did not all load the new file in time raises
:class:`~weightship.errors.KeysNotLoadedError` after storing it, with :attr:`result` set to
what the command did (a new key is then still shown, once).
"""

from __future__ import annotations

import re
from typing import Any

from weightship.errors import KeyNameTakenError, KeyNotFoundError, KeysNotLoadedError, UsageError
from weightship.instances.target import Target

# Names that fit in logs, metrics labels and CSV columns without quoting.
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
OPERATOR_KEY = "weightship-operator"  # the key `instance usage` reads /v1/usage with


def check_key_name(name: str) -> str:
    if not _KEY_NAME.match(name) or name == OPERATOR_KEY:
        raise UsageError(f"invalid key name {name!r}",
                         hint="1 to 63 letters, digits, '.', '_' or '-', starting with a letter or "
                              f"digit ({OPERATOR_KEY!r} is reserved)")
    return name


def add(target: Target, instance: str, key_name: str) -> dict[str, Any]:
    """A new key for ``instance``: ``{"name", "id", "key", "created"}``; the key is not kept."""
    check_key_name(key_name)
    keys = target.read_keys(instance)
    if keys.by_name(key_name) is not None:
        raise KeyNameTakenError(instance, key_name)
    entry, key = keys.add(key_name)
    added: dict[str, Any] = {"name": entry.name, "id": entry.id, "key": key, "created": entry.created}
    try:
        target.write_keys(instance, keys)
    except KeysNotLoadedError as e:
        e.result = added  # stored: the key must still be shown, this once
        raise
    return added


def listing(target: Target, instance: str) -> list[dict[str, Any]]:
    """The instance's keys: names, ids, creation times and scopes, never secrets or hashes."""
    return [k.public() for k in target.read_keys(instance).keys if k.name != OPERATOR_KEY]


def revoke(target: Target, instance: str, key_name: str) -> dict[str, Any]:
    """Remove ``key_name`` from the instance's key file."""
    keys = target.read_keys(instance)
    if key_name == OPERATOR_KEY or keys.by_name(key_name) is None:
        raise KeyNotFoundError(instance, key_name)
    entry = keys.remove(key_name)
    assert entry is not None, key_name
    revoked: dict[str, Any] = {"name": entry.name, "id": entry.id, "revoked": True}
    try:
        target.write_keys(instance, keys)
    except KeysNotLoadedError as e:
        e.result = revoked
        raise
    return revoked
