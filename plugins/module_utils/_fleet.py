# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet's endpoints and routing table, derived from cortex_models.

One place decides a model's port and concurrency: the model_servers role
publishes each host's endpoints with ``model_endpoints``, and the gateway role
turns all hosts' endpoints into its routing table with ``routing_table``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class FleetError(ValueError):
    """The fleet's declarations are inconsistent; the message names the field."""


def model_endpoints(models, address, port_base, llamacpp_defaults=None):
    """One endpoint per served model of a host: name, engine, port, url, concurrency."""
    endpoints = []
    for index, model in enumerate(models or []):
        name = model.get("name")
        options = dict(llamacpp_defaults or {})
        options.update(model.get("llamacpp") or {})
        port = int(model.get("port") or int(port_base) + index)
        endpoints.append(
            {
                "name": name,
                "engine": model.get("engine"),
                "port": port,
                "url": "http://%s:%d" % (address, port),
                # llama-server serves this many requests at once.
                "max_concurrency": int(options.get("parallel", 1)),
            }
        )
    return endpoints


def routing_table(host_endpoints):
    """Merge hosts' endpoints into the gateway's models, replicas in host order.

    ``host_endpoints`` is a list of (host, endpoints) pairs. A model served by
    several hosts gets one backend per host; the engine must agree.
    """
    models = {}
    for host, endpoints in host_endpoints:
        for endpoint in endpoints or []:
            name = endpoint["name"]
            entry = models.setdefault(name, {"name": name, "engine": endpoint["engine"], "backends": []})
            if entry["engine"] != endpoint["engine"]:
                raise FleetError(
                    "model %s: host %s serves it with engine %s, another host with %s"
                    % (name, host, endpoint["engine"], entry["engine"])
                )
            entry["backends"].append(
                {"host": host, "url": endpoint["url"], "max_concurrency": endpoint["max_concurrency"]}
            )
    return [models[name] for name in sorted(models)]
