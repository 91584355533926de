"""A connection to a Kubernetes cluster, found the way kubectl finds it: ``KUBECONFIG`` (or
``~/.kube/config``) and its current or named context, else the in-cluster service account."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from weightship.errors import ClusterUnreachableError, DeployToolMissingError

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    """An API client for one cluster, with the few raw calls the deployer makes."""

    api: Any  # kubernetes.client.ApiClient
    context: str | None = None

    def get(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` as JSON; ``None`` when the API answers 404."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            data = self._get_json(path)
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, path) from None
        except HTTPError as e:
            raise ClusterUnreachableError(f"cannot reach the Kubernetes API: {e}",
                                          hint="check KUBECONFIG / --context") from None
        return data if isinstance(data, dict) else None

    def _get_json(self, path: str) -> Any:
        # kubernetes >= 37 generates its client with param_serialize/call_api(method, url);
        # older releases take call_api(path, method, ...). Both are supported; the body is
        # read raw and parsed here, so neither release's response-type mapping is involved.
        if hasattr(self.api, "param_serialize"):
            method, url, headers, body, post = self.api.param_serialize(
                method="GET", resource_path=path, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"])
            response = self.api.call_api(method, url, header_params=headers, body=body,
                                         post_params=post)
            response.read()
            if not 200 <= response.status <= 299:
                from kubernetes.client.exceptions import ApiException

                raise ApiException(http_resp=response)
            return json.loads(response.data)
        raw = self.api.call_api(path, "GET", header_params={"Accept": "application/json"},
                                auth_settings=["BearerToken"], _return_http_data_only=True,
                                _preload_content=False)
        return json.loads(raw.data)

    def items(self, path: str) -> list[dict[str, Any]]:
        """The items of a list path (empty when the resource is not served)."""
        data = self.get(path)
        return list((data or {}).get("items") or [])

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves ``kind`` in ``api_version`` (discovery)."""
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        data = self.get(path) or {}
        return any(r.get("kind") == kind and "/" not in r.get("name", "")
                   for r in data.get("resources") or [])


def _api_error(e: Any, path: str) -> Exception:
    if e.status in (401, 403):
        return ClusterUnreachableError(
            f"the Kubernetes API refused GET {path} ({e.status} {e.reason})",
            hint="check the credentials of your kubeconfig context")
    return ClusterUnreachableError(f"GET {path} failed: {e.status} {e.reason}")


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
