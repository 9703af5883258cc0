"""e2e shim for the campaign driver on the e2e's Kubernetes v1.20 server, not part of xrdscale.

kr8s (0.20, which dask-kubernetes' KubeCluster uses) names a resource kind by the
``singularName`` of the API discovery documents. Kubernetes < 1.27 leaves ``singularName`` empty
for built-in resources, so kr8s turns "pods" into a kind "/v1" and KubeCluster.from_name fails
("TypeError: Unexpected type <class 'list'> returned from API" in Service.ready). Clusters of the
versions kr8s supports (1.28+) fill it in; this fills it in the same way (the lowercase kind).
"""

import importlib

try:
    _kr8s_api = importlib.import_module("kr8s._api")  # (kr8s.__init__ shadows the name _api)
except ImportError:  # no kr8s here
    _kr8s_api = None

if _kr8s_api is not None:
    _uncached = _kr8s_api.Api.async_api_resources_uncached

    async def _with_singular_names(self):
        resources = await _uncached(self)
        for resource in resources:
            if not resource.get("singularName"):
                resource["singularName"] = resource["kind"].lower()
        return resources

    _kr8s_api.Api.async_api_resources_uncached = _with_singular_names
