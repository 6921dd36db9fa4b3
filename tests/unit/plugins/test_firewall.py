"""The engine firewall's plan (plugins/module_utils/_firewall.py) and its
ruleset, rendered from the role's template and checked by the real nft."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._firewall import (
    FirewallError,
    engine_ports,
    firewall_rules,
    group_guards,
)

ROLE = Path(__file__).resolve().parents[3] / "roles" / "engine_firewall"
GATEWAYS = [("gw-a", "10.20.0.51"), ("gw-b", "10.20.0.52")]
# A model over two hosts (its multinode section), and the same on Ray.
SPANNING = {
    "name": "big",
    "engine": "vllm",
    "multinode": {
        "hosts": [{"host": "node-a", "address": "10.1.0.10"}, {"host": "node-b", "address": "10.1.0.11"}],
        "master_port": 29501,
    },
    "port": 18300,
}
SPANNING_RAY = {**SPANNING, "multinode": {**SPANNING["multinode"], "backend": "ray"}}
# Engines published on every address (the tests are about that value, not a bind).
EVERY_ADDRESS = "0.0.0.0"  # noqa: S104


def test_the_port_range_and_explicit_ports_outside_it_are_guarded():
    models = [
        {"name": "a", "port": 18100, "replicas": 2},  # inside the range
        {"name": "b", "port": 30000, "replicas": 3},
        {"name": "c", "port": 30003},  # next to b's: one interval
        {"name": "d"},  # automatic port: in the range
    ]
    assert engine_ports(models, 18080, 2000) == ["18080-20079", "30000-30003"]
    assert engine_ports([], 9000, 1) == ["9000"]


def test_the_example_fleet_allows_its_gateways_only():
    plan = firewall_rules("10.20.0.11", GATEWAYS, ["10.20.0.90/32", "fd00::/64"], ["18080-20079"])
    assert plan == {
        "active": True,
        "engines": True,
        "groups": [],
        "family": "ip",
        "daddr": "10.20.0.11",
        "ports": ["18080-20079"],
        "ipv4": ["10.20.0.51/32", "10.20.0.52/32", "10.20.0.90/32"],
        "ipv6": ["fd00::/64"],
    }


@pytest.mark.parametrize(
    ("bind", "enabled", "active"),
    [("127.0.0.1", "auto", False), ("::1", "auto", False), ("127.0.0.1", True, True),
     ("10.20.0.11", False, False), (EVERY_ADDRESS, "auto", True)],
)  # fmt: skip
def test_loopback_needs_no_rules_unless_asked(bind, enabled, active):
    assert firewall_rules(bind, GATEWAYS, [], ["18080-20079"], enabled)["active"] is active


def test_engines_on_every_address_match_any_destination():
    plan = firewall_rules(EVERY_ADDRESS, GATEWAYS, [], ["18080-20079"])
    assert plan["daddr"] is None


def test_every_bad_value_is_named_at_once():
    with pytest.raises(FirewallError) as info:
        firewall_rules("gpu-a.internal", GATEWAYS, ["10.0.0.0/33"], ["18080-20079"], enabled="yes")
    problems = info.value.args[0]
    assert len(problems) == 3, problems
    assert "model_servers_bind_address: 'gpu-a.internal' is not an IP address" in problems[0]
    assert "engine_firewall_enabled" in problems[1]
    assert "engine_firewall_allow: '10.0.0.0/33'" in problems[2]


def test_an_allowed_host_without_an_ip_address_is_named():
    with pytest.raises(FirewallError) as info:
        firewall_rules("10.20.0.11", [("gw-a", "gw-a.internal"), ("gw-b", "10.20.0.52")], [], ["18080-20079"])
    assert info.value.args[0] == [
        "host gw-a: address 'gw-a.internal' is not an IP address; set engine_firewall_address for it "
        "(the address its requests to the engines come from)"
    ]


def test_engines_on_loopback_need_no_address_for_the_gateways():
    """The local default: one host named in the inventory, engines on loopback."""
    plan = firewall_rules("127.0.0.1", [("cortex-local", "cortex-local")], [], ["18080-20079"])
    assert plan["active"] is False


def render(plan: dict) -> str:
    # An nft ruleset, not HTML: nothing to escape.
    environment = jinja2.Environment(  # noqa: S701
        loader=jinja2.FileSystemLoader(ROLE / "templates"), keep_trailing_newline=True
    )
    return environment.get_template("engine-firewall.nft.j2").render(
        _engine_firewall_plan=plan, ansible_managed="Ansible managed"
    )


@pytest.mark.parametrize(
    "plan",
    [
        firewall_rules("10.20.0.11", GATEWAYS, ["fd00::1"], ["18080-20079", "30000-30003"]),
        firewall_rules("fd00::11", GATEWAYS, [], ["18080-20079"]),
        firewall_rules(EVERY_ADDRESS, [], [], ["18100"]),  # nothing allowed: empty sets
        # Engines on loopback, a group's ranks guarded on the host's own address.
        firewall_rules("127.0.0.1", [], [], ["18080-20079"], groups=group_guards([SPANNING], "node-a")),
        firewall_rules(
            "10.1.0.10", GATEWAYS, [], ["18080-20079"], groups=group_guards([SPANNING_RAY], "node-b")
        ),
    ],
    ids=["ipv4", "ipv6-bind", "no-one-allowed", "group-only", "engines-and-ray-group"],
)
def test_the_rendered_ruleset_is_accepted_by_nft(plan, tmp_path):
    assert shutil.which("nft"), "nft is missing: scripts/bootstrap installs Debian's nftables"
    text = render(plan)
    ruleset = tmp_path / "engine-firewall.nft"
    ruleset.write_text(text)
    checked = subprocess.run(
        ["nft", "--check", "--file", str(ruleset)], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stderr + text
    assert ("jump engine_access" in text) is plan["engines"]
    for number, guard in enumerate(plan["groups"]):
        assert (
            f"ct state new ip daddr {guard['daddr']} tcp dport @group_{number}_ports "
            f"ip saddr != @group_{number}_peers counter drop"
        ) in text
    if plan["daddr"] and plan["engines"]:
        assert (
            f"ct original {plan['family']} daddr {plan['daddr']} ct original proto-dst @engine_ports" in text
        )


def test_a_broken_ruleset_is_refused_by_the_same_check(tmp_path):
    """The role's template task validates with this command: it does catch errors."""
    ruleset = tmp_path / "broken.nft"
    ruleset.write_text(
        render(firewall_rules("10.20.0.11", GATEWAYS, [], ["18080-20079"])).replace(
            "@engine_ports", "@no_such_set"
        )
    )
    checked = subprocess.run(
        ["nft", "--check", "--file", str(ruleset)], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode != 0


def test_a_pools_own_port_is_guarded():
    """Defect 8: the ports came from cortex_models only, so a pool with an
    explicit port outside the range was published to anyone."""
    from ansible_collections.cortex.serving.plugins.filter.firewall import FilterModule

    plan_filter = FilterModule().filters()["engine_firewall_rules"]
    hostvars = {"gw": {"ansible_host": "10.20.0.51"}}
    groups = {"gateways": ["gw"]}
    pools = [{"name": "small", "port": 30500, "max_resident": 1}, {"name": "auto"}]
    plan = plan_filter("10.20.0.11", [], 18080, 2000, hostvars, groups, ["gateways"], [], "auto", pools)
    assert plan["ports"] == ["18080-20079", "30500"]


def test_the_role_plans_with_the_hosts_pools():
    plan_task = (ROLE / "tasks" / "plan.yml").read_text()
    assert "engine_firewall_enabled, engine_firewall_pools, inventory_hostname)" in plan_task
    defaults = (ROLE / "defaults" / "main.yml").read_text()
    assert (
        'engine_firewall_pools: "{{ model_servers_pools | default(cortex_model_pools | default([])) }}"'
        in defaults
    )


def test_a_groups_ports_are_open_to_the_group_alone():
    """Defect 9: with host networking a rank's torch store, Ray and NCCL/Gloo
    ports answered any address; they are guarded on the address the group
    talks over, whatever the engines' own bind."""
    guards = group_guards([SPANNING, {"name": "alone", "engine": "llamacpp"}], "node-b")
    assert guards == [
        {
            "model": "big",
            "family": "ip",
            "daddr": "10.1.0.11",
            "ports": ["29501", "32768-60999"],
            "peers": ["10.1.0.10/32", "10.1.0.11/32"],
            "api_port": None,
        }
    ]
    ray = group_guards([SPANNING_RAY], "node-a")[0]
    assert ray["ports"] == ["6379", "8265", "10001-19999", "29501", "32768-60999"]
    assert group_guards([SPANNING], "elsewhere") == []
    plan = firewall_rules("127.0.0.1", GATEWAYS, [], ["18080-20079"], groups=guards)
    assert (plan["active"], plan["engines"], plan["groups"]) == (True, False, guards)
    # The operator's opt-out covers the groups too.
    assert firewall_rules("127.0.0.1", GATEWAYS, [], ["18080-20079"], False, guards)["active"] is False


def test_the_groups_other_hosts_reach_its_api_at_rank_0():
    """Found when the firewall's two hosts became the multinode scenario's:
    rank 0's API is on an engine port, which only the gateways reached, so
    the other ranks' hosts could not health-check their own group."""
    leader = group_guards([SPANNING], "node-a")[0]
    assert leader["api_port"] == 18300
    plan = firewall_rules("10.1.0.10", GATEWAYS, [], ["18080-20079"], groups=[leader])
    text = render(plan)
    accept = "ip daddr 10.1.0.10 tcp dport 18300 ip saddr @group_0_peers accept"
    # Before the engine ports' rule, which lets the gateways alone in.
    assert text.index(accept) < text.index("tcp dport @engine_ports jump engine_access")
    # An automatic port is not known here: nothing is opened.
    assert group_guards([{**SPANNING, "port": None}], "node-a")[0]["api_port"] is None


def test_a_group_with_an_unreadable_port_is_left_to_the_checks_that_name_it():
    bad = {**SPANNING, "multinode": {**SPANNING["multinode"], "master_port": "29501"}}
    assert group_guards([bad], "node-a") == []
