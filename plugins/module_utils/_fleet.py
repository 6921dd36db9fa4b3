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
                    "routing": endpoint.get("routing") or {},
                    "adapters": endpoint.get("adapters") or [],
                    "backends": [],
                },
            )
            if endpoint.get("health_probe"):
                entry["health_probe"] = endpoint["health_probe"]
            if endpoint.get("priority_scheduling"):
                entry["priority_scheduling"] = True
            if entry["engine"] != endpoint["engine"]:
                raise FleetError(
                    "model %s: host %s serves it with engine %s, another host with %s"
                    % (name, host, endpoint["engine"], entry["engine"])
                )
            if (endpoint.get("adapters") or []) != entry["adapters"]:
                # The gateway names an adapter by its place in the list.
                raise FleetError(
                    "model %s: host %s has the adapters %s, another host %s; give every host the same list"
                    % (
                        name,
                        host,
                        [a["name"] for a in endpoint.get("adapters") or []],
                        [a["name"] for a in entry["adapters"]],
                    )
                )
            backend = {
                "host": host,
                "url": endpoint["url"],
                "max_concurrency": endpoint["max_concurrency"],
                "replica": endpoint.get("replica", 0),
            }
            pool = endpoint.get("pool")
            if pool:
                # Loaded on demand there: the gateway waits for its loads,
                # for the longest of its hosts' load timeouts.
                backend["pool"] = {"name": pool["name"], "max_resident": pool["max_resident"]}
                entry["load_timeout"] = max(entry.get("load_timeout", 0), int(pool["load_timeout"]))
            entry["backends"].append(backend)
    return [models[name] for name in sorted(models)]


# Seconds nginx waits beyond the gateway's longest timeout, so that the
# gateway gives up first and answers with its own error body.
PROXY_TIMEOUT_MARGIN = 15


def proxy_read_timeout(routes, default_timeouts):
    """nginx's read and send timeout in front of the gateway: its longest wait.

    A non-streamed answer sends nothing until the engine's first byte, and a
    stream nothing between two chunks, so the gateway's longest first_byte or
    idle timeout, over its defaults and every model's own, plus a margin. A
    model loaded on demand may first wait for its load, then for its first byte.
    """
    defaults = default_timeouts or {}
    longest = max(float(defaults.get(kind) or 0) for kind in ("first_byte", "idle"))
    for route in routes or []:
        timeouts = dict(defaults, **(route.get("timeouts") or {}))
        load = float(route.get("load_timeout") or 0)
        for kind in ("first_byte", "idle"):
            if timeouts.get(kind) is not None:
                longest = max(longest, float(timeouts[kind]) + (load if kind == "first_byte" else 0))
    return int(-(-longest // 1)) + PROXY_TIMEOUT_MARGIN


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
            if endpoint.get("pool"):
                # A pool's router has metrics only per loaded model
                # (/metrics?model=), and a scrape would load it: its models
                # are seen through the gateway's metrics instead.
                continue
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


FLEET_COLUMNS = ("host", "model", "engine", "replica", "state", "health", "gpus", "gpu_memory")


def fleet_rows(containers, host, gpus):
    """One row per engine container of a host, from `docker inspect` output and gpu_facts' GPUs."""
    by_index = dict((str(g.get("index")), g) for g in gpus or [])
    rows = []
    for info in containers:
        labels = (info.get("Config") or {}).get("Labels") or {}
        state = info.get("State") or {}
        devices = []
        for request in (info.get("HostConfig") or {}).get("DeviceRequests") or []:
            devices.extend(str(d) for d in request.get("DeviceIDs") or [])
        used = [by_index[d] for d in devices if d in by_index]
        memory = "-"
        if used:
            memory = "%.1f / %.1f GiB" % (
                sum(g.get("memory_used_mib", 0) for g in used) / 1024.0,
                sum(g.get("memory_total_mib", 0) for g in used) / 1024.0,
            )
        rows.append(
            {
                "host": host,
                "model": labels.get("io.cortex.model", info.get("Name", "").lstrip("/")),
                "engine": labels.get("io.cortex.engine", "?"),
                "replica": labels.get("io.cortex.replica", "0"),
                "state": state.get("Status", "?"),
                "health": (state.get("Health") or {}).get("Status", "-"),
                "gpus": ",".join(devices) or "cpu",
                "gpu_memory": memory,
            }
        )
    return sorted(rows, key=lambda r: (r["host"], r["model"], int(r["replica"] or 0)))


def fleet_table(rows):
    """The rows as aligned text lines, a header first; a container that is not
    running and healthy is marked with '<-' at the end of its line."""
    header = dict((c, c.replace("_", " ").upper()) for c in FLEET_COLUMNS)
    widths = dict((c, max([len(header[c])] + [len(str(r[c])) for r in rows])) for c in FLEET_COLUMNS)

    def line(row, mark=""):
        return ("  ".join(str(row[c]).ljust(widths[c]) for c in FLEET_COLUMNS) + mark).rstrip()

    lines = [line(header)]
    for row in rows:
        healthy = row["state"] == "running" and row["health"] in ("healthy", "-")
        lines.append(line(row, "" if healthy else "  <-"))
    if not rows:
        lines.append("(no engine containers)")
    return lines
