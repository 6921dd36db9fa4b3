"""What the Molecule scenarios' verifiers share: testinfra hosts and the
gateway's client key from Molecule's environment, and a bounded request loop.
Each scenario's conftest.py imports it (this folder is not a scenario)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
import yaml
from loads import RequestLoop
from prometheus_client.parser import text_string_to_metric_families


def _gateway_url() -> str:
    """The gateway through nginx, where the scenario publishes the host's port 80."""
    scenario = yaml.safe_load((Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "molecule.yml").read_text())
    published = scenario["platforms"][0]["published_ports"][0]  # "127.0.0.1:PORT:80"
    address, port, _inside = published.rsplit(":", 2)
    return f"http://{address}:{port}/v1"


GATEWAY_URL = _gateway_url()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "host" in metafunc.fixturenames:
        inventory = os.environ["MOLECULE_INVENTORY_FILE"]
        hosts = testinfra.utils.ansible_runner.AnsibleRunner(inventory).get_hosts("all")
        metafunc.parametrize(
            "host",
            [testinfra.get_host(f"ansible://{h}?ansible_inventory={inventory}") for h in hosts],
            ids=hosts,
            scope="module",
        )


def credential(kind: str, name: str) -> str:
    """A key the roles generated in the inventory's .credentials folder on the first converge."""
    inventory_dir = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
    return (inventory_dir / ".credentials" / kind / name).read_text().strip()


@pytest.fixture(scope="session")
def client_key() -> str:
    return credential("gateway-api-key", "default")


def admin_key() -> str:
    return credential("gateway-admin-key", "admin")


def admin_base(host) -> str:
    """Where the running gateway's admin API answers on its host (it says so
    in its runtime folder; a test may have moved it)."""
    return host.check_output("cat /run/cortex-gateway/admin-url").strip()


def admin_get(host, url: str, key: str) -> tuple[int, str]:
    """GET on the host itself (the admin API is not on the public site): the status and the body."""
    answer = host.check_output(f"curl -sk -w '\\n%{{http_code}}' -H 'Authorization: Bearer {key}' '{url}'")
    body, _newline, status = answer.rpartition("\n")
    return int(status), body


def streamed_chat(client, model: str, max_tokens: int, **extra: object) -> tuple[list, list[str]]:
    """A greedy streamed chat through the gateway: every chunk, and the text
    pieces, which must be more than one (a stream, not one answer)."""
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            **extra,
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "a stream should arrive in several chunks"
    return chunks, pieces


def journal(host, unit: str) -> str:
    return host.run(f"journalctl -u {unit} --no-pager -n 40").stdout


def changed_models(
    tmp_path: Path, model: str, section: str, option: str, value: object, **fields: object
) -> Path:
    """The scenario's cortex_models as last changed by a test (or as its
    group_vars have them), with one engine option of one model changed (and
    any of its own ``fields``, e.g. replicas), as an extra-vars file. It
    becomes the state later changes start from: the tests converge it."""
    group_vars = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "group_vars" / "all.yml"
    last = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "changed-models.yml"
    models = yaml.safe_load((last if last.exists() else group_vars).read_text())["cortex_models"]
    entry = next(m for m in models if m["name"] == model)
    entry[section][option] = value
    entry.update(fields)
    path = tmp_path / "changed.yml"
    path.write_text(yaml.safe_dump({"cortex_models": models}))
    last.write_text(path.read_text())
    return path


# The fewest requests and streams a load under a converge must have made.
MINIMUM_OUTCOMES = 10


class Load:
    """The load on one model while a converge runs: one thread looping
    requests and ``stream_threads`` looping streams."""

    def __init__(self, client, model: str, *, stream_threads: int = 2, max_seconds: float = 900):
        self.loop = RequestLoop(client, model, max_seconds=max_seconds)
        self.streams = RequestLoop(
            client, model, threads=stream_threads, max_seconds=max_seconds, stream=True
        )


def converge_under_load(
    load: Load, changed_vars: Path, playbook: str, *, max_seconds: float = 900
) -> subprocess.CompletedProcess:
    """Run a playbook of the project with ``changed_vars`` over the scenario's
    inventory while ``load`` loops through the gateway; the loops stop when it ends."""
    project = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[2]))
    inventory = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(project / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(project / ".cache" / "collections"),
        "ANSIBLE_FORCE_COLOR": "0",
    }
    with load.loop, load.streams:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
             "-e", f"@{changed_vars}", str(project / "playbooks" / playbook)],
            cwd=project, env=env, capture_output=True, text=True, timeout=max_seconds, check=False,
        )  # fmt: skip
        # The loops make at least the floor assert_no_failures checks, however
        # fast the converge was: the floor proves a load ran, and a shorter
        # converge (slow CPU streams, one at a time) must not fail it.
        for loop in (load.loop, load.streams):
            loop.wait_for(MINIMUM_OUTCOMES, max_seconds=180)
    # Its per-task times (profile_tasks), kept where ./scripts/test keeps its reports.
    reports = os.environ.get("CORTEX_REPORTS")
    if reports:
        scenario = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]).name
        log = Path(reports) / f"{scenario}-under-load-{changed_vars.parent.name}.log"
        log.write_text(result.stdout + result.stderr)
    return result


def assert_no_failures(loop: RequestLoop, streams: RequestLoop, minimum: int = MINIMUM_OUTCOMES) -> None:
    assert len(loop.outcomes) >= minimum, f"the load loop made only {len(loop.outcomes)} requests"
    assert loop.failures == [], (
        f"{len(loop.failures)} of {len(loop.outcomes)} requests failed: {loop.failures[:5]}"
    )
    assert len(streams.outcomes) >= minimum, f"the stream loop made only {len(streams.outcomes)} streams"
    assert streams.failures == [], (
        f"{len(streams.failures)} of {len(streams.outcomes)} streams failed: {streams.failures[:5]}"
    )


def assert_real_sentence_embeddings(client, model: str) -> None:
    """all-MiniLM-L6-v2's size, and paraphrases close where unrelated text is far."""
    result = client.embeddings.create(
        model=model,
        input=[
            "The cat sits on the mat.",
            "A cat is sitting on a rug.",
            "Quarterly revenue rose by ten percent.",
        ],
    )
    cat, rug, revenue = (d.embedding for d in result.data)
    assert len(cat) == 384

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    assert cosine(cat, rug) > 0.6
    assert cosine(cat, revenue) < 0.3


def gateway_series(host, name: str, **labels: str) -> dict[str, float]:
    """A counter of the gateway's /metrics on the host, per backend, for the
    series whose labels match (fails when there is none: a missing series is not a 0)."""
    text = host.check_output("curl -sf http://127.0.0.1:8000/metrics")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                backend = sample.labels.get("backend", "")
                values[backend] = values.get(backend, 0.0) + sample.value
    assert values, f"no series {name}{labels} in the gateway's metrics"
    return values


def assert_turns_return_to_their_replica(host, client, model: str) -> None:
    """Prefix affinity on real engines: turn 2 of a conversation goes to the
    replica of turn 1 (each turn on a connection of its own, so whichever
    worker takes it), and that engine reports the prompt tokens it reused."""
    system = "You answer in one short sentence. Colours, shapes and sizes only. " * 30

    def served() -> dict[str, float]:
        return gateway_series(host, "cortex_gateway_requests_total", model=model, status="200")

    before = served()
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(model=model, messages=first, max_tokens=4, temperature=0)
    after_first = served()
    (home,) = [b for b, count in after_first.items() if count > before.get(b, 0)]
    second = [*first, {"role": "assistant", "content": answer.choices[0].message.content or ""},
              {"role": "user", "content": "And a shape?"}]  # fmt: skip
    for _turn in range(3):
        client.chat.completions.create(model=model, messages=second, max_tokens=4, temperature=0)
    after = served()
    grew = {b: after[b] - after_first.get(b, 0) for b in after if after[b] > after_first.get(b, 0)}
    assert grew == {home: 3}, f"turn 1 went to {home}; turn 2's requests went to {grew}"
    hits = gateway_series(host, "cortex_gateway_prompt_cache_tokens_total", model=model, result="hit")
    assert hits.get(home, 0) > 0, f"{home}'s engine reported no cached prompt tokens: {hits}"
