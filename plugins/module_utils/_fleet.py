# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet's endpoints and routing table, derived from cortex_models.

The model_servers role publishes each host's endpoints (from _models), and
the gateway role turns all hosts' endpoints into its routing table here.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class FleetError(ValueError):
    """The fleet's declarations are inconsistent; the message names the field."""


def routing_table(host_endpoints):
    """Merge hosts' endpoints into the gateway's models, replicas in host order.

    ``host_endpoints`` is a list of (host, endpoints) pairs. A model served by
    several hosts gets one backend per host; the engine must agree.
    """
    models = {}
    for host, endpoints in host_endpoints:
        for endpoint in endpoints or []:
            name = endpoint["name"]
            entry = models.setdefault(
                name,
                {
                    "name": name,
                    "engine": endpoint["engine"],
                    "timeouts": endpoint.get("timeouts") or {},
                    "backends": [],
                },
            )
            if entry["engine"] != endpoint["engine"]:
                raise FleetError(
                    "model %s: host %s serves it with engine %s, another host with %s"
                    % (name, host, endpoint["engine"], entry["engine"])
                )
            entry["backends"].append(
                {
                    "host": host,
                    "url": endpoint["url"],
                    "max_concurrency": endpoint["max_concurrency"],
                    "replica": endpoint.get("replica", 0),
                }
            )
    return [models[name] for name in sorted(models)]
