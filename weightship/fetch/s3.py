"""The ``s3`` source: a model directory stored under an S3 prefix (AWS or any S3 server).

``s3://bucket/prefix``, or a card source ``{kind: s3, uri: s3://bucket/prefix}``. boto3 finds
the credentials and the endpoint as it always does (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
``AWS_REGION``, the credential chain). An object's ETag is never used as a digest: every file's
sha256 comes from a manifest (``--manifest FILE``, the card, or ``PREFIX/.weightship/manifest.json``
as written by ``weightship push``, signed with ``push --key``; see :mod:`weightship.fetch.ranged`
for which of them is an anchor, and when), and weightship's own sha256 is enforced whatever
checksum mode the server offers. The manifest and its signature are read whole, at most 64 MiB,
retried like any other request. Objects are read through the shared downloader (one GET for a
small object, ranged GETs pinned to the ETag seen at the start, ``If-Match``, for a large one):
the engine's own urllib3 pool, and the same checks of every reply, as the Hub and HTTPS sources.

Lean requests (issue 22): a fetch of 2,000 small objects spent about half of its Python time in
botocore's ``generate_presigned_url`` (154 µs a call here: endpoint rules, serializers, events,
the SigV4 key derived anew) and in urllib3 parsing the 300-byte presigned URLs. So botocore is
asked once per fetch: one presigned URL tells where its configuration sends a GET (endpoint,
addressing style, region; ``AWS_ENDPOINT_URL``, profiles, the credential chain all as boto3 reads
them) and what it signs with (SigV4, its scope); each object's GET is then signed in headers as
botocore's ``S3SigV4Auth`` signs ``get_object`` (the same canonical request, a test compares the
two), with the signing key derived once a day and the credentials taken from the client each
time (refreshed as botocore refreshes them), about 6 µs a request. An S3 GET is never
redirected to another host with those headers: a redirect is an error naming the region. Where
botocore would sign otherwise (SigV4a, S3 Express), every request is presigned by botocore as before.

(Over 400 lines: the source, its request signer and ``push`` share the client, the URI rules and
the error table; ``push`` is the part to move to a module of its own when this one grows.)
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from weightship.errors import (
    AccessDeniedError,
    FetchError,
    RemoteChangedError,
    RemoteNotFoundError,
    TransientFetchError,
    UsageError,
)
from weightship.fetch.base import FetchPlan, PlannedFile
from weightship.fetch.options import TransferOptions
from weightship.fetch.ranged import REMOTE_MANIFEST, REMOTE_SIGNATURE, RangedSource, plan_from_manifest
from weightship.fetch.remote import RangeReader, RemoteStat
from weightship.fetch.retry import with_retries
from weightship.fetch.transport import SMALL_LIMIT, HttpPool, HttpRemote
from weightship.manifest import Manifest, manifest_path
from weightship.paths import resolve_under
from weightship.progress import NullProgress, Progress

_PRESIGN_SECONDS = 3600  # each request is signed when it is sent; this only bounds a replay
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a GET's payload hash, as botocore signs it
_SIGNED = frozenset({"host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token", "authorization"})
_PRESIGN_QUERY = frozenset({"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                            "X-Amz-SignedHeaders", "X-Amz-Security-Token", "X-Amz-Signature"})


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at either end)."""
    if not uri.startswith("s3://"):
        raise UsageError(f"not an S3 URI: {uri!r}", hint="use s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise UsageError(f"no bucket in {uri!r}", hint="use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def make_s3_client(opts: TransferOptions | None = None) -> Any:
    """A botocore S3 client from the usual AWS configuration (boto3's: the same session, config
    files and credential chain), pooled for ``opts``. boto3 itself is not needed to fetch (its
    import costs about 25 ms more): :func:`push_directory` wraps the client in boto3's transfer
    manager for multipart uploads.

    Retries are weightship's (per chunk, resuming); checksums are only sent when an operation
    requires them, because several S3 servers reject the aws-chunked uploads newer botocore
    sends by default, and the sha256 that matters is weightship's own.
    """
    import botocore.session
    from botocore.config import Config

    opts = opts or TransferOptions()
    config = Config(max_pool_connections=opts.connections * opts.parallel_files + 4,
                    retries={"mode": "standard", "total_max_attempts": 2},
                    read_timeout=opts.stall_timeout, connect_timeout=min(30.0, opts.stall_timeout),
                    signature_version="s3v4",
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    session = botocore.session.Session()  # reads the environment and profile anew each time
    session.register_component("data_loader", _service_models())
    return session.create_client("s3", config=config)


@functools.cache
def _service_models() -> Any:
    """botocore's loader of service models, shared: a client then costs about 10 ms instead of
    the 60–250 ms of parsing the S3 model and endpoint rules again."""
    from botocore.loaders import create_loader

    return create_loader()


def s3_error(e: BaseException, where: str) -> BaseException:
    """The weightship error for a boto3/botocore exception."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
        SSLError,
    )

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            return RemoteNotFoundError(where, f"not found ({code})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return AccessDeniedError(where, f"access denied ({code})",
                                     hint="check AWS_PROFILE / the AWS credentials for this bucket")
        if code in ("PreconditionFailed", "412"):
            return RemoteChangedError(f"{where}: the object changed while it was being read")
        if code in ("InvalidRange", "416"):
            return FetchError(f"{where}: the object is shorter than planned")
        if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "InternalError"):
            return TransientFetchError(f"{where}: {code or status}")
        return FetchError(f"{where}: {code}: {err.get('Message', '')}")
    if isinstance(e, NoCredentialsError):
        return AccessDeniedError(where, "no AWS credentials found",
                                 hint="set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(e, SSLError):  # a ConnectionError too, but no retry will fix it
        return FetchError(f"{where}: TLS failed: {e}",
                          hint="set AWS_CA_BUNDLE to the CA bundle that signs the S3 endpoint's certificate")
    if isinstance(e, ConnectionError | ReadTimeoutError | ResponseStreamingError):
        return TransientFetchError(f"{where}: {type(e).__name__}: {e}")
    if isinstance(e, BotoCoreError):
        return FetchError(f"{where}: {e}")
    return e


def make_s3_pool(opts: TransferOptions) -> HttpPool:
    """Connections for reading objects, trusting ``AWS_CA_BUNDLE`` where it is set (as boto3 does)."""
    return HttpPool(opts, ca_certs=os.environ.get("AWS_CA_BUNDLE"))


class ObjectSigner:
    """Signs GETs of one bucket's objects in headers, as botocore's ``S3SigV4Auth`` signs
    ``get_object`` (SigV4, the payload hash of an empty body, no path normalization), with what
    botocore resolved for this client: the URL of an object, the region and service of the scope,
    and the client's credentials (frozen anew for each request, so refreshed ones are used)."""

    def __init__(self, credentials: Any, base: str, region: str, service: str) -> None:
        self.credentials, self.base, self.region, self.service = credentials, base, region, service
        parts = urlsplit(base)
        default = {"http": 80, "https": 443}.get(parts.scheme)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # an IPv6 literal, as botocore and urllib3 write it
        self.host = host if parts.port in (None, default) else f"{host}:{parts.port}"
        self._path = parts.path
        self._keys: dict[tuple[str, str], bytes] = {}

    @classmethod
    def for_bucket(cls, client: Any, bucket: str) -> ObjectSigner | None:
        """The signer for ``bucket``, from one URL presigned by botocore; None where botocore would
        sign in some other way (then each request is presigned by botocore)."""
        probe = "weightship-probe/k"
        try:
            url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": probe},
                                                ExpiresIn=_PRESIGN_SECONDS)
        except Exception as e:
            raise s3_error(e, f"s3://{bucket}") from None
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        scope = query.get("X-Amz-Credential", "").split("/")
        credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        if (credentials is None or not set(query) <= _PRESIGN_QUERY or parts.fragment
                or query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or query.get("X-Amz-SignedHeaders") != "host"
                or len(scope) != 5 or scope[4] != "aws4_request" or not parts.path.endswith("/" + probe)):
            return None
        base = f"{parts.scheme}://{parts.netloc}{parts.path[:-len(probe)]}"
        return cls(credentials, base, region=unquote(scope[2]), service=unquote(scope[3]))

    def url(self, key: str) -> str:
        """The URL of object ``key`` (quoted as botocore quotes it)."""
        return self.base + quote(key, safe="/~")

    def headers(self, url: str, now: datetime.datetime | None = None) -> dict[str, str]:
        """The headers that sign a GET of ``url`` (made by :meth:`url`) at ``now``."""
        frozen = self.credentials.get_frozen_credentials()
        if not frozen or not frozen.access_key or frozen.secret_key is None:
            from botocore.exceptions import NoCredentialsError

            raise NoCredentialsError()
        stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        key = self._keys.get((frozen.secret_key, day))
        if key is None:  # derived once a day (and again when the credentials change)
            key = f"AWS4{frozen.secret_key}".encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {(frozen.secret_key, day): key}
        signed = {"host": self.host, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": stamp}
        if frozen.token:
            signed["x-amz-security-token"] = frozen.token
        names = ";".join(signed)  # already in order
        canonical = "\n".join(["GET", urlsplit(url).path, "",
                               "".join(f"{k}:{v}\n" for k, v in signed.items()), names, _EMPTY_SHA256])
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return {**signed, "authorization": f"AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, "
                                           f"SignedHeaders={names}, Signature={signature}"}


class S3Remote(HttpRemote):
    """One S3 object: size and ETag from HeadObject (a large object only; a small one's size is
    the manifest's), bytes by GETs signed by ``signer`` (else presigned by botocore, each)."""

    def __init__(self, client: Any, pool: HttpPool, bucket: str, key: str,
                 signer: ObjectSigner | None = None) -> None:
        self.client, self.bucket, self.key, self.signer = client, bucket, key, signer
        self._extra: dict[str, str] = {}
        super().__init__(pool, signer.url(key) if signer else "", where=f"s3://{bucket}/{key}",
                         if_match=True, max_redirects=0 if signer else 5)

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the next request: signed afresh for each (SigV4 dates it)."""
        if self.signer is None:
            return self._extra
        try:
            return {**self._extra, **self.signer.headers(self.url)}
        except Exception as e:
            raise s3_error(e, self.where) from None

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._extra = {k: v for k, v in value.items() if k.lower() not in _SIGNED}

    def request_url(self) -> str:
        if self.signer is not None:
            return self.url
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key}, ExpiresIn=_PRESIGN_SECONDS)
        return url

    def check_reply(self, r: Any) -> None:
        if self.signer is not None and 300 <= r.status < 400:  # never carry the signed headers on
            raise FetchError(f"{self.where}: HTTP {r.status}: the S3 server sent the request elsewhere",
                             hint="set AWS_REGION (or the profile's region) to the bucket's region, "
                                  "or AWS_ENDPOINT_URL to its endpoint")

    def stat(self) -> RemoteStat:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            raise s3_error(e, self.where) from None
        self._size = int(head["ContentLength"])
        return RemoteStat(size=self._size, validator=head.get("ETag") or None)


class S3Source(RangedSource):
    """Fetches a model directory from an S3 prefix."""

    kind: ClassVar[str] = "s3"
    _client: Any = None
    _signer: ObjectSigner | None = None
    _probed = False

    @property
    def uri(self) -> str:
        """``s3://bucket/prefix`` of this source."""
        return str(self.spec.get("uri") or (self.request.ref if self.request.card is None else ""))

    @property
    def client(self) -> Any:
        """The botocore client all of this source's downloads share."""
        if self._client is None:
            self._client = make_s3_client(self.transfer_options())
        return self._client

    def make_pool(self) -> HttpPool:
        return make_s3_pool(self.transfer_options())

    def _key(self, path: str) -> str:
        _, prefix = parse_s3_uri(self.uri)
        return f"{prefix}/{path}" if prefix else path

    def _read_small(self, rel: str) -> bytes | None:
        """A small object under the prefix (a manifest, a signature), or None when there is none;
        retried while it fails in a way a retry may fix (not when it is over 64 MiB)."""
        bucket, _ = parse_s3_uri(self.uri)
        where = f"s3://{bucket}/{self._key(rel)}"
        return with_retries(lambda: self._read_small_once(bucket, self._key(rel), where),
                            self.transfer_options(), where)

    def _read_small_once(self, bucket: str, key: str, where: str) -> bytes | None:
        try:
            reply = self.client.get_object(Bucket=bucket, Key=key)
            body = reply["Body"]
            try:
                declared = int(reply.get("ContentLength") or 0)
                if declared > SMALL_LIMIT:
                    raise FetchError(f"{where}: larger than {SMALL_LIMIT} bytes")
                data: bytes = body.read(SMALL_LIMIT + 1)  # whatever the header said
                if len(data) < declared:  # the connection closed early, without an error
                    raise TransientFetchError(f"{where}: body ended at byte {len(data)} of {declared}")
            finally:
                body.close()
        except Exception as e:
            if isinstance(e, FetchError):
                raise
            err = s3_error(e, where)
            if isinstance(err, RemoteNotFoundError):
                return None
            raise err from None
        if len(data) > SMALL_LIMIT:
            raise FetchError(f"{where}: larger than {SMALL_LIMIT} bytes")
        return data

    def plan(self) -> FetchPlan:
        bucket, _ = parse_s3_uri(self.uri)
        secure = str(self.client.meta.endpoint_url or "").startswith("https://")
        return plan_from_manifest(self, uri=self.uri.rstrip("/"), revision=None,
                                  read_remote=self._read_small, secure=secure,
                                  locate=lambda p: f"s3://{bucket}/{self._key(p)}")

    def signer(self) -> ObjectSigner | None:
        """The signer of this fetch's GETs: one presigned URL, once (not locked: two threads
        that race make the same signer)."""
        if not self._probed:
            self._signer = ObjectSigner.for_bucket(self.client, parse_s3_uri(self.uri)[0])
            self._probed = True
        return self._signer

    def remote(self, file: PlannedFile) -> RangeReader:
        bucket, _ = parse_s3_uri(self.uri)
        return S3Remote(self.client, self.pool, bucket, self._key(file.path), self.signer())

    def uri_for(self, file: PlannedFile) -> str:
        bucket, _ = parse_s3_uri(self.uri)
        return f"s3://{bucket}/{self._key(file.path)}"


def push_directory(directory: Path, uri: str, *, progress: Progress | None = None,
                   opts: TransferOptions | None = None, key: Path | None = None) -> Manifest:
    """Upload a verified model directory and its manifest to ``s3://bucket/prefix``.

    The directory is verified first (every file against its manifest), so a bucket is never
    stocked with bytes that do not match the digests that travel with them. With ``key`` the
    manifest is signed first (:func:`weightship.signing.sign_directory`); a signature already
    beside the manifest is uploaded too. Files go first, then the signature, and the manifest
    last, byte for byte as signed: a reader that finds the manifest finds every file it lists
    and its signature. Each object also carries its sha256 as metadata, for people browsing the
    bucket; weightship itself trusts only the manifest.
    """
    from boto3.s3.transfer import S3Transfer, TransferConfig

    from weightship.signing import sign_directory, signature_path
    from weightship.verify import verify_dir

    progress = progress or NullProgress()
    opts = opts or TransferOptions()
    manifest = Manifest.load(directory)
    verify_dir(directory, progress=progress, record=False).raise_for_problems()
    if key is not None:
        sign_directory(directory, key)
    bucket, prefix = parse_s3_uri(uri)
    client = make_s3_client(opts)
    transfer = S3Transfer(client, TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                                 max_concurrency=opts.connections * opts.parallel_files))
    progress.begin("push", total_bytes=manifest.total_bytes, files=len(manifest.files))
    for f in manifest.files:
        obj = f"{prefix}/{f.path}" if prefix else f.path
        progress.file_begin(f.path, f.size)
        try:
            transfer.upload_file(str(resolve_under(directory, f.path)), bucket, obj,
                                 extra_args={"Metadata": {"sha256": f.sha256}},
                                 callback=lambda n, path=f.path: progress.advance(path, n))
        except Exception as e:
            raise _upload_error(e, f"s3://{bucket}/{obj}") from None
        progress.file_end(f.path, "ok")
    body = manifest_path(directory).read_bytes()  # the bytes a signature covers, not a re-dump
    signature = signature_path(directory)
    uploads = [(REMOTE_MANIFEST, body, "application/json")]
    if signature.is_file():
        uploads.insert(0, (REMOTE_SIGNATURE, signature.read_bytes(), "application/json"))
    for rel, data, kind in uploads:
        obj = f"{prefix}/{rel}" if prefix else rel
        try:
            client.put_object(Bucket=bucket, Key=obj, ContentType=kind, Body=data)
        except Exception as e:
            raise s3_error(e, f"s3://{bucket}/{obj}") from None
    progress.end()
    return manifest


def _upload_error(e: BaseException, where: str) -> BaseException:
    from boto3.exceptions import S3UploadFailedError

    if isinstance(e, S3UploadFailedError):
        cause = e.__context__ or e.__cause__
        if cause is not None:
            return s3_error(cause, where)
        return FetchError(f"{where}: upload failed: {e}")
    return s3_error(e, where)
