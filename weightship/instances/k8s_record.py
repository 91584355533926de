"""What a Kubernetes instance was asked to be (its namespace's annotations), and which nodes are
its own. Pure functions over API objects: no cluster.

The cluster is the record: ``create`` writes what it was asked (model, GPUs, replicas, host,
the user's chart values, who may reach the API port) into the namespace's ``weightship.io/*``
annotations, and every later command plans the release again from :meth:`Record.of`. Those
annotations come from the cluster, where anyone with the rights can edit them, so a value that
does not parse is an :class:`~weightship.errors.InstanceRecordError` naming it, never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from weightship.deploy.k8s.values import Values
from weightship.errors import InstanceRecordError
from weightship.instances import k8s_objects as objs

Obj = dict[str, Any]


@dataclass
class Record:
    """What an instance was asked to be: the namespace's ``weightship.io/*`` annotations."""

    model: str
    gpus: int = 1
    replicas: int = 1
    paused: bool = False
    host: str | None = None
    tls_secret: str | None = None
    version: str | None = None
    created: str = ""
    user_values: Values = field(default_factory=dict)  # the user's -f/--set, merged
    allow_from: list[str] = field(default_factory=list)
    admin_from: list[str] = field(default_factory=list)
    volume: str = ""  # the size of each claim, set at create: claims are not resized later

    def annotations(self) -> dict[str, str]:
        fields = {"model": self.model, "gpus": str(self.gpus), "replicas": str(self.replicas),
                  "paused": str(self.paused).lower(), "host": self.host or "",
                  "tls-secret": self.tls_secret or "", "version": self.version or "",
                  "created": self.created, "values": json.dumps(self.user_values, sort_keys=True),
                  "allow-from": ",".join(self.allow_from), "admin-from": ",".join(self.admin_from),
                  "volume": self.volume}
        return {objs.ANNOTATION + k: v for k, v in fields.items()}

    @classmethod
    def of(cls, ns: Obj) -> Record:
        """The record in namespace ``ns`` (raises :class:`InstanceRecordError` for a value that
        does not parse)."""
        namespace = str(ns["metadata"].get("name", ""))
        a = {k.removeprefix(objs.ANNOTATION): v
             for k, v in (ns["metadata"].get("annotations") or {}).items()
             if k.startswith(objs.ANNOTATION)}

        def count(key: str, least: int) -> int:
            text = a.get(key) or "1"
            if not text.isdigit() or int(text) < least:
                raise InstanceRecordError(namespace, key, f"is not a whole number of at least "
                                                          f"{least}: {text!r}")
            return int(text)

        try:
            user_values = json.loads(a.get("values") or "{}")
        except ValueError as e:
            raise InstanceRecordError(namespace, "values", f"is not JSON ({e})") from None
        if not isinstance(user_values, dict):
            raise InstanceRecordError(namespace, "values", "is not a JSON object")
        if not a.get("model"):
            raise InstanceRecordError(namespace, "model", "is missing")
        return cls(model=a["model"], gpus=count("gpus", 0), replicas=count("replicas", 1),
                   paused=a.get("paused") == "true", host=a.get("host") or None,
                   tls_secret=a.get("tls-secret") or None, version=a.get("version") or None,
                   created=a.get("created", ""), user_values=user_values,
                   allow_from=_listed(a.get("allow-from", "")),
                   admin_from=_listed(a.get("admin-from", "")), volume=a.get("volume", ""))


def _listed(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def dedicated_nodes(nodes: list[Obj], name: str) -> tuple[list[str], list[str]]:
    """(the nodes given to instance ``name``, the problems that forbid using them)."""
    mine, problems = [], []
    for node in nodes:
        node_name = node["metadata"]["name"]
        label = (node["metadata"].get("labels") or {}).get(objs.DEDICATED)
        tainted = any(t.get("key") == objs.DEDICATED and t.get("value") == name
                      and t.get("effect") == "NoSchedule"
                      for t in (node.get("spec") or {}).get("taints") or [])
        if tainted:
            mine.append(node_name)
            if label and label != name:
                problems.append(f"node {node_name} is tainted for {name} but labelled for "
                                f"instance {label!r}")
        elif label == name:
            problems.append(f"node {node_name} is labelled for {name} but not tainted "
                            f"{objs.DEDICATED}={name}:NoSchedule, so other work could run on it")
    if not mine:
        problems.insert(0, f"no node is tainted {objs.DEDICATED}={name}:NoSchedule: give the "
                           f"company its GPU nodes first (kubectl taint nodes NODE "
                           f"{objs.DEDICATED}={name}:NoSchedule)")
    return mine, problems


def labelled(node: Obj, name: str) -> Obj:
    """``node`` as it will be once labelled for instance ``name`` (for preflight)."""
    meta = {**node["metadata"], "labels": {**(node["metadata"].get("labels") or {}),
                                            objs.DEDICATED: name}}
    return {**node, "metadata": meta}
