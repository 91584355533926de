"""Checks on rendered objects: the official Kubernetes schemas, the "restricted" Pod Security
Standard, and that no credential travels as a plain value.

Schemas: PyPI ``kubernetes-validate`` (the OpenAPI schemas of each Kubernetes release, in strict
mode: unknown fields are errors). Pod Security: the rules of the "restricted" profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), baseline rules included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from weightship.errors import DeployToolMissingError

Obj = dict[str, Any]

# Volume types the restricted profile admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
CREDENTIAL_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.I)
CREDENTIAL_ARG = re.compile(r"^--(api-key|token|password|secret)(=|$)")


@dataclass(frozen=True)
class Violation:
    """One broken rule: which object, which container (if any), which rule, why."""

    obj: str  # Kind/name
    rule: str
    detail: str
    container: str | None = None

    def __str__(self) -> str:
        where = f"{self.obj}" + (f" container {self.container}" if self.container else "")
        return f"{where}: {self.rule}: {self.detail}"


def object_name(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---- schemas ---------------------------------------------------------------------------------


def schema_problems(objects: Iterable[Obj], versions: Iterable[str]) -> tuple[list[str], list[str]]:
    """(problems, skipped): objects that fail a version's strict schema, and the kinds that no
    official schema covers (custom resources such as ServiceMonitor)."""
    try:
        import kubernetes_validate
    except ImportError:
        raise DeployToolMissingError("kubernetes-validate") from None
    problems: list[str] = []
    skipped: set[str] = set()
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                skipped.add(f"{obj.get('apiVersion')} {obj.get('kind')}")
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{object_name(obj)} (Kubernetes {version}) at {path or '/'}: "
                                f"{e.message}")
    return problems, sorted(skipped)


# ---- pod security ----------------------------------------------------------------------------


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec inside a workload (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob)."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec", {}).get("template") or {}).get("spec")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return (spec.get("template") or {}).get("spec")
    return None


def _containers(spec: Obj) -> Iterator[Obj]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def restricted_violations(obj: Obj) -> list[Violation]:
    """Every rule of the "restricted" Pod Security Standard that ``obj``'s pods break: the pod's
    own rules first, then each container's."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    name = object_name(obj)
    pod_sc = spec.get("securityContext") or {}
    out = [Violation(name, rule, detail) for rule, detail in _pod_breaks(spec, pod_sc)]
    for c in _containers(spec):
        out += [Violation(name, rule, detail, c.get("name")) for rule, detail in _container_breaks(c, pod_sc)]
    return out


def _pod_breaks(spec: Obj, pod_sc: Obj) -> Iterator[tuple[str, str]]:
    """(rule, detail) for each pod-level rule ``spec`` breaks: host namespaces, volume types,
    sysctls, running as root."""
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            yield "host namespaces", f"{field}=true"
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            yield "hostPath volumes", f"volume {volume['name']} mounts {volume['hostPath'].get('path')}"
        elif not kinds <= RESTRICTED_VOLUMES:
            yield "volume types", f"volume {volume['name']} is {', '.join(sorted(kinds))}"
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield "sysctls", f"{sysctl.get('name')} is not a safe sysctl"
    if pod_sc.get("runAsUser") == 0:
        yield "running as non-root user", "pod runAsUser=0"


def _container_breaks(c: Obj, pod_sc: Obj) -> Iterator[tuple[str, str]]:
    """(rule, detail) for each rule container ``c`` breaks; its own securityContext wins over the
    pod's ``pod_sc`` where both may say it."""
    sc = c.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    if sc.get("privileged"):
        yield "privileged containers", "privileged=true"
    if sc.get("allowPrivilegeEscalation") is not False:
        yield "privilege escalation", "allowPrivilegeEscalation must be false"
    if "ALL" not in (caps.get("drop") or []):
        yield "capabilities", "must drop ALL"
    added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
    if added:
        yield "capabilities", f"adds {', '.join(sorted(added))}"
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        yield "running as non-root", "runAsNonRoot must be true"
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        yield "running as non-root user", "runAsUser=0"
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        yield "seccomp", f"seccompProfile.type is {seccomp or 'unset'}"
    for port in c.get("ports") or []:
        if port.get("hostPort"):
            yield "host ports", f"hostPort {port['hostPort']}"
    if sc.get("procMount", "Default") != "Default":
        yield "/proc mount type", f"procMount={sc['procMount']}"


# ---- credentials -----------------------------------------------------------------------------


def plain_credentials(obj: Obj) -> list[Violation]:
    """Credentials given as plain values: env vars with credential-like names and a ``value``,
    and secret-carrying command-line flags."""
    out: list[Violation] = []
    spec = pod_spec(obj)
    if spec is not None:
        for c in _containers(spec):
            for env in c.get("env") or []:
                if "value" in env and CREDENTIAL_NAME.search(env.get("name", "")):
                    out.append(Violation(object_name(obj), "plain credential",
                                         f"env {env['name']} has a plain value", c.get("name")))
            for arg in [*(c.get("command") or []), *(c.get("args") or [])]:
                if CREDENTIAL_ARG.match(str(arg)):
                    out.append(Violation(object_name(obj), "plain credential",
                                         f"argument {arg!r} passes a secret on the command line",
                                         c.get("name")))
    if obj.get("kind") == "ConfigMap":
        for key in obj.get("data") or {}:
            if CREDENTIAL_NAME.search(key):
                out.append(Violation(object_name(obj), "plain credential",
                                     f"ConfigMap key {key} looks like a credential"))
    return out
