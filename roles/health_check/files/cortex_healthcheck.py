# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One run of the cortex.serving health check, started by a systemd timer.

Checks every engine container of this host (Docker state, the engine's
/health, and every Nth run a tiny real completion or embedding), the gateway's
/healthz through nginx, and nginx itself. Writes node_exporter textfile
metrics, logs one journal line per problem, and restarts an engine container
that failed too many runs in a row: never inside its start period, with
exponential backoff, and at most so many times an hour.

Standard library only: it runs with the host's own python3.
"""

import argparse
import json
import os
import ssl
import subprocess
import sys
import time
from datetime import datetime
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

# sd-daemon priority prefixes: the journal files each line at this level.
ERR, WARNING, INFO = "<3>", "<4>", "<6>"


def log(level, message):
    sys.stdout.write(f"{level}{message}\n")


# --- the restart decision: a pure function of the state and the clock ----------


def decide(state, healthy, starting, now, policy):
    """Update one container's state after a check; return (action, reason).

    action is "restart" or None. state holds "failures" (consecutive failed
    runs) and "restarts" (the times this check restarted the container).
    """
    restarts = [t for t in state.get("restarts", []) if now - t < 3600]
    state["restarts"] = restarts
    if healthy:
        state["failures"] = 0
        return None, "healthy"
    if starting:
        # Still loading: llama-server answers 503 and vLLM no /health until
        # the weights are in; failing then is normal, so nothing is counted.
        state["failures"] = 0
        return None, "inside its start period"
    state["failures"] = state.get("failures", 0) + 1
    if state["failures"] < policy["restart_after"]:
        return None, f"failed {state['failures']} of {policy['restart_after']} runs before a restart"
    if len(restarts) >= policy["max_restarts_per_hour"]:
        return None, f"restarted {len(restarts)} times in the last hour already (the cap)"
    if restarts:
        wait = policy["backoff_seconds"] * 2 ** (len(restarts) - 1)
        if now - restarts[-1] < wait:
            return None, f"backing off: next restart no sooner than {wait}s after the last"
    state["failures"] = 0
    restarts.append(now)
    state["total_restarts"] = state.get("total_restarts", 0) + 1
    return "restart", f"failed {policy['restart_after']} runs in a row"


# --- probes -------------------------------------------------------------------


def http(url, timeout, body=None, key=None, verify=True):
    """(status, seconds) of one request; status 0 when nothing answered."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    data = json.dumps(body).encode() if body is not None else None
    context = None
    if url.startswith("https:") and not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if not url.startswith(("http://", "https://")):
        return 0, 0.0
    started = time.monotonic()
    try:
        request = Request(url, data=data, headers=headers)  # noqa: S310 - http(s) only, checked above
        with urlopen(request, timeout=timeout, context=context) as answer:  # noqa: S310
            answer.read()
            return answer.status, time.monotonic() - started
    except HTTPError as exc:
        return exc.code, time.monotonic() - started
    except (URLError, OSError, ValueError):
        return 0, time.monotonic() - started


def inspect(container):
    """Docker's view of a container, or None when it does not exist."""
    result = subprocess.run(
        ["docker", "inspect", "--type", "container", container],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)[0]


def started_at(info):
    """Unix time the container last started (Docker gives RFC 3339 with nanoseconds)."""
    text = info["State"].get("StartedAt") or ""
    stamp = text.rstrip("Z").split(".", 1)[0]
    try:
        return (datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S") - datetime(1970, 1, 1)).total_seconds()
    except ValueError:
        return 0.0


def probe_body(engine):
    if engine.get("kind") == "embedding":
        return "/v1/embeddings", {"model": engine["name"], "input": "ping"}
    return "/v1/completions", {"model": engine["name"], "prompt": "ping", "max_tokens": 1}


def check_engine(engine, config, run, now):
    """One engine container: a result dict for the metrics and the decision."""
    result = {
        "engine": engine,
        "up": 0,
        "latency": None,
        "probe_ok": None,
        "starting": False,
        "problem": None,
    }
    info = inspect(engine["container"])
    if info is None:
        result["problem"] = "the container {} does not exist".format(engine["container"])
        return result
    result["docker_restarts"] = info.get("RestartCount", 0)
    running = info["State"].get("Running", False)
    result["starting"] = running and now - started_at(info) < engine.get("start_period", 0)
    if not running:
        result["problem"] = "the container {} is {}".format(engine["container"], info["State"].get("Status"))
        return result
    if not engine.get("url"):
        # A waiting rank of a model that spans hosts, whose group's API this
        # host cannot reach: its container running is what can be seen here.
        result["up"] = 1
        return result
    status, seconds = http(engine["url"] + "/health", config["timeout"])
    result["latency"] = seconds
    if status != 200:
        result["problem"] = "{}/health answered {}".format(engine["url"], status or "nothing")
        return result
    # A pool's probe would load a model meant to stay unloaded; a headless
    # rank's group is probed by rank 0's host.
    if (
        config["probe_every"]
        and run % config["probe_every"] == 0
        and not engine.get("pool")
        and not engine.get("headless")
    ):
        path, body = probe_body(engine)
        key = None
        if config.get("api_key_file"):
            try:
                with open(config["api_key_file"]) as handle:
                    key = handle.read().strip()
            except OSError as exc:
                result["problem"] = f"cannot read the engine key {config['api_key_file']}: {exc}"
                return result
        status, seconds = http(engine["url"] + path, config["probe_timeout"], body, key)
        result["probe_ok"] = status == 200
        result["probe_latency"] = seconds
        if status != 200:
            result["problem"] = "a 1-token request to {}{} answered {}".format(
                engine["url"],
                path,
                status or "nothing",
            )
            return result
    result["up"] = 1
    return result


def restart(container):
    result = subprocess.run(
        ["docker", "restart", container],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0, result.stderr.strip()


def check_service(name):
    return subprocess.run(["systemctl", "is-active", "--quiet", name], check=False).returncode == 0


# --- metrics ------------------------------------------------------------------


def _labels(pairs):
    if not pairs:
        return ""
    return "{{{}}}".format(
        ",".join('{}="{}"'.format(k, str(v).replace("\\", "\\\\").replace('"', '\\"')) for k, v in pairs)
    )


def render_metrics(engines, states, gateway, nginx, gpus, now):
    """node_exporter textfile format: HELP and TYPE once per metric, then the samples."""
    series = [
        ("cortex_model_up", "gauge", "1 when the engine container is running, healthy and answering"),
        ("cortex_model_health_latency_seconds", "gauge", "Time the engine's /health took"),
        ("cortex_model_consecutive_failures", "gauge", "Failed checks in a row"),
        ("cortex_model_starting", "gauge", "1 while the container is inside its start period"),
        ("cortex_model_restarts_total", "counter", "Restarts made by the health check"),
        ("cortex_model_container_restarts", "gauge", "Docker's restart count of the container"),
        ("cortex_model_probe_ok", "gauge", "1 when the last 1-token request succeeded"),
    ]
    samples = {name: [] for name, _kind, _help in series}
    for result in engines:
        engine = result["engine"]
        labels = _labels([("model", engine["name"]), ("engine", engine["engine"]),
                          ("container", engine["container"])])  # fmt: skip
        state = states.get(engine["container"], {})
        samples["cortex_model_up"].append((labels, result["up"]))
        if result["latency"] is not None:
            samples["cortex_model_health_latency_seconds"].append((labels, round(result["latency"], 6)))
        samples["cortex_model_consecutive_failures"].append((labels, state.get("failures", 0)))
        samples["cortex_model_starting"].append((labels, 1 if result["starting"] else 0))
        samples["cortex_model_restarts_total"].append((labels, state.get("total_restarts", 0)))
        if "docker_restarts" in result:
            samples["cortex_model_container_restarts"].append((labels, result["docker_restarts"]))
        if state.get("probe_ok") is not None:
            samples["cortex_model_probe_ok"].append((labels, 1 if state["probe_ok"] else 0))
    lines = []
    for name, kind, text in series:
        if samples[name]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value}" for labels, value in samples[name]]

    def gauge(name, text, value, labels=()):
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name}{_labels(labels)} {value}"])

    if gateway is not None:
        where = [("url", gateway["url"])]
        gauge("cortex_gateway_healthz_up", "1 when /healthz answers 200 through nginx", gateway["up"], where)
        gauge(
            "cortex_gateway_healthz_latency_seconds",
            "Time /healthz took",
            round(gateway["latency"], 6),
            where,
        )
    if nginx is not None:
        gauge("cortex_nginx_up", "1 when the nginx service is active", nginx)
    for name, field, text in (
        ("cortex_gpu_memory_used_bytes", "used", "GPU memory in use"),
        ("cortex_gpu_memory_total_bytes", "total", "GPU memory in all"),
    ):
        if gpus:
            lines.extend([f"# HELP {name} {text}", f"# TYPE {name} gauge"])
            lines.extend(
                f"{name}{_labels([('gpu', g['index']), ('name', g['name'])])} {g[field]}" for g in gpus
            )
    gauge("cortex_healthcheck_last_run_timestamp_seconds", "When the health check last ran", int(now))
    return "\n".join(lines) + "\n"


def gpu_memory():
    """Per GPU: index, name, used and total bytes (nvidia-smi); [] without one."""
    try:
        result = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.used,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        index, name, used, total = [part.strip() for part in line.split(",")]
        gpus.append({"index": index, "name": name, "used": int(used) << 20, "total": int(total) << 20})
    return gpus


def write_atomically(path, text):
    """node_exporter must never read half a file: write aside, then rename."""
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        os.makedirs(folder, 0o755)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o644)
    os.rename(temporary, path)


# --- one run ------------------------------------------------------------------


def run_once(config, now=None):
    """Check everything once; returns the exit status (1 when something is wrong)."""
    now = time.time() if now is None else now
    try:
        with open(config["state_file"]) as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        saved = {}
    run = saved.get("run", 0) + 1
    states = saved.get("containers", {})
    policy = config["policy"]
    problems = 0
    results = []
    checked = set()
    for engine in config.get("engines", []):
        # A pool's models share its container: checked once, by /health
        # alone (a probe would load a model that is meant to stay unloaded).
        if engine["container"] in checked:
            continue
        checked.add(engine["container"])
        if engine.get("pool"):
            engine = dict(engine, name="pool " + engine["pool"]["name"])
        result = check_engine(engine, config, run, now)
        results.append(result)
        state = states.setdefault(engine["container"], {})
        if result["probe_ok"] is not None:
            state["probe_ok"] = result["probe_ok"]
        action, reason = decide(state, result["up"] == 1, result["starting"], now, policy)
        if result["problem"]:
            level = INFO if result["starting"] else ERR
            problems += 0 if result["starting"] else 1
            log(
                level,
                "{} ({}): {}; {}".format(engine["name"], engine["container"], result["problem"], reason),
            )
        if action == "restart" and engine.get("spans"):
            # One rank restarted alone would wait for a group that is gone:
            # a converge stops and starts the whole group (playbooks/models.yml).
            log(
                ERR,
                "{}: {} is a rank of a model that spans hosts; not restarted alone: run playbooks/models.yml "
                "to start its group again".format(engine["name"], engine["container"]),
            )
        elif action == "restart":
            done, error = restart(engine["container"])
            if done:
                log(WARNING, "{}: restarted {}: {}".format(engine["name"], engine["container"], reason))
            else:
                log(ERR, "{}: could not restart {}: {}".format(engine["name"], engine["container"], error))
    # Containers no longer configured are forgotten.
    states = dict(
        (c, s) for c, s in states.items() if c in set(e["container"] for e in config.get("engines", []))
    )

    gateway = None
    if config.get("gateway_url"):
        status, seconds = http(
            config["gateway_url"], config["timeout"], verify=config.get("verify_tls", True)
        )
        gateway = {"url": config["gateway_url"], "up": 1 if status == 200 else 0, "latency": seconds}
        if status != 200:
            problems += 1
            log(ERR, "gateway: {} answered {}".format(config["gateway_url"], status or "nothing"))
    nginx = None
    if config.get("nginx_service"):
        nginx = 1 if check_service(config["nginx_service"]) else 0
        if not nginx:
            problems += 1
            log(ERR, "nginx: the service {} is not active".format(config["nginx_service"]))

    text = render_metrics(results, states, gateway, nginx, gpu_memory() if config.get("gpus") else [], now)
    write_atomically(os.path.join(config["textfile_dir"], "cortex_health.prom"), text)
    write_atomically(config["state_file"], json.dumps({"run": run, "containers": states}, indent=1))
    if not problems:
        log(INFO, f"all {len(results)} engine(s){' and the gateway' if gateway else ''} healthy")
    return 1 if problems else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cortex-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/cortex-healthcheck/config.json")
    # Backoffs and the hourly cap count from this time; tests step it instead
    # of sleeping. Unset: the system clock.
    parser.add_argument("--now", type=float, default=None, help="this run's time, in seconds since the epoch")
    args = parser.parse_args(argv)
    with open(args.config) as handle:
        config = json.load(handle)
    return run_once(config, now=args.now)


if __name__ == "__main__":
    sys.exit(main())
