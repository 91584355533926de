"""A connection to a Kubernetes cluster, found the way kubectl finds it: ``KUBECONFIG`` (or
``~/.kube/config``) and its current or named context, else the in-cluster service account."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from weightship.errors import (
    ClusterConflictError,
    ClusterUnreachableError,
    DeployError,
    DeployToolMissingError,
)

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    """An API client for one cluster, with the few raw calls the deployer makes."""

    api: Any  # kubernetes.client.ApiClient
    context: str | None = None

    def get(self, path: str, *, query: dict[str, str] | None = None) -> dict[str, Any] | None:
        """GET ``path`` as JSON; ``None`` when the API answers 404."""
        status, data = self.request("GET", path, query=query)
        if status == 404:
            return None
        if not 200 <= status <= 299:
            raise _status_error(status, data, "GET", path)
        parsed = json.loads(data) if data else None
        return parsed if isinstance(parsed, dict) else None

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json", query: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, timeout: float | None = None,
                ) -> tuple[int, bytes]:
        """One API call: (HTTP status, raw body). Only a network failure raises
        (:class:`ClusterUnreachableError`); every status is the caller's to judge."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        header_params = {"Accept": "application/json", **(headers or {})}
        if body is not None:
            header_params["Content-Type"] = content_type
        try:
            return self._call(method, path, body, header_params, list((query or {}).items()),
                              timeout)
        except ApiException as e:
            return int(e.status or 0), (e.body or b"") if isinstance(e.body, bytes) else str(
                e.body or "").encode()
        except HTTPError as e:
            raise ClusterUnreachableError(f"cannot reach the Kubernetes API: {e}",
                                          hint="check KUBECONFIG / --context") from None

    @contextlib.contextmanager
    def stream(self, path: str, *, headers: dict[str, str] | None = None,
               query: dict[str, str] | None = None, timeout: float | None = None,
               ) -> Iterator[tuple[int, Iterator[bytes]]]:
        """GET ``path`` with its body read a piece at a time, as it arrives: (HTTP status, the
        pieces). A network failure, also midway, raises :class:`ClusterUnreachableError`."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        header_params = {"Accept": "application/json", **(headers or {})}
        params = list((query or {}).items())
        try:
            if hasattr(self.api, "param_serialize"):  # kubernetes >= 37 (see _call)
                method_, url, headers_, body_, post = self.api.param_serialize(
                    method="GET", resource_path=path, query_params=params,
                    header_params=header_params, auth_settings=["BearerToken"])
                raw = self.api.call_api(method_, url, header_params=headers_, body=body_,
                                        post_params=post, _request_timeout=timeout).response
            else:
                raw = self.api.call_api(path, "GET", query_params=params,
                                        header_params=header_params, auth_settings=["BearerToken"],
                                        _return_http_data_only=True, _preload_content=False,
                                        _request_timeout=timeout)
        except ApiException as e:
            yield int(e.status or 0), iter(())
            return
        except HTTPError as e:
            raise ClusterUnreachableError(f"cannot reach the Kubernetes API: {e}",
                                          hint="check KUBECONFIG / --context") from None

        def pieces() -> Iterator[bytes]:
            try:
                yield from raw.stream(1 << 16)
            except HTTPError as e:
                raise ClusterUnreachableError(f"GET {path} was cut short: {e}") from None

        try:
            yield int(raw.status), pieces()
        finally:
            raw.release_conn()

    def _call(self, method: str, path: str, body: Any, headers: dict[str, str],
              query: list[tuple[str, str]], timeout: float | None) -> tuple[int, bytes]:
        # kubernetes >= 37 generates its client with param_serialize/call_api(method, url);
        # older releases take call_api(path, method, ...). Both are supported; the body is
        # read raw, so neither release's response-type mapping is involved.
        if hasattr(self.api, "param_serialize"):
            method_, url, headers_, body_, post = self.api.param_serialize(
                method=method, resource_path=path, query_params=query, header_params=headers,
                body=body, auth_settings=["BearerToken"])
            response = self.api.call_api(method_, url, header_params=headers_, body=body_,
                                         post_params=post, _request_timeout=timeout)
            response.read()
            return int(response.status), bytes(response.data or b"")
        raw = self.api.call_api(path, method, query_params=query, header_params=headers,
                                body=body, auth_settings=["BearerToken"],
                                _return_http_data_only=True, _preload_content=False,
                                _request_timeout=timeout)
        return int(raw.status), bytes(raw.data or b"")

    def write(self, method: str, path: str, body: Any = None, *,
              content_type: str = "application/json", query: dict[str, str] | None = None,
              missing_ok: bool = False) -> dict[str, Any] | None:
        """A call that changes something; its answer as JSON. A 404 is ``None`` when
        ``missing_ok``; any other failure raises (409 as :class:`ClusterConflictError`)."""
        status, data = self.request(method, path, body, content_type=content_type, query=query)
        if status == 404 and missing_ok:
            return None
        if status == 409:
            raise ClusterConflictError(_message(data) or f"{method} {path}: conflict")
        if not 200 <= status <= 299:
            raise _status_error(status, data, method, path)
        parsed = json.loads(data) if data else None
        return parsed if isinstance(parsed, dict) else None

    def apply(self, obj: dict[str, Any], *, manager: str = "weightship") -> dict[str, Any] | None:
        """Server-side apply ``obj`` (created if missing), as ``kubectl apply --server-side``."""
        path = object_path(obj)
        return self.write("PATCH", path, obj, content_type="application/apply-patch+yaml",
                          query={"fieldManager": manager, "force": "true"})

    def delete(self, path: str) -> bool:
        """DELETE ``path`` (background propagation); whether it existed."""
        return self.write("DELETE", path, {"propagationPolicy": "Background"},
                          missing_ok=True) is not None

    def items(self, path: str, *, selector: str | None = None) -> list[dict[str, Any]]:
        """The items of a list path (empty when the resource is not served), only those whose
        labels match ``selector`` when one is given."""
        data = self.get(path, query={"labelSelector": selector} if selector else None)
        return list((data or {}).get("items") or [])

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves ``kind`` in ``api_version`` (discovery)."""
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        data = self.get(path) or {}
        return any(r.get("kind") == kind and "/" not in r.get("name", "")
                   for r in data.get("resources") or [])


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message") or "")
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")


def _status_error(status: int, data: bytes, method: str, path: str) -> Exception:
    if status in (401, 403):
        return ClusterUnreachableError(
            f"the Kubernetes API refused {method} {path} ({status}: {_message(data)})",
            hint="check the credentials (and RBAC permissions) of your kubeconfig context")
    if status >= 500 or status == 0:
        return ClusterUnreachableError(f"{method} {path} failed: {status} {_message(data)}")
    return DeployError(f"{method} {path} failed: {status} {_message(data)}")


# Where each kind the instances write lives in the API: (api prefix, plural, namespaced).
PATHS = {
    ("v1", "Namespace"): ("namespaces", False), ("v1", "Node"): ("nodes", False),
    ("v1", "Secret"): ("secrets", True), ("v1", "ResourceQuota"): ("resourcequotas", True),
    ("v1", "LimitRange"): ("limitranges", True), ("v1", "Pod"): ("pods", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
}


def object_path(obj: dict[str, Any]) -> str:
    """The API path of ``obj`` (one of the kinds in :data:`PATHS`)."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    plural, namespaced = PATHS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    meta = obj["metadata"]
    if namespaced:
        return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"
    return f"{prefix}/{plural}/{meta['name']}"


def connect(context: str | None = None) -> Cluster:
    """A :class:`Cluster` for ``context`` (default: the kubeconfig's current context)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise DeployToolMissingError("kubernetes") from None
    configuration = client.Configuration()
    # The client reads KUBECONFIG once, at import; read it now, as kubectl would.
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=configuration)
    except (config.ConfigException, OSError) as kube_error:
        if context:
            raise ClusterUnreachableError(f"kubeconfig context {context!r}: {kube_error}") from None
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise ClusterUnreachableError(
                "no Kubernetes configuration found",
                hint="set KUBECONFIG (or create ~/.kube/config), or run inside a cluster") from None
    configuration.retries = 1
    cluster = Cluster(client.ApiClient(configuration), context)
    if cluster.get("/version") is None:
        raise ClusterUnreachableError(f"{configuration.host} does not look like a Kubernetes API")
    log.debug("connected to %s", configuration.host)
    return cluster
