"""A fake Kubernetes API server on loopback: the one mock in this project's tests.

No real API server can run on these machines (no container engine, no server binaries in any
registry), so the live path of ``weightship deploy k8s`` — Helm's own Go client inside
helm-python-sdk and the official ``kubernetes`` Python client — is driven against this server.
It speaks the real wire protocol, generic over resource kinds (``fakekube_store.Store``):

- discovery: ``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/GROUP/VERSION`` (kinds added
  by CustomResourceDefinitions appear there too);
- create / get / list (label and field selectors) / replace / patch (merge, JSON, strategic
  merge, server-side apply) / delete, for any kind, namespaced or not, and ``/status``;
- watch (chunked event streams, including ``sendInitialEvents``);
- status that becomes ready ``ready_delay`` seconds after a spec change, by the kind's rule;
- bearer-token authentication when a token is set;
- the ``proxy`` subresource of Pods (``pods/NAME[:PORT]/proxy/PATH``), forwarded over HTTP to
  the pod's ``status.podIP`` and the port (default: its first container port), with the
  ``Authorization`` header dropped as the real API server drops it once it has authenticated.

Nothing in here knows about weightship or about any test.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fakekube_proto
import yaml
from fakekube_store import ApiError, Kind, Obj, Store, matches_fields, matches_selector

VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64",
           "goVersion": "go1.24.0", "compiler": "gc", "buildDate": "2026-01-01T00:00:00Z",
           "gitCommit": "0" * 40, "gitTreeState": "clean"}
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


class FakeKube:
    """The server: ``url`` to reach it, ``store`` to seed or inspect objects directly."""

    def __init__(self, *, token: str | None = None, ready_delay: float = 0.3) -> None:
        self.store = Store(ready_delay=ready_delay)
        self.token = token
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._stop = threading.Event()
        self._started = False
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._controllers, daemon=True)]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKube:
        self._started = True
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.store.cond:
            self.store.cond.notify_all()
        if self._started:
            self._server.shutdown()
            for t in self._threads:
                t.join(timeout=5)
        self._server.server_close()

    def _controllers(self) -> None:
        while not self._stop.wait(0.05):
            self.store.reconcile()

    # -- helpers for fixtures: act like an administrator who set the cluster up ---------------

    def seed(self, obj: Obj) -> Obj:
        """Create ``obj`` (its kind found by apiVersion/kind), status included."""
        kind = self.store.kind_of(obj["apiVersion"], obj["kind"])
        created = self.store.create(kind, obj.get("metadata", {}).get("namespace", ""), obj)
        if "status" in obj:
            created = self.store.replace(kind, created["metadata"].get("namespace", ""),
                                         created["metadata"]["name"], obj, status_only=True,
                                         rv_check=False)
        return created

    def objects(self, api_version: str, kind_name: str, namespace: str | None = None) -> list[Obj]:
        """Every stored object of a kind (in ``namespace`` when given)."""
        return self.store.list(self.store.kind_of(api_version, kind_name), namespace)[0]

    def kubeconfig(self, namespace: str = "default") -> str:
        """A kubeconfig document that points kubectl-style clients at this server."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
        })


@contextmanager
def running(**kwargs: Any) -> Iterator[FakeKube]:
    """A started server, stopped on exit."""
    fake = FakeKube(**kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()


# ---- HTTP ------------------------------------------------------------------------------------


def _discovery_list(store: Store, group: str, version: str) -> Obj:
    resources = []
    for kind in store.kinds.values():
        if (kind.group, kind.version) != (group, version):
            continue
        resources.append({"name": kind.plural, "singularName": kind.kind.lower(),
                          "namespaced": kind.namespaced, "kind": kind.kind, "verbs": VERBS})
        for sub in kind.subresources:
            resources.append({"name": f"{kind.plural}/{sub}", "singularName": "",
                              "namespaced": kind.namespaced, "kind": kind.kind,
                              "verbs": ["get", "patch", "update"]})
    if not resources:
        raise ApiError(404, "NotFound", f"no API group version {group}/{version}")
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def _groups(store: Store) -> Obj:
    groups: dict[str, list[str]] = {}
    for kind in store.kinds.values():
        if kind.group and kind.version not in groups.setdefault(kind.group, []):
            groups[kind.group].append(kind.version)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
         "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
        for g, vs in sorted(groups.items())]}


def _openapi_root(store: Store) -> Obj:
    gvs = {("api/" if not k.group else f"apis/{k.group}/") + k.version for k in store.kinds.values()}
    return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash=fake"} for gv in sorted(gvs)}}


def _openapi_gv(store: Store, gv: str) -> Obj:
    """A minimal OpenAPI v3 document of one group version: enough for clients to see that each
    kind's PATCH accepts fieldValidation (so they leave schema validation to the server)."""
    paths: Obj = {}
    for k in store.kinds.values():
        if ("api/" if not k.group else f"apis/{k.group}/") + k.version != gv:
            continue
        prefix = f"/{gv}/namespaces/{{namespace}}" if k.namespaced else f"/{gv}"
        gvk = {"group": k.group, "version": k.version, "kind": k.kind}
        params = [{"name": n, "in": "query", "schema": {"type": "string"}}
                  for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
        paths[f"{prefix}/{k.plural}/{{name}}"] = {"patch": {
            "operationId": f"patch{k.kind}", "x-kubernetes-group-version-kind": gvk,
            "parameters": params, "responses": {"200": {"description": "OK"}}}}
    if not paths:
        raise ApiError(404, "NotFound", f"no OpenAPI document for {gv}")
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


def _handler_for(fake: FakeKube) -> type[BaseHTTPRequestHandler]:
    store = fake.store

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        # -- plumbing ---------------------------------------------------------------------

        def _send(self, code: int, body: Obj) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            raw = self._raw_body
            if not raw:
                return {}
            ctype = self.headers.get("Content-Type", "")
            try:
                if "protobuf" in ctype:
                    return fakekube_proto.decode(raw)
                return yaml.safe_load(raw) if "yaml" in ctype else json.loads(raw)
            except fakekube_proto.ProtoError as e:
                raise ApiError(415, "UnsupportedMediaType", str(e)) from None
            except (ValueError, yaml.YAMLError) as e:
                raise ApiError(400, "BadRequest", f"cannot decode body: {e}") from None

        def _dispatch(self, method: str) -> None:
            # Read every body, DELETE's options included, so keep-alive connections stay in step.
            self._raw_body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            store.requests.append((method, self.path))
            try:
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                self._route(method, url.path.rstrip("/"), query)
            except ApiError as e:
                self._send(e.code, e.status())
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        # -- routing ----------------------------------------------------------------------

        def _route(self, method: str, path: str, query: dict[str, str]) -> None:
            parts = path.strip("/").split("/") if path.strip("/") else []
            if path == "/version":
                return self._send(200, VERSION)
            if path == "/api":
                return self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                                        "serverAddressByClientCIDRs": []})
            if path == "/apis":
                return self._send(200, _groups(store))
            if path == "/openapi/v3":
                return self._send(200, _openapi_root(store))
            if parts[:2] == ["openapi", "v3"]:
                return self._send(200, _openapi_gv(store, "/".join(parts[2:])))
            if parts[:1] == ["api"] and len(parts) >= 2:
                group, version, rest = "", parts[1], parts[2:]
            elif parts[:1] == ["apis"] and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            else:
                raise ApiError(404, "NotFound", f"the server could not find {path}")
            if not rest:
                return self._send(200, _discovery_list(store, group, version))
            ns: str | None = None
            if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
                ns, rest = rest[1], rest[2:]
            kind = store.kind(group, version, rest[0])
            name = rest[1] if len(rest) > 1 else None
            if kind.kind == "Pod" and ns is not None and len(rest) >= 3 and rest[2] == "proxy":
                return self._proxy(method, ns, rest[1], "/" + "/".join(rest[3:]))
            sub = rest[2] if len(rest) > 2 else None
            if kind.namespaced and ns is None and name is not None:
                raise ApiError(404, "NotFound", f"{kind.plural} is namespaced")
            self._resource(method, kind, ns, name, sub, query)

        def _resource(self, method: str, kind: Kind, ns: str | None, name: str | None,
                      sub: str | None, query: dict[str, str]) -> None:
            scope = ns or ""
            if name is None:
                if method == "GET" and query.get("watch") in ("true", "1"):
                    return self._watch(kind, ns, query)
                if method == "GET":
                    items, rv = store.list(kind, ns, query.get("labelSelector"),
                                           query.get("fieldSelector"))
                    return self._send(200, {"kind": f"{kind.kind}List",
                                            "apiVersion": kind.api_version,
                                            "metadata": {"resourceVersion": str(rv)},
                                            "items": items})
                if method == "POST":
                    if query.get("dryRun"):
                        return self._send(201, self._body())
                    return self._send(201, store.create(kind, scope, self._body()))
                if method == "DELETE":
                    items, _ = store.list(kind, ns, query.get("labelSelector"))
                    for item in items:
                        store.delete(kind, scope, item["metadata"]["name"])
                    return self._send(200, {"kind": "Status", "status": "Success"})
            elif method == "GET":
                return self._send(200, store.get(kind, scope, name))
            elif method == "PUT":
                return self._send(200, store.replace(kind, scope, name, self._body(),
                                                     status_only=sub == "status"))
            elif method == "PATCH":
                ctype = self.headers.get("Content-Type", "application/merge-patch+json")
                existed = self._exists(kind, scope, name)
                obj = store.patch(kind, scope, name, ctype, self._body(),
                                  manager=query.get("fieldManager", "unknown"),
                                  force=query.get("force") == "true", status_only=sub == "status")
                return self._send(200 if existed else 201, obj)
            elif method == "DELETE":
                return self._send(200, store.delete(kind, scope, name))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

        def _proxy(self, method: str, ns: str, target: str, path: str) -> None:
            name, _, port_text = target.partition(":")
            pod = store.get(store.kind("", "v1", "pods"), ns, name)
            ip = (pod.get("status") or {}).get("podIP")
            ports = [p["containerPort"] for c in pod["spec"].get("containers") or []
                     for p in c.get("ports") or []]
            if not ip or not (port_text or ports):
                raise ApiError(503, "ServiceUnavailable", f"pod {name} has no address or port")
            query = urlsplit(self.path).query
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("authorization", "host", "connection",
                                            "content-length", "transfer-encoding")}
            connection = http.client.HTTPConnection(ip, int(port_text or ports[0]), timeout=30)
            try:
                connection.request(method, path + (f"?{query}" if query else ""),
                                   body=self._raw_body or None, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
            except OSError as e:
                raise ApiError(503, "ServiceUnavailable", f"error trying to reach pod: {e}") from None
            finally:
                connection.close()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.getheader("Content-Type") or "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _exists(self, kind: Kind, ns: str, name: str) -> bool:
            try:
                store.get(kind, ns, name)
                return True
            except ApiError:
                return False

        # -- watch ------------------------------------------------------------------------

        def _chunk(self, event: Obj) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _watch(self, kind: Kind, ns: str | None, query: dict[str, str]) -> None:
            labels, fields = query.get("labelSelector"), query.get("fieldSelector")
            deadline = time.monotonic() + min(float(query.get("timeoutSeconds", 30)), 30.0)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def wanted(obj: Obj) -> bool:
                meta = obj["metadata"]
                return ((ns is None or meta.get("namespace") == ns)
                        and matches_selector(meta.get("labels") or {}, labels)
                        and matches_fields(obj, fields))

            with store.cond:
                since = int(query.get("resourceVersion") or 0)
                initial = query.get("sendInitialEvents") == "true" or since == 0
                position = len(store.events)
                if not initial:
                    position = next((i for i, e in enumerate(store.events) if e.rv > since),
                                    len(store.events))
                snapshot = store.list(kind, ns, labels, fields)[0] if initial else []
                rv = store.last_rv()
            try:
                for obj in snapshot:
                    self._chunk({"type": "ADDED", "object": obj})
                if query.get("sendInitialEvents") == "true":
                    self._chunk({"type": "BOOKMARK", "object": {
                        "kind": kind.kind, "apiVersion": kind.api_version, "metadata": {
                            "resourceVersion": str(rv),
                            "annotations": {"k8s.io/initial-events-end": "true"}}}})
                while time.monotonic() < deadline and not fake._stop.is_set():
                    with store.cond:
                        if position >= len(store.events):
                            store.cond.wait(0.2)
                        events = store.events[position:]
                        position = len(store.events)
                    for e in events:
                        if e.kind == kind and wanted(e.obj):
                            self._chunk({"type": e.type, "object": e.obj})
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler
