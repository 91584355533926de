"""The nodes inventory (``nodes.yaml``): hosts, groups, pinned keys, and how nodes get weightship.

Checked against ``weightship/schemas/nodes.schema.json``; a problem is reported with the line of
the inventory it is on. Example::

    known_hosts: known_hosts                  # beside this file; `weightship nodes trust` writes it
    runtime: {wheelhouse: ./wheels}           # or {venv: /opt/weightship/venv} or {index: URL}
    hosts:
      gpu1: {address: 10.1.0.11, user: root, identity: ~/.ssh/id_ed25519, gpus: 1}
      gpu2: {address: 10.1.0.12, gpus: 1, jump: bastion}
      bastion: {address: 203.0.113.7}
    groups:
      acme: [gpu1, gpu2]
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightship.errors import InventoryError, UsageError

DEFAULT_PREFIX = "/opt/weightship"


@dataclass(frozen=True)
class Host:
    """One server of the inventory."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    identity: Path | None = None  # None: the ssh-agent's keys
    sudo: bool = False  # steps run through `sudo -n` (user is not root)
    jump: str | None = None  # name of another host to connect through
    host_keys: tuple[str, ...] = ()  # pinned SHA256 fingerprints, besides known_hosts
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def target(self) -> str:
        """How known_hosts names this host: ``address`` or ``[address]:port``."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


@dataclass(frozen=True)
class Runtime:
    """How weightship gets onto a node: exactly one of ``venv``, ``wheelhouse`` or ``index``."""

    venv: str | None = None  # an existing venv on the node, used as it is
    wheelhouse: Path | None = None  # wheels on this machine, copied to the node and installed
    index: str | None = None  # the node's own package index
    version: str | None = None  # with index: the weightship version to install
    python: str = "/usr/bin/python3"  # the node's Python that makes the venv


@dataclass(frozen=True)
class Inventory:
    """A parsed, checked inventory."""

    path: Path
    hosts: dict[str, Host]
    groups: dict[str, list[str]]
    known_hosts: Path
    runtime: Runtime
    prefix: str = DEFAULT_PREFIX
    fetch_env: dict[str, str] = field(default_factory=dict)
    fetch_args: tuple[str, ...] = ()
    fetch_trust_keys: tuple[Path, ...] = ()  # public keys the nodes' fetch trusts (copied there)

    def select(self, *, group: str | None = None, hosts: list[str] | None = None) -> list[Host]:
        """The hosts a command acts on: a group, a list of names, or every host."""
        if group is not None and hosts:
            raise UsageError("give --group or --hosts, not both")
        if group is not None:
            if group not in self.groups:
                raise UsageError(f"no group {group!r} in {self.path}",
                                 hint="groups: " + (", ".join(sorted(self.groups)) or "none"))
            names = self.groups[group]
        elif hosts:
            names = hosts
        else:
            names = list(self.hosts)
        unknown = [n for n in names if n not in self.hosts]
        if unknown:
            raise UsageError(f"no host {', '.join(map(repr, unknown))} in {self.path}",
                             hint="hosts: " + ", ".join(sorted(self.hosts)))
        return [self.hosts[n] for n in names]


@functools.cache
def _schema() -> dict[str, Any]:
    text = (importlib.resources.files("weightship") / "schemas" / "nodes.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _line_of(root: yaml.Node | None, path: list[str | int]) -> int | None:
    """1-based line of the YAML node at ``path`` (the deepest one that exists)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _refuse_duplicate_keys(node: yaml.Node | None, shown: str) -> None:
    """A key given twice in one mapping (a host listed twice) is an error, not a silent overwrite."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                raise InventoryError(shown, f"{key.value!r} is given twice", line=key.start_mark.line + 1)
            seen.add(key.value)
            _refuse_duplicate_keys(value, shown)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, shown)


# Where a service with ProtectHome=/PrivateTmp= could not see its files.
_HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")


def load(path: Path) -> Inventory:
    """Read and check the inventory at ``path``.

    Steps: parse the YAML (no key given twice), check it against the schema, build the hosts and
    check what the schema cannot (jump hosts exist and do not go round, sudo for non-root users),
    check the groups' members, then the runtime and the prefix.
    """
    shown = str(path)
    root, data = _parse(path, shown)
    _check_schema(data, root, shown)
    base = path.resolve().parent
    hosts = _hosts(data, base)
    for host in hosts.values():
        _check_host(host, hosts, root, shown)
    groups = {g: list(members) for g, members in (data.get("groups") or {}).items()}
    _check_groups(groups, hosts, root, shown)
    runtime = _runtime(data.get("runtime") or {"wheelhouse": None}, base, shown)
    prefix = _prefix(data.get("prefix", DEFAULT_PREFIX), root, shown)
    fetch = data.get("fetch") or {}
    return Inventory(path=path, hosts=hosts, groups=groups,
                     known_hosts=base / data.get("known_hosts", "known_hosts"), runtime=runtime,
                     prefix=prefix, fetch_env=dict(fetch.get("env", {})),
                     fetch_args=tuple(fetch.get("args", ())),
                     fetch_trust_keys=tuple(base / Path(k).expanduser() for k in fetch.get("trust_keys", ())))


def _parse(path: Path, shown: str) -> tuple[yaml.Node | None, dict[str, Any]]:
    """(the YAML node tree, for line numbers; the data), refusing a key given twice."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InventoryError(shown, f"cannot read: {e.strerror or e}") from None
    try:
        root = yaml.compose(text)
        _refuse_duplicate_keys(root, shown)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InventoryError(shown, f"not valid YAML: {getattr(e, 'problem', None) or e}",
                             line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise InventoryError(shown, "must be a mapping with a `hosts:` section", line=1)
    return root, data


def _check_schema(data: dict[str, Any], root: yaml.Node | None, shown: str) -> None:
    """The first schema error (by line of the inventory), if any."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data),
                    key=lambda e: (_line_of(root, list(e.absolute_path)) or 0))
    if errors:
        first = errors[0]
        where = "/".join(map(str, first.absolute_path)) or "top level"
        raise InventoryError(shown, f"{where}: {first.message}", line=_line_of(root, list(first.absolute_path)))


def _hosts(data: dict[str, Any], base: Path) -> dict[str, Host]:
    """The hosts, each with the inventory's ``defaults:`` under its own settings."""
    defaults = data.get("defaults", {})
    hosts: dict[str, Host] = {}
    for name, spec in data["hosts"].items():
        merged = {**defaults, **spec}
        identity = merged.get("identity")
        hosts[name] = Host(
            name=name, address=merged["address"], port=merged.get("port", 22),
            user=merged.get("user", "root"),
            identity=(base / Path(identity).expanduser()) if identity else None,
            sudo=merged.get("sudo", False), jump=merged.get("jump"),
            host_keys=tuple(merged.get("host_keys", ())), gpus=merged.get("gpus", 0),
            labels=dict(merged.get("labels", {})))
    return hosts


def _check_host(host: Host, hosts: dict[str, Host], root: yaml.Node | None, shown: str) -> None:
    """A host's jump host is another host of the inventory, its chain of jumps ends, and a
    non-root user has sudo."""
    if host.jump is not None and (host.jump not in hosts or host.jump == host.name):
        raise InventoryError(shown, f"hosts/{host.name}/jump: no other host {host.jump!r}",
                             line=_line_of(root, ["hosts", host.name, "jump"]))
    chain = [host.name]
    while hosts[chain[-1]].jump is not None:
        chain.append(hosts[chain[-1]].jump or "")
        if chain[-1] in chain[:-1]:
            raise InventoryError(shown, f"hosts/{host.name}/jump: the jump hosts go round in a circle "
                                 f"({' -> '.join(chain)})", line=_line_of(root, ["hosts", host.name, "jump"]))
    if host.user != "root" and not host.sudo:
        raise InventoryError(shown, f"hosts/{host.name}: user {host.user!r} needs `sudo: true` "
                             "(node steps write /etc/systemd/system)",
                             line=_line_of(root, ["hosts", host.name]))


def _check_groups(groups: dict[str, list[str]], hosts: dict[str, Host], root: yaml.Node | None,
                  shown: str) -> None:
    """Every member of a group is a host of the inventory."""
    for g, members in groups.items():
        for i, member in enumerate(members):
            if member not in hosts:
                raise InventoryError(shown, f"groups/{g}: no host {member!r}", line=_line_of(root, ["groups", g, i]))


def _runtime(rt: dict[str, Any], base: Path, shown: str) -> Runtime:
    """The ``runtime:`` section, which must name a venv, a wheelhouse or an index."""
    runtime = Runtime(venv=rt.get("venv"), index=rt.get("index"), version=rt.get("version"),
                      wheelhouse=(base / Path(rt["wheelhouse"]).expanduser()) if rt.get("wheelhouse") else None,
                      python=rt.get("python", "/usr/bin/python3"))
    if runtime.venv is None and runtime.index is None and runtime.wheelhouse is None:
        raise InventoryError(shown, "runtime: say how weightship gets onto the nodes "
                             "({venv: PATH}, {wheelhouse: DIR} or {index: URL})", line=1)
    return runtime


def _prefix(prefix: str, root: yaml.Node | None, shown: str) -> str:
    """``prefix``, if the service's sandbox (ProtectHome=, PrivateTmp=) would let it see it."""
    if ".." in prefix.split("/") or any(prefix == d or prefix.startswith(d + "/") for d in _HIDDEN):
        raise InventoryError(shown, f"prefix {prefix!r}: must be an absolute path without '..', outside "
                             f"{', '.join(_HIDDEN)} (which the service's sandbox hides)",
                             line=_line_of(root, ["prefix"]))
    return prefix
