"""What a rolling change's playbook output must show: each replica drained,
replaced, healthy and routed to again before the next, read from the task
titles and the drain messages of roles/model_servers. Pure: the scenarios'
verifiers and a unit test (which shows each check can fail) use it."""

from __future__ import annotations

import re
import subprocess

DRAIN = "Drain it in the gateways first: "


def assert_replaced_one_at_a_time(
    result: subprocess.CompletedProcess, replicas: list[str], host: str, *, removed: tuple[str, ...] = ()
) -> list[int]:
    """Each replica drained, replaced, healthy and routed to again before any
    other replica of the converge is touched, and each of ``removed`` drained
    before it is removed. Returns, per replica and then per removed one, the
    requests in flight when its drain began (which the drain waited for)."""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    log = result.stdout
    said = re.compile(rf"{re.escape(host)}: drained, no request in flight \((\d+) were")
    waited = []
    for replica in replicas:
        steps = [
            f"{DRAIN}{replica}",
            f"Run {replica}",
            f"Wait until /health answers 200: {replica}",
            f"Put it back in the gateways: {replica}",
        ]
        positions = [log.find(step) for step in steps]
        assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p == -1]
        assert positions == sorted(positions), (replica, positions)
        drain, run, _wait, put_back = positions
        drained = [m.group(1) for m in said.finditer(log, drain, run)]
        assert len(drained) == 1, (
            f"{replica}: {len(drained)} drains said before it was replaced: " + log[drain:run][-2000:]
        )
        waited.append(int(drained[0]))
        # No other replica is drained while this one is out, and this one is
        # routed to again before the next drain begins.
        assert not said.search(log, run, put_back), f"another replica was drained while {replica} was out"
        back = log.find(f"{host}: routes to it again", put_back)
        assert back != -1, f"no gateway routes to {replica} again"
        following = said.search(log, put_back)
        assert following is None or back < following.start(), f"{replica} was not back before the next drain"
    for replica in removed:
        drain, remove = log.find(f"{DRAIN}{replica}"), log.find(f"Remove it: {replica}")
        assert -1 < drain < remove, f"{replica} was not drained before it was removed"
        drained = said.search(log, drain, remove)
        assert drained, f"{replica} was removed with no drain said: " + log[drain:remove][-2000:]
        waited.append(int(drained.group(1)))
    return waited
