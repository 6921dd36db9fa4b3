"""Engine ports on internal addresses: only the gateway host reaches them.

cortex-mn-a (172.30.78.10) runs the gateway and engines; cortex-mn-b
(172.30.78.11) runs engines and is not a gateway. Both publish SmolLM2 on
llama.cpp on their own address, as the example fleet does."""

from __future__ import annotations

import json
import os
import re
import socket

import openai
import pytest
import testinfra
from scenario import GATEWAY_URL, admin_get, admin_key

GATEWAY_HOST, ENGINE_HOST = "cortex-mn-a", "cortex-mn-b"
ADDRESS = {GATEWAY_HOST: "172.30.78.10", ENGINE_HOST: "172.30.78.11"}
ENGINE_PORT = 18100
# The API of the model over both hosts, at rank 0 on the gateway host.
GROUP_API_PORT = 18300
MODEL = "smollm2-135m-instruct"


def on(name: str):
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def curl_status(source: str, target: str, port: int, path: str = "/health") -> str:
    """What `curl` on the host `source` gets from target:port: the HTTP status,
    or curl's exit code (28: connection timed out, 7: refused)."""
    result = on(source).run(
        f"curl -s -o /dev/null -w '%{{http_code}}' --connect-timeout 3 --max-time 6 http://{ADDRESS[target]}:{port}{path}"
    )
    return result.stdout.strip() if result.rc == 0 else f"curl exit {result.rc}"


def drops(name: str) -> int:
    chain = on(name).check_output("nft list chain inet cortex_engine_firewall engine_access")
    return int(re.search(r"counter packets (\d+)", chain).group(1))


@pytest.mark.parametrize("name", [GATEWAY_HOST, ENGINE_HOST])
def test_each_host_loads_the_ruleset_at_boot(name):
    host = on(name)
    assert host.service("cortex-engine-firewall").is_enabled
    assert (
        host.service("cortex-engine-firewall").is_running
        or host.run("systemctl is-active cortex-engine-firewall").stdout.strip() == "active"
    )
    table = host.check_output("nft list table inet cortex_engine_firewall")
    assert f"ct original ip daddr {ADDRESS[name]}" in table
    assert "18080-20079" in table
    # Only the gateway host is allowed in.
    assert re.search(r"set allowed_ipv4 \{[^}]*elements = \{ 172\.30\.78\.10 \}", table), table


@pytest.mark.parametrize("name", [GATEWAY_HOST, ENGINE_HOST])
def test_engines_publish_on_the_internal_address_only(name):
    ports = on(name).check_output("docker ps --filter name=cortex- --format '{{.Ports}}'")
    assert f"{ADDRESS[name]}:{ENGINE_PORT}->" in ports
    assert "0.0.0.0" not in ports  # noqa: S104  # never published on every address


def test_the_gateway_host_reaches_the_other_hosts_engine():
    assert curl_status(GATEWAY_HOST, ENGINE_HOST, ENGINE_PORT) == "200"


def test_a_host_that_is_not_a_gateway_cannot_reach_engine_ports():
    before = drops(GATEWAY_HOST)
    assert curl_status(ENGINE_HOST, GATEWAY_HOST, ENGINE_PORT) == "curl exit 28"
    # vLLM answers /tokenize and /detokenize without its key: the port itself is closed.
    assert curl_status(ENGINE_HOST, GATEWAY_HOST, ENGINE_PORT, "/tokenize") == "curl exit 28"
    assert drops(GATEWAY_HOST) > before
    # The same path reaches the host's other ports: only engine ports are dropped.
    assert re.fullmatch(r"[1-5]\d\d", curl_status(ENGINE_HOST, GATEWAY_HOST, 80, "/v1/models")), (
        "nginx should answer"
    )


def test_the_other_rank_reaches_its_groups_api_and_nothing_else_there():
    """Rank 0's API of the model over both hosts is on an engine port of the
    gateway host: the other rank's host watches it (its health check), so
    the group's peers reach that port, and still none of the host's other
    engine ports."""
    assert curl_status(ENGINE_HOST, GATEWAY_HOST, GROUP_API_PORT) == "200"
    assert curl_status(ENGINE_HOST, GATEWAY_HOST, ENGINE_PORT) == "curl exit 28"


def test_this_controller_cannot_reach_engine_ports_either():
    # The control first: the controller reaches the hosts' network at all.
    with socket.create_connection((ADDRESS[GATEWAY_HOST], 80), timeout=5):
        pass
    for name in (GATEWAY_HOST, ENGINE_HOST):
        with pytest.raises(TimeoutError):
            socket.create_connection((ADDRESS[name], ENGINE_PORT), timeout=3).close()


def test_without_the_ruleset_the_port_is_open_and_with_it_closed_again():
    """The check above can fail: stopping the unit removes the table, and the
    host that is not a gateway reaches the engine; starting it closes it again."""
    host = on(GATEWAY_HOST)
    host.check_output("systemctl stop cortex-engine-firewall")
    try:
        assert host.run("nft list table inet cortex_engine_firewall").rc != 0
        assert curl_status(ENGINE_HOST, GATEWAY_HOST, ENGINE_PORT) == "200"
    finally:
        host.check_output("systemctl start cortex-engine-firewall")
    assert curl_status(ENGINE_HOST, GATEWAY_HOST, ENGINE_PORT) == "curl exit 28"


@pytest.mark.restarts_docker
def test_a_docker_restart_keeps_the_rules():
    host = on(ENGINE_HOST)
    host.check_output("systemctl restart docker")
    health = f"http://{ADDRESS[ENGINE_HOST]}:{ENGINE_PORT}/health"
    host.check_output(f"timeout 120 sh -c 'until curl -sf -o /dev/null {health}; do sleep 2; done'")
    assert curl_status(GATEWAY_HOST, ENGINE_HOST, ENGINE_PORT) == "200"
    with pytest.raises(TimeoutError):
        socket.create_connection((ADDRESS[ENGINE_HOST], ENGINE_PORT), timeout=3).close()


def test_the_gateway_serves_both_hosts_replicas(client_key):
    status, body = admin_get(on(GATEWAY_HOST), "http://127.0.0.1:8001/admin/backends", admin_key())
    assert status == 200, body
    rows = json.loads(body)["data"]
    urls = {row["url"]: row for row in rows if row["model"] == MODEL}
    assert set(urls) == {f"http://{ADDRESS[n]}:{ENGINE_PORT}" for n in ADDRESS}, urls
    # Ready on every worker: each one's health checks reach both hosts' engines.
    assert all(row["ready"] for row in urls.values()), urls
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, max_retries=0, timeout=60)
    for _attempt in range(4):
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content
