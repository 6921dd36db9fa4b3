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


_ANY_ADDRESS = ("0.0.0.0", "::", "")  # noqa: S104 - compared with, never bound


def prometheus_targets(gateways, gpu_hosts, node_exporter_port=9100):
    """Prometheus file_sd target groups for the fleet, by file name.

    ``gateways`` is a list of (host, address, listen_host, listen_port);
    ``gpu_hosts`` a list of (host, address, endpoints) with the endpoints the
    model_servers role published. Gateways listening on every address are
    scraped at the host's address; engines at the URL the gateway uses. Every
    target carries a ``host`` label, the inventory name, which the dashboard
    filters on. Engines get one file per host, since each host's engines have
    their own API key (one scrape job per host).
    """
    files = {"cortex-gateway.json": [], "cortex-node.json": []}
    for host, address, listen_host, listen_port in gateways:
        target_host = address if listen_host in _ANY_ADDRESS else listen_host
        files["cortex-gateway.json"].append(
            {"targets": ["%s:%d" % (_bracketed(target_host), int(listen_port))], "labels": {"host": host}}
        )
    nodes = {}
    for host, address, _listen_host, _listen_port in gateways:
        nodes[host] = address
    for host, address, endpoints in gpu_hosts:
        nodes[host] = address
        groups = []
        for endpoint in endpoints or []:
            netloc = endpoint["url"].split("://", 1)[1].rstrip("/")
            groups.append(
                {
                    "targets": [netloc],
                    "labels": {
                        "host": host,
                        "model": endpoint["name"],
                        "engine": endpoint["engine"],
                        "replica": str(endpoint.get("replica", 0)),
                    },
                }
            )
        files["cortex-engines-%s.json" % host] = groups
    for host in sorted(nodes):
        files["cortex-node.json"].append(
            {
                "targets": ["%s:%d" % (_bracketed(nodes[host]), int(node_exporter_port))],
                "labels": {"host": host},
            }
        )
    return files


def _bracketed(address):
    return "[%s]" % address if ":" in address else address
