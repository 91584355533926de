"""Every error weightship raises, in one place.

Each error subclasses :class:`WeightshipError` and a built-in that says what kind of failure it
is, carries the context a person needs (a path, a URI, a digest), an optional ``hint`` they can
act on, an ``exit_code`` (DESIGN.md: 1 error, 2 usage, 3 integrity), and ``retryable``: whether
trying the same thing again can help.

Why one module past the ~400 lines STYLE.md asks of a module: it is a table, not logic. Each
class is a docstring, its built-in base, its context attributes and a message; the sections
below (usage, integrity, fetching, runtime, deploy, ...) are read together when an exit code,
a hint or ``retryable`` is reviewed, and one area's errors subclass another's (a peer's failure
is a ``TransientFetchError``, an inventory error a ``UsageError``). STYLE.md's anchor,
huggingface_hub's ``errors.py``, keeps every exception in one sectioned module for the same reasons.
"""

from __future__ import annotations

from pathlib import Path


class WeightshipError(Exception):
    """Base of every error weightship raises on purpose."""

    exit_code = 1
    retryable = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


# ---- usage (exit 2) ---------------------------------------------------------------------------


class UsageError(WeightshipError, ValueError):
    """The command line or its arguments do not make sense."""

    exit_code = 2


class UnknownModelError(UsageError, LookupError):
    """A model name is not in the catalog and is not a URI either."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown model {name!r}",
            hint="known models: " + ", ".join(known) + " (or give a URI: hf://, s3://, https://, magnet:)",
        )
        self.name = name


class UnknownSourceError(UsageError):
    """No fetch source is registered for a URI scheme, or a card has no such source."""


# ---- configuration and catalog (exit 1) ------------------------------------------------------


class CatalogError(WeightshipError, ValueError):
    """A model card (or a config derived from one) is malformed."""


class UnsupportedGgufError(CatalogError):
    """A well-formed GGUF that weightship does not convert (its architecture, tokenizer or a
    tensor's quantization type); the message names what, the hint what is supported."""


class ManifestError(WeightshipError, ValueError):
    """A manifest is missing, unreadable, or does not follow the schema."""

    def __init__(self, message: str, *, path: Path | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class UnsafePathError(WeightshipError, ValueError):
    """A path from outside (torrent, repo listing, S3 key, manifest) would escape its destination."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"unsafe path {path!r}: {reason}")
        self.path = path
        self.reason = reason


# ---- integrity (exit 3) ----------------------------------------------------------------------


class IntegrityError(WeightshipError):
    """Bytes do not match what a trust anchor says they must be."""

    exit_code = 3


class DigestMismatchError(IntegrityError):
    """A file's size or digest differs from the expected one."""

    def __init__(self, path: str, *, expected: str, actual: str, what: str = "sha256") -> None:
        super().__init__(f"{path}: {what} mismatch (expected {expected}, got {actual})")
        self.path = path
        self.expected = expected
        self.actual = actual


class VerificationFailed(IntegrityError):
    """One or more files of a model directory failed verification."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        names = ", ".join(p for p, _ in problems[:10]) + (" …" if len(problems) > 10 else "")
        super().__init__(f"{len(problems)} file(s) failed verification: {names}")
        self.problems = problems


class MalformedWeightsError(IntegrityError, ValueError):
    """A weights file (safetensors header, pickle) is malformed or hostile."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MalformedGgufError(MalformedWeightsError):
    """A GGUF file whose header or tensor table does not hold up against the file's bytes
    (truncated, out of bounds, overlapping, absurd sizes): refused before its data is read."""


class UntrustedFileError(IntegrityError):
    """A pickle would have to be loaded without a trust anchor having vouched for its bytes."""


class SignatureError(IntegrityError):
    """A signed manifest's signature is missing, malformed, or made by no trusted key."""


# ---- fetching (exit 1) -----------------------------------------------------------------------


class FetchError(WeightshipError, OSError):
    """A download failed."""


class TransientFetchError(FetchError):
    """A download failed in a way that trying again may fix (timeouts, 5xx, resets)."""

    retryable = True


class LockedError(FetchError):
    """Another process holds the lock on a destination directory."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(
            f"{path} is being written by another weightship process ({holder})",
            hint="wait for it to finish, or remove the lock file if that process is gone",
        )
        self.path = path


class DiskSpaceError(FetchError):
    """Not enough free space at the destination."""

    def __init__(self, path: Path, needed: int, free: int, headroom: int = 0) -> None:
        extra = f" plus {headroom >> 20} MiB headroom" if headroom else ""
        super().__init__(
            f"not enough space in {path}: need {needed:,} bytes{extra}, {free:,} free",
            hint="free some space or choose another --to",
        )
        self.path = path
        self.needed = needed
        self.free = free
        self.headroom = headroom
        # what `--json` adds to its error object
        self.details = {"needed_bytes": needed, "headroom_bytes": headroom, "free_bytes": free}


class DiskFullError(FetchError):
    """The disk filled up (or a file-size limit was hit) while writing; the partial is kept."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"no space left while writing {path}: {reason}",
                         hint="free some space and run the same command again: it resumes "
                              "where it stopped")
        self.path = path


class RemoteNotFoundError(FetchError, LookupError):
    """A repository, revision, bucket, object or URL does not exist (or is hidden from us)."""

    def __init__(self, where: str, what: str, *, hint: str | None = None) -> None:
        super().__init__(f"{where}: {what}", hint=hint)
        self.where = where  # the URI (or repo@revision) that was not there


class AccessDeniedError(FetchError, PermissionError):
    """The remote refused our credentials, or the repository is gated."""

    def __init__(self, where: str, what: str, *, hint: str | None = None) -> None:
        super().__init__(f"{where}: {what}", hint=hint)
        self.where = where  # the URI (or repo) that refused us


class GatedRepoError(AccessDeniedError):
    """A Hub repository is gated and this token (or no token) has not been granted access.

    It holds for every file of the repository, so a fetch reports it once and stops using
    that source instead of failing file by file.
    """

    def __init__(self, repo: str, detail: str | None = None) -> None:
        FetchError.__init__(self, f"hf://{repo} is gated" + (f" ({detail})" if detail else ""),
                            hint="gated: accept the conditions on the model's page and use a token "
                                 "that has access")
        self.where, self.repo = f"hf://{repo}", repo


class InsecureRedirectError(FetchError):
    """A server redirected an https:// request to plain http://; never followed."""


class ProtocolViolationError(TransientFetchError):
    """A server's reply contradicts the request or itself (wrong Content-Range, short body, …).

    Retryable: a proxy or a flaky server may answer correctly next time; the retry budget keeps
    a server that always lies from looping forever.
    """


class RangeNotSupportedError(FetchError):
    """The server ignored a ranged request (200 instead of 206); the file is fetched whole."""


class RemoteChangedError(FetchError):
    """The remote file changed (ETag or size) while it was being downloaded or between tries."""


class NoTrustAnchorError(FetchError):
    """No digest from a trust anchor is known for the files: refusing to fetch unverifiable bytes."""


class UnsignedManifestError(NoTrustAnchorError):
    """A manifest sent by the same server as the files, unsigned, over plain HTTP: not an anchor."""


class UnsignedListingError(NoTrustAnchorError):
    """A non-public Hub endpoint's file listing over plain HTTP, for files a catalog card does
    not pin by sha256: not an anchor."""


class PackageIndexError(FetchError):
    """``pip download`` could not get a package from the index pip is configured with (no
    network, no such version, an index or proxy error); the message carries pip's own words."""


# ---- torrent -----------------------------------------------------------------------------------


class TorrentError(FetchError):
    """A BitTorrent download, seed or torrent creation failed."""


class TorrentMetadataError(TorrentError, ValueError):
    """A ``.torrent`` file or magnet metadata is malformed, hostile, or over the load limits."""

    def __init__(self, origin: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{origin}: {reason}", hint=hint)
        self.origin = origin
        self.reason = reason


class TorrentStalledError(TorrentError, TimeoutError):
    """No metadata or no payload arrived from any peer for too long; more peers may help."""

    retryable = True


# ---- fleet swarm (peers of a fetch) ------------------------------------------------------------


class SwarmError(FetchError):
    """The fetch's peer swarm cannot start (its listening address) or was misconfigured."""


class PeerError(TransientFetchError):
    """One peer could not give a chunk (gone, stalled, or it no longer has it); another source
    will be asked."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"peer {peer}: {message}")
        self.peer = peer


# ---- runtime (serve) -------------------------------------------------------------------------


class ServeError(WeightshipError):
    """The model server or its engine cannot do what was asked."""


class InvalidRequestError(ServeError, ValueError):
    """An API request that must be refused (HTTP 400): bad parameters, a prompt too long, …"""

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class EngineOverloadedError(ServeError):
    """The engine's queue is full (HTTP 429); trying again after ``retry_after`` seconds can help."""

    retryable = True

    def __init__(self, queued: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is busy: {queued} requests are waiting",
                         hint=f"retry after {retry_after} s")
        self.queued = queued
        self.retry_after = retry_after


class EngineStoppedError(ServeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""

    retryable = True


class ModelNotServedError(ServeError, LookupError):
    """A request names a model this server does not serve (HTTP 404)."""

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"model {requested!a} does not exist; this server serves {served!a}")
        self.requested = requested
        self.served = served


class ServerStartError(WeightshipError, RuntimeError):
    """A server run on a thread (tests, demos, benchmarks) did not start listening."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"the {name} server did not start: {why}")
        self.name = name


# ---- deploy (Kubernetes) ---------------------------------------------------------------------


class DeployError(WeightshipError):
    """A deployment could not be rendered, checked or carried out."""


class DeployToolMissingError(DeployError, ImportError):
    """A package the Kubernetes deployer needs (helm-python-sdk, kubernetes, …) is not installed."""

    def __init__(self, package: str) -> None:
        super().__init__(f"{package} is not installed",
                         hint="install the deploy extra: pip install 'weightship[deploy]'")
        self.package = package


class InvalidValuesError(UsageError):
    """Chart values contradict each other or the chart's values.schema.json."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid chart values: " + "; ".join(problems),
                         hint="fix the -f/--set values named above (see docs/kubernetes.md)")
        self.problems = problems


class RenderedObjectsRejectedError(DeployError, ValueError):
    """A rendered object fails the Kubernetes schemas or the chart's security policy."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} rendered object problem(s): " + "; ".join(problems[:5])
                         + (" …" if len(problems) > 5 else ""))
        self.problems = problems


class ClusterUnreachableError(DeployError, ConnectionError):
    """The Kubernetes API server could not be reached or refused the credentials."""

    retryable = True


class PreflightError(DeployError):
    """The cluster lacks something the release needs (namespace, GPUs, storage, Secrets)."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(f"{len(failures)} preflight check(s) failed: " + "; ".join(failures),
                         hint="fix the cluster or the values, then run the command again")
        self.failures = failures


class ReleaseError(DeployError):
    """Helm could not install, upgrade, roll back or remove a release."""


class ReleaseNotFoundError(ReleaseError, LookupError):
    """No release of that name exists in the namespace."""

    def __init__(self, name: str, namespace: str) -> None:
        super().__init__(f"no release {name!r} in namespace {namespace!r}",
                         hint="list releases with: helm list -n " + namespace)
        self.name = name
        self.namespace = namespace


class RolloutTimeoutError(ReleaseError, TimeoutError):
    """The release's objects did not become ready in time; waiting longer may help."""

    retryable = True


# ---- deploy (on-prem nodes over SSH) ----------------------------------------------------------


class InventoryError(UsageError):
    """The nodes inventory is malformed; ``line`` is where, when known."""

    def __init__(self, path: str, message: str, *, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}",
                         hint="see `weightship deploy nodes --help` and the README's inventory example")
        self.path = path
        self.line = line


class HostKeyError(DeployError, ConnectionError):
    """A node's SSH host key is not the one pinned for it: nothing was sent to it."""

    def __init__(self, host: str, message: str, *, hint: str) -> None:
        super().__init__(f"{host}: {message}", hint=hint)
        self.host = host


class HostKeyUnknownError(HostKeyError):
    """No key is pinned for the node yet (``weightship nodes trust`` pins one)."""

    def __init__(self, host: str, presented: str, inventory: str) -> None:
        super().__init__(host, f"unknown host key {presented}; refusing to connect",
                         hint=f"check the fingerprint on the node (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
                              f"then: weightship nodes trust {host} --inventory {inventory}")
        self.presented = presented


class HostKeyChangedError(HostKeyError):
    """The node presents a different key than the pinned one: a reinstall, or an impostor."""

    def __init__(self, host: str, pinned: list[str], presented: str) -> None:
        super().__init__(host, f"HOST KEY CHANGED: pinned {', '.join(pinned)}, presented {presented}; "
                               "refusing to connect",
                         hint="if the node was reinstalled, remove its line from known_hosts and trust it again; "
                              "otherwise someone may be impersonating it")
        self.pinned = pinned
        self.presented = presented


class NodesPreflightError(PreflightError):
    """Hosts lack something the deployment needs (systemd, Python, disk, GPUs, the port)."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(failures)
        self.hint = "fix the hosts named above (nothing was changed on any host), then run the command again"


class NodeUnreachableError(DeployError, ConnectionError):
    """A node could not be reached (or stopped answering): its state is unknown, not dead."""

    retryable = True

    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"{host}: unreachable ({why})",
                         hint="nothing was stopped because of it; check the network and sshd, then run again")
        self.host = host
        self.why = why


class NodeCommandError(DeployError):
    """A step on a node failed; ``step`` names it, ``detail`` is what the node said."""

    def __init__(self, host: str, step: str, detail: str) -> None:
        super().__init__(f"{host}: {step} failed: {detail}")
        self.host = host
        self.step = step
        self.detail = detail
        self.why = f"{step} failed: {detail}"


class NodeLockedError(DeployError):
    """Another rollout holds the node's lock."""

    retryable = True

    def __init__(self, host: str) -> None:
        super().__init__(f"{host}: another weightship rollout holds this node's lock",
                         hint="wait for it to finish (a killed deployer's lock goes with its SSH connection)")
        self.host = host
        self.why = "another weightship rollout holds this node's lock"


class RolloutFailedError(DeployError):
    """A rollout stopped: some hosts failed their step or gate, or could not be reached."""

    def __init__(self, failed: list[str], results: list[dict[str, object]]) -> None:
        super().__init__(f"rollout stopped: {', '.join(failed)} failed",
                         hint="the table says why for each host: one that failed its gate is back on its "
                              "previous release, one that could not be reached was left as it was")
        self.failed = failed
        self.results = results


# ---- dedicated instances -------------------------------------------------------------------


class KeyFileError(UsageError):
    """An API key file is malformed (``where`` names it)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}",
                         hint="a key file is one key per line, or a weightship-api-keys/1 JSON "
                              "document (written by `weightship instance keys`)")
        self.where = where


class ClusterConflictError(DeployError):
    """The Kubernetes API refused a write: the object changed meanwhile, or already exists."""

    retryable = True


class InstanceError(DeployError):
    """An instance could not be created, changed, read or removed."""


class InvalidInstanceNameError(UsageError):
    """An instance name is not a DNS label short enough for its objects' names."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"invalid instance name {name!r}: {why}",
                         hint="use lowercase letters, digits and '-', starting with a letter, at "
                              "most 40 characters (it becomes the namespace wsi-NAME)")
        self.name = name


class InstanceNotFoundError(InstanceError, LookupError):
    """No instance of that name exists on the target."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"no instance {name!r} {where}",
                         hint="list instances with: weightship instance list")
        self.name = name


class InstanceExistsError(InstanceError):
    """An instance of that name already exists."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"instance {name!r} already exists {where}",
                         hint=f"change it with instance scale/upgrade, or remove it: "
                              f"weightship instance delete {name} --yes")
        self.name = name


class KeyNameTakenError(UsageError):
    """An instance already has a key of that name."""

    def __init__(self, instance: str, key_name: str) -> None:
        super().__init__(f"instance {instance!r} already has a key named {key_name!r}",
                         hint=f"pick another --key-name, or revoke it first: weightship instance "
                              f"keys revoke {instance} {key_name}")


class KeyNotFoundError(UsageError, LookupError):
    """An instance has no key of that name."""

    def __init__(self, instance: str, key_name: str) -> None:
        super().__init__(f"instance {instance!r} has no key named {key_name!r}",
                         hint=f"see its keys: weightship instance keys list {instance}")


class UpgradeRolledBackError(InstanceError):
    """A change (upgrade, scale, resume) failed its health gate; the instance was returned to
    its previous version."""

    def __init__(self, name: str, action: str, why: str, revision: object) -> None:
        super().__init__(f"instance {name!r}: {action} failed ({why}); rolled back to the "
                         f"previous version (revision {revision})",
                         hint="see what failed with: weightship instance show " + name)
        self.name = name
        self.action = action


class InstanceLeftoversError(InstanceError):
    """``instance delete`` finished but found objects of the instance still there."""

    def __init__(self, name: str, leftovers: list[str]) -> None:
        super().__init__(f"instance {name!r} was deleted but these remain: {', '.join(leftovers)}",
                         hint="run the delete again, or remove them by hand")
        self.name = name
        self.leftovers = leftovers


class InstanceRecordError(InstanceError, ValueError):
    """A namespace annotation that holds an instance's record does not parse (edited by hand)."""

    def __init__(self, namespace: str, field: str, why: str) -> None:
        super().__init__(f"namespace {namespace}: annotation weightship.io/{field} {why}",
                         hint="the weightship.io/* annotations hold what the instance was created "
                              "with; restore the value (kubectl annotate --overwrite namespace "
                              f"{namespace} weightship.io/{field}=…)")
        self.namespace = namespace
        self.field = field


class KeysNotLoadedError(InstanceError):
    """``instance keys`` stored the new key file, but some servers did not report loading it
    in time (they still accept the keys of the previous file)."""

    retryable = True

    def __init__(self, name: str, servers: list[str], waited: float, *, namespace: str) -> None:
        super().__init__(f"the keys of instance {name!r} were stored, but {', '.join(servers)} "
                         f"still served the previous keys after {waited:g} s",
                         hint="the kubelet updates a Secret volume within about a minute; to be "
                              f"sure now, restart them: kubectl -n {namespace} delete pod "
                              + " ".join(s.removeprefix("pod ") for s in servers))
        self.name = name
        self.servers = servers
        self.result: dict[str, object] | None = None  # what the command did (a new key, once)


class UsageIncompleteError(InstanceError):
    """``instance usage`` could not read the records of every replica or host."""

    def __init__(self, name: str, unreached: list[str]) -> None:
        super().__init__(f"could not read the usage records of instance {name!r} from: "
                         + "; ".join(unreached),
                         hint="a paused or scaled-down replica keeps its records on its claim: "
                              "resume or scale up the instance, or pass --partial for the sums of "
                              "what was read")
        self.name = name
        self.unreached = unreached


class UsageRecordError(InstanceError, ValueError):
    """A usage record read from a server holds a value that is not what a record holds."""

    def __init__(self, record_id: object, field: str, value: object) -> None:
        super().__init__(f"usage record {record_id!r}: {field} is not a whole number: {value!r}",
                         hint="the usage log was changed by something other than weightship serve")
        self.record_id = record_id
        self.field = field
