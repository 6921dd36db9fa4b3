"""The rolling-change check of the Molecule scenarios can fail: a replica
drained while another is out, one never routed to again, one removed
undrained, or a failed playbook, are each caught on a playbook log shaped
as roles/model_servers prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "molecule" / "shared"))

from rollouts import assert_replaced_one_at_a_time

HOST = "gpu-a"


def drain(replica: str, in_flight: int = 1) -> list[str]:
    return [
        f"TASK [cortex.serving.model_servers : Drain it in the gateways first: {replica}] ***",
        f'ok: [{HOST}] => msg: "{HOST}: drained, no request in flight ({in_flight} were when it began)"',
    ]


def replace(replica: str) -> list[str]:
    return [
        f"TASK [cortex.serving.model_servers : Run {replica}] ***",
        f"TASK [cortex.serving.model_servers : Wait until /health answers 200: {replica}] ***",
    ]


def put_back(replica: str) -> list[str]:
    return [
        f"TASK [cortex.serving.model_servers : Put it back in the gateways: {replica}] ***",
        f'ok: [{HOST}] => (item={HOST}) => msg: "{HOST}: routes to it again"',
    ]


def removal(replica: str) -> list[str]:
    return [*drain(replica, 0), f"TASK [cortex.serving.model_servers : Remove it: {replica}] ***"]


def check(lines: list[str], replicas: list[str], *, removed: tuple[str, ...] = (), rc: int = 0) -> list[int]:
    result = subprocess.CompletedProcess([], rc, stdout="\n".join(lines), stderr="")
    return assert_replaced_one_at_a_time(result, replicas, HOST, removed=removed)


def test_replicas_of_two_models_one_after_the_other_pass_and_say_what_each_drain_waited_for():
    lines = [*drain("a-0", 2), *replace("a-0"), *put_back("a-0"), *removal("a-1")]
    lines += [
        "TASK [cortex.serving.model_servers : Drain it in the gateways first: c-0] ***",
        "skipping: [gpu-a]",
    ]
    lines += [
        *drain("b-0", 0),
        *replace("b-0"),
        *put_back("b-0"),
        *drain("b-1", 3),
        *replace("b-1"),
        *put_back("b-1"),
    ]
    assert check(lines, ["a-0", "b-0", "b-1"], removed=("a-1",)) == [2, 0, 3, 0]


def test_a_replica_drained_while_another_is_out_fails():
    lines = [
        *drain("b-0"),
        *replace("b-0"),
        *drain("b-1"),
        *put_back("b-0"),
        *replace("b-1"),
        *put_back("b-1"),
    ]
    with pytest.raises(AssertionError, match="another replica was drained while b-0 was out"):
        check(lines, ["b-0", "b-1"])


def test_a_replica_not_routed_to_again_before_the_next_drain_fails():
    lines = [
        *drain("b-0"),
        *replace("b-0"),
        put_back("b-0")[0],
        *drain("b-1"),
        *replace("b-1"),
        *put_back("b-1"),
    ]
    with pytest.raises(AssertionError, match="b-0 was not back before the next drain"):
        check(lines, ["b-0", "b-1"])


def test_a_replica_replaced_without_a_drain_said_fails():
    lines = [drain("b-0")[0], *replace("b-0"), *put_back("b-0")]
    with pytest.raises(AssertionError, match="b-0: 0 drains said"):
        check(lines, ["b-0"])


def test_a_replica_removed_undrained_and_a_failed_playbook_fail():
    lines = [
        *drain("a-0"),
        *replace("a-0"),
        *put_back("a-0"),
        drain("a-1")[0],
        "TASK [x : Remove it: a-1] ***",
    ]
    with pytest.raises(AssertionError, match="a-1 was removed with no drain said"):
        check(lines, ["a-0"], removed=("a-1",))
    with pytest.raises(AssertionError):
        check([*drain("a-0"), *replace("a-0"), *put_back("a-0")], ["a-0"], rc=2)
