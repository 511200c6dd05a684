"""How our programs reach the Kubernetes API: a URL (tests, a proxy), a kubeconfig file, or the
pod's own service account (in-cluster). The kubernetes package is imported only when called:
nothing else needs it."""

from __future__ import annotations

from typing import Any


def api_client(host: str = "", kubeconfig: str = "") -> Any:
    """A kubernetes ApiClient for `host`, else `kubeconfig`, else in-cluster; kubernetes'
    ConfigException when the chosen one cannot be used."""
    from kubernetes import client, config

    if host:
        configuration = client.Configuration()
        configuration.host = host
        return client.ApiClient(configuration)
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()
