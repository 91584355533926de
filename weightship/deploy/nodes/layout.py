"""What a deployment looks like on a node: paths, names, the release and its systemd unit.

Everything lives under one prefix (default ``/opt/weightship``), plus the unit file::

    PREFIX/runtimes/KEY/              a venv with weightship (KEY: digest of the wheelhouse)
    PREFIX/wheelhouse/                wheels copied from the operator's machine
    PREFIX/models/KEY/                a verified model, owned by root, never written again
    PREFIX/apps/NAME/releases/REV/    immutable: release.json, serve.env, model -> models/KEY,
                                      runtime -> runtimes/KEY, the unit, gate.json once the
                                      release passed its gate
    PREFIX/apps/NAME/api-keys         the keys (0600 root), outside the releases: a rollback never
                                      brings back a key that was rotated out
    PREFIX/apps/NAME/current          -> releases/REV, switched atomically (rename)
    PREFIX/apps/NAME/history.json     releases that passed their gate, oldest first
    PREFIX/.lock                      held (flock) by the one rollout working on this node
    /etc/systemd/system/weightship-NAME.service

REV is a digest of everything that defines the release, so applying the same thing twice gives
the same REV and restarts nothing. The unit itself only names ``current``: switching releases is
one rename, and the unit changes only when the GPUs, the user or the hardening do.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import MISSING as MISSING_DEFAULT
from dataclasses import asdict, dataclass, fields

from weightship.errors import UsageError

SERVE_USER_PREFIX = "weightship-"
STOP_TIMEOUT_S = 120  # in-flight requests drain within this after SIGTERM
NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label, as in the inventory
SERVE_ARG = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")  # survives systemd's env-file and word splitting


def check_name(name: str) -> str:
    """``name`` if it can name a deployment (it becomes a path, a unit and a user name)."""
    if not NAME.match(name):
        raise UsageError(f"invalid deployment name {name!r}",
                         hint="a DNS label: 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'")
    return name


def check_serve_args(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` if each one reaches ``weightship serve`` intact through the unit's environment file."""
    for arg in args:
        if not SERVE_ARG.match(arg):
            raise UsageError(f"--serve-arg {arg!r}: only letters, digits and _@%+=:,./- are allowed",
                             hint="write an option and its value as one argument: --serve-arg=--max-batch=32")
    return args


def slug(text: str, limit: int = 40) -> str:
    """``text`` reduced to [a-z0-9-] for a path component."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "model"


def model_key(ref: str, layout: str | None, revision: str | None) -> str:
    """The directory name of a model on a node: readable, and distinct per ref/layout/revision."""
    digest = hashlib.sha256(json.dumps([ref, layout, revision]).encode()).hexdigest()[:10]
    return f"{slug(ref)}-{slug(layout or 'default', 12)}-{digest}"


@dataclass(frozen=True)
class Paths:
    """Where one deployment ``name`` lives on a node under ``prefix``."""

    prefix: str
    name: str

    def __post_init__(self) -> None:
        check_name(self.name)

    @property
    def unit(self) -> str:
        return f"weightship-{self.name}.service"

    @property
    def unit_path(self) -> str:
        return f"/etc/systemd/system/{self.unit}"

    @property
    def user(self) -> str:
        """The service's system user: ``weightship-NAME``, or, past useradd's 32 characters, the
        name's start and a digest of all of it (two long names never share a user)."""
        user = SERVE_USER_PREFIX + self.name
        if len(user) <= 32:
            return user
        return f"{SERVE_USER_PREFIX}{self.name[:14]}-{hashlib.sha256(self.name.encode()).hexdigest()[:6]}"

    @property
    def app(self) -> str:
        return f"{self.prefix}/apps/{self.name}"

    @property
    def releases(self) -> str:
        return f"{self.app}/releases"

    @property
    def current(self) -> str:
        return f"{self.app}/current"

    @property
    def history(self) -> str:
        return f"{self.app}/history.json"

    @property
    def models(self) -> str:
        return f"{self.prefix}/models"

    @property
    def runtimes(self) -> str:
        return f"{self.prefix}/runtimes"

    @property
    def wheelhouse(self) -> str:
        return f"{self.prefix}/wheelhouse"

    @property
    def lock(self) -> str:
        return f"{self.prefix}/.lock"

    def release(self, rev: str) -> str:
        return f"{self.releases}/{rev}"

    @property
    def api_keys(self) -> str:
        """The deployment's key file (0600 root), handed to the service by ``LoadCredential=``."""
        return f"{self.app}/api-keys"

    # A dedicated instance (weightship instance --on nodes) keeps its keys outside the releases:
    @property
    def keys_file(self) -> str:
        """Hashed key file (no secret in it), re-read by the server when it changes."""
        return f"{self.app}/keys.json"

    @property
    def operator_key(self) -> str:
        """The operator's own key (0600 root), what the health gate sends."""
        return f"{self.app}/operator-key"

    @property
    def instance_file(self) -> str:
        """Marks the host as given to the instance NAME."""
        return f"{self.app}/instance.json"

    @property
    def state(self) -> str:
        """The service's only writable directory (StateDirectory=)."""
        return f"/var/lib/weightship/{self.name}"

    @property
    def cache(self) -> str:
        """Compile caches (CacheDirectory=): worth keeping, safe to lose."""
        return f"/var/cache/weightship/{self.name}"

    @property
    def usage_log(self) -> str:
        return f"{self.state}/usage.jsonl"


@dataclass(frozen=True)
class Release:
    """Everything that defines one release of a deployment on one node."""

    name: str
    model_ref: str
    model_key: str
    layout: str | None
    runtime: str  # the venv directory on the node
    runtime_version: str
    port: int
    gpus: tuple[int, ...]  # GPU indices given to the service
    serve_args: tuple[str, ...]  # extra `weightship serve` options
    unit_sha256: str
    key_mode: str = "credential"  # or "instance": Paths.keys_file, reloaded; usage logged

    @property
    def rev(self) -> str:
        """A digest of every field; a field at its default is left out, so adding a field with a
        default in a later version keeps every existing release's name."""
        body = {f.name: getattr(self, f.name) for f in fields(self)
                if f.default is MISSING_DEFAULT or getattr(self, f.name) != f.default}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "rev": self.rev}

    def serve_env(self) -> str:
        """``serve.env``: the options of ``weightship serve``, read by the unit (nothing secret)."""
        args = ["--host", "0.0.0.0", "--port", str(self.port), *self.serve_args]
        if not self.gpus:
            args += ["--device", "cpu"]
        return f"WEIGHTSHIP_SERVE_ARGS={shlex.join(args)}\n"


def render_unit(paths: Paths, *, gpus: tuple[int, ...], key_mode: str = "credential") -> str:
    """The hardened systemd unit that runs the deployment's current release.

    ``key_mode`` "credential": the release's key file reaches the service through
    ``LoadCredential=`` (a copy only it can read; new keys are a new release). "instance": the
    service reads the instance's hashed key file (no secret in it) where it is, so keys added or
    revoked take effect without a restart, and it logs usage to its state directory.
    """
    devices = [f"/dev/nvidia{i}" for i in gpus] + list(NVIDIA_DEVICES) if gpus else []
    if key_mode == "credential":
        # The keys reach the service as a copy in its credentials directory, which only it can read.
        keys = [f"LoadCredential=api-keys:{paths.api_keys}"]
        key_args = "--api-key-file ${CREDENTIALS_DIRECTORY}/api-keys"
    else:
        keys = []
        key_args = f"--api-key-file {paths.keys_file} --usage-log {paths.usage_log}"
    lines = [
        "# Written by weightship deploy nodes; changes here are replaced on the next rollout.",
        "[Unit]",
        f"Description=weightship {paths.name}",
        "After=network-online.target",
        "Wants=network-online.target",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"User={paths.user}",
        f"Group={paths.user}",
        f"EnvironmentFile={paths.current}/serve.env",
        f"Environment=WEIGHTSHIP_HOME={paths.state}",
        "Environment=HOME=/nonexistent",
        # torch.compile's and Triton's caches survive restarts here (not in HOME or PrivateTmp);
        # serve --compile-cache keeps the compiled decode step there too, keyed by GPU and versions.
        f"Environment=XDG_CACHE_HOME={paths.cache} TRITON_CACHE_DIR={paths.cache}/triton "
        f"TORCHINDUCTOR_CACHE_DIR={paths.cache}/inductor",
        "Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID",
        f"Environment=CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))}",
        *keys,
        f"ExecStart={paths.current}/runtime/bin/weightship serve {paths.current}/model "
        f"$WEIGHTSHIP_SERVE_ARGS {key_args} --compile-cache {paths.cache}/compile",
        "Restart=on-failure",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        f"StateDirectory={paths.state.removeprefix('/var/lib/')}",
        f"CacheDirectory={paths.cache.removeprefix('/var/cache/')}",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictNamespaces=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        f"ReadWritePaths={paths.state} {paths.cache}",
        "DevicePolicy=closed",
        *[f"DeviceAllow={d} rw" for d in devices],
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
