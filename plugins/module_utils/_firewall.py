# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the engine_firewall role guards, from inventory values: the engine
ports a host publishes, the address they are published on, and the addresses
that may reach them (the gateway hosts and what the operator adds).

Everything is checked here, on the controller, so that a bad address fails
the play before any host changes, with the host and value named."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible_collections.cortex.serving.plugins.module_utils._multinode import (
    DEFAULT_MASTER_PORT,
    DEFAULT_RAY_PORT,
)

# A model over several hosts shares each host's network: its ranks listen on
# every address. The torch store on master_port (rank 0), Ray's GCS on
# ray_port and, for Ray, its client server and workers' ports, and NCCL's and
# Gloo's ports, which the kernel picks from its ephemeral range (Linux's
# default net.ipv4.ip_local_port_range). Only the group's own hosts may reach
# them on the address the group talks over.
EPHEMERAL_PORTS = (32768, 60999)
RAY_EXTRA_PORTS = ((8265, 8265), (10001, 19999))


class FirewallError(ValueError):
    """Inventory values the firewall cannot be built from; args[0] lists every problem."""


def _network(value):
    """An address or a CIDR network, as nft writes it; None when it is neither."""
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        return None


def engine_ports(models, port_base, port_span, pools=None):
    """Port intervals ("lo-hi" or "port") covering every port an engine of
    these models, or a pool's router, can be published on: the automatic
    range, and explicit ports (one per replica; one per pool) outside it.
    Guarding the range, not today's ports, means an engine started later is
    never reachable before the firewall knows it."""
    base, span = int(port_base), int(port_span)
    intervals = [(base, base + span - 1)]
    for entry in list(models or []) + list(pools or []):
        port = entry.get("port") if isinstance(entry, dict) else None
        if _port_number(port):
            replicas = entry.get("replicas", 1)
            replicas = replicas if isinstance(replicas, int) and replicas > 0 else 1
            intervals.append((port, port + replicas - 1))
    return _merged(intervals)


def group_guards(models, host):
    """For each model of ``models`` that spans hosts with ``host`` among them:
    the address its group reaches this host on, the ports its ranks listen
    on there, and the group's addresses (the only sources let in). The
    model's own checks (_multinode.check_multinode) have named any bad value;
    an entry that cannot be read is left to them."""
    guards = []
    for model in models or []:
        spec = model.get("multinode") if isinstance(model, dict) else None
        hosts = spec.get("hosts") if isinstance(spec, dict) else None
        if not isinstance(hosts, list):
            continue
        entries = [e for e in hosts if isinstance(e, dict) and e.get("host") and e.get("address")]
        mine = [e for e in entries if str(e["host"]) == str(host)]
        networks = [_network(e["address"]) for e in entries]
        if not mine or None in networks:
            continue
        address = ipaddress.ip_address(str(mine[0]["address"]).strip())
        fixed = [spec.get("master_port", DEFAULT_MASTER_PORT)]
        if spec.get("backend") == "ray":
            fixed.append(spec.get("ray_port", DEFAULT_RAY_PORT))
        if not all(_port_number(p) for p in fixed):
            continue
        ports = [(p, p) for p in fixed] + [EPHEMERAL_PORTS]
        if spec.get("backend") == "ray":
            ports.extend(RAY_EXTRA_PORTS)
        # Rank 0's host serves the group's API, which the other ranks' hosts
        # watch for their health checks (tasks of the health_check role):
        # the group's peers reach that port too, the gateways as any engine's.
        api = model.get("port")
        leads = str(entries[0]["host"]) == str(host)
        guards.append(
            {
                "model": str(model.get("name")),
                "family": "ip6" if address.version == 6 else "ip",
                "daddr": str(address),
                "ports": _merged(ports),
                "peers": sorted({str(n) for n in networks}, key=ipaddress.ip_network),
                "api_port": api if leads and _port_number(api) else None,
            }
        )
    return guards


def _port_number(value):
    """Whether an inventory value is a whole number (a bool is not), as a port must be."""
    return isinstance(value, int) and not isinstance(value, bool)


def _merged(intervals):
    """(low, high) port intervals, merged and sorted, as nft writes them ("lo-hi" or "port")."""
    merged = []
    for low, high in sorted(intervals):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return ["%d" % low if low == high else "%d-%d" % (low, high) for low, high in merged]


def firewall_rules(bind_address, sources, extra, ports, enabled="auto", groups=None):
    """The role's plan. sources: (host, address) pairs of the hosts allowed by
    group; extra: addresses or CIDRs the operator allows besides them;
    groups: group_guards() of this host's models.

    Returns active (whether a ruleset is wanted), engines (whether the engine
    ports are guarded), family and daddr (the published address, None for all
    addresses), ports, ipv4 and ipv6, and the groups' guards."""
    problems = []
    bind = str(bind_address).strip()
    try:
        published = ipaddress.ip_address(bind)
    except ValueError:
        published = None
        problems.append(
            "model_servers_bind_address: %r is not an IP address (the engines' ports are published on it)"
            % bind
        )
    if enabled not in ("auto", True, False):
        problems.append("engine_firewall_enabled: must be auto, true or false, got %r" % (enabled,))
    networks = []
    for value in extra or []:
        network = _network(value)
        if network is None:
            problems.append("engine_firewall_allow: %r is not an IP address or CIDR network" % (value,))
        else:
            networks.append(network)
    if problems:
        raise FirewallError(problems)
    # Engines on loopback need no rules, and the allowed hosts no IP address.
    engines = bool(ports) and (enabled is True or (enabled == "auto" and not published.is_loopback))
    # A group's ranks listen on every address whatever the engines' bind.
    guards = list(groups or []) if enabled is not False else []
    for host, address in sources if engines else []:
        network = _network(address)
        if network is None:
            problems.append(
                "host %s: address %r is not an IP address; set engine_firewall_address for it "
                "(the address its requests to the engines come from)" % (host, address)
            )
        else:
            networks.append(network)
    if problems:
        raise FirewallError(problems)

    unspecified = published.is_unspecified

    def listed(version):
        return sorted({str(n) for n in networks if n.version == version}, key=ipaddress.ip_network)

    return {
        "active": engines or bool(guards),
        "engines": engines,
        "groups": guards,
        "family": "ip6" if published.version == 6 else "ip",
        "daddr": None if unspecified else str(published),
        "ports": list(ports),
        "ipv4": listed(4),
        "ipv6": listed(6),
    }
