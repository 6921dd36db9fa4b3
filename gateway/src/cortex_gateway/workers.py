"""Serving: one process, or a supervisor and one worker per core.

Workers bind the same address with SO_REUSEPORT, so the kernel spreads new
connections over them and no process sits in the request path. The supervisor
only forks them, passes SIGHUP and SIGTERM on, and starts a worker again if
one dies. What the workers share:

- per-key limits: one counter table in a memory-mapped file (limits.CounterTable),
  so a key's requests per minute are the gateway's, not each worker's;
- the prefix-affinity index: a fixed-size table in a memory-mapped file
  (affinity.PrefixIndex), so a conversation's next turn finds the replica
  its last turn went to, whichever worker took either;
- drains: one small JSON file (drains.py); a worker that changes it sends the
  supervisor SIGUSR1, which passes it to every worker;
- metrics: prometheus_client's multiprocess files, so /metrics on any worker
  reports the whole gateway (metrics.py says how each series adds up);
- usage records: the same database (SQLite in WAL mode takes one writer at a
  time; each worker writes its own batches);
- the configuration: the supervisor checks the file on SIGHUP and keeps the
  last one it accepted in the runtime folder, which every worker reads, on a
  reload and when it is started again; a worker started after a reload never
  serves the configuration the gateway was started with.

- engine slots: one table of in-flight requests per backend (slots.SlotTable),
  so an engine never gets more requests at once than its slots, however many
  workers send to it; a dead worker's slots are given back by the supervisor.

What they do not share: each worker checks backend health and keeps its own
circuit breakers and waiting rooms (a queue's bound applies per worker; a
waiter also looks again every few hundredths of a second for a slot another
worker freed).

Started by systemd with socket activation (cortex-gateway.socket), the
workers accept on the listening socket systemd passed instead of binding
their own: the socket outlives the process, so while the gateway restarts,
new connections wait in its backlog instead of being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from .config import RESTART_FIELDS, ConfigError, GatewayConfig, admin_url, read_config, restart_key
from .drains import create_shared
from .slots import SlotTable

log = logging.getLogger(__name__)

# Signals held while a worker is forked (Supervisor._spawn says why).
HELD_ACROSS_FORK = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
# On SIGTERM, in-flight requests get this long to finish.
DRAIN_SECONDS = 30
# A worker that dies this often within a minute is not restarted again.
MAX_RESTARTS_PER_MINUTE = 5


# The first file descriptor systemd passes (sd_listen_fds(3)).
LISTEN_FDS_START = 3


def inherited_listener(config: GatewayConfig) -> socket.socket | None:
    """The public listening socket systemd passed this process, if it passed
    one (LISTEN_PID is this process and LISTEN_FDS at least 1)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS") or 0)
    # Not for the workers or anything else this process starts.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    listener = socket.socket(fileno=LISTEN_FDS_START)
    if listener.type != socket.SOCK_STREAM or not listener.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        raise ConfigError("the socket systemd passed is not a listening TCP socket")
    port = listener.getsockname()[1]
    if port != config.port:
        raise ConfigError(
            f"the socket systemd passed listens on port {port}, but listen.port is {config.port}: "
            "the socket unit and the config must name the same address"
        )
    return listener


def serve(config: GatewayConfig, config_path: str | None) -> int:
    try:
        log.info("event loop: %s", event_loop_choice())
        listener = inherited_listener(config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    publish_running(config)
    if listener is not None:
        log.info("serving on the socket systemd passed (%s:%d)", *listener.getsockname()[:2])
    if config.workers == 1:
        _run_worker(config, config_path, table_path=None, reuse_port=False, listener=listener)
        return 0
    return Supervisor(config, config_path, listener).run()


def _run_worker(
    config: GatewayConfig,
    config_path: str | None,
    table_path: str | None,
    reuse_port: bool,
    drains_path: str | None = None,
    listener: socket.socket | None = None,
    prefix_index_path: str | None = None,
    early_hangup: HangupLatch | None = None,
    slots: tuple[str, int] | None = None,
) -> None:
    # Imported here, after the supervisor has set PROMETHEUS_MULTIPROC_DIR:
    # prometheus_client decides where values live when it is first imported.
    from aiohttp import web

    from .admin import AdminApi, admin_listener
    from .app import Gateway
    from .limits import CounterTable

    table = CounterTable(table_path) if table_path else None
    # The engines' slots, counted with every other worker (path, this worker's number).
    slot_table = SlotTable(slots[0], config.workers, slots[1]) if slots else None
    gateway = Gateway(
        config,
        config_path=config_path,
        limits_table=table,
        drains_path=drains_path,
        prefix_index_path=prefix_index_path,
        early_hangup=early_hangup.taken if early_hangup is not None else None,
        slot_table=slot_table,
    )
    app = gateway.build_app()
    # The admin API on its own address, up while the public app is.
    app.cleanup_ctx.append(
        admin_listener(AdminApi(gateway), config.admin_host, config.admin_port, reuse_port=reuse_port)
    )
    where = {"sock": listener} if listener is not None else {"host": config.host, "port": config.port}
    web.run_app(
        app,
        loop=new_event_loop(),
        **where,
        reuse_port=reuse_port,
        access_log=None,
        # A client that hangs up cancels its handler, and with it the
        # upstream request: the engine stops generating for nobody.
        handler_cancellation=True,
        shutdown_timeout=DRAIN_SECONDS,
        print=lambda *_: None,
    )


def publish_running(config: GatewayConfig) -> None:
    """Under systemd (RuntimeDirectory=), say what this gateway runs with, for
    the roles: where its admin API answers (drains go there, whatever the
    inventory now says) and the digest of what only a restart changes (a
    converge restarts instead of reloading when the new config's differs).
    systemd removes the folder when the gateway stops."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if not runtime:
        return
    Path(runtime).mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, text in (("admin-url", admin_url(config)), ("restart-key", restart_key(config))):
        path = Path(runtime) / name
        partial = path.with_suffix(".partial")
        partial.write_text(text + "\n")
        partial.replace(path)


# The event loop the workers run: uvloop (libuv) unless this says "asyncio".
EVENT_LOOP_VARIABLE = "CORTEX_GATEWAY_EVENT_LOOP"


def event_loop_choice() -> str:
    """uvloop by default: it takes CPU time off every request (tests/bench/gateway).
    CORTEX_GATEWAY_EVENT_LOOP=asyncio runs asyncio's own, to compare or to rule uvloop out."""
    choice = os.environ.get(EVENT_LOOP_VARIABLE, "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise ConfigError(f"{EVENT_LOOP_VARIABLE}: must be uvloop or asyncio, got {choice!r}")
    return choice


def new_event_loop() -> asyncio.AbstractEventLoop:
    if event_loop_choice() == "asyncio":
        return asyncio.new_event_loop()
    import uvloop

    return uvloop.new_event_loop()


class Supervisor:
    def __init__(
        self, config: GatewayConfig, config_path: str | None, listener: socket.socket | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        # Kept open here for workers started again later.
        self.listener = listener
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self.deaths: list[float] = []

    def run(self) -> int:
        # systemd's RuntimeDirectory= when run as the service, else a private one.
        runtime = Path(os.environ.get("RUNTIME_DIRECTORY") or tempfile.mkdtemp(prefix="cortex-gateway-"))
        metrics_dir = runtime / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)  # a previous run's samples are not ours
        metrics_dir.mkdir(mode=0o700, parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        table_path = runtime / "limits"
        table_path.unlink(missing_ok=True)
        self.table_path = str(table_path)
        # A new table each start: replicas' ids and the index's size may have changed.
        prefix_index_path = runtime / "prefix-index"
        prefix_index_path.unlink(missing_ok=True)
        self.prefix_index_path = str(prefix_index_path)
        # The engines' slots, counted across the workers: new each start, and a
        # dead worker's row emptied before it starts again.
        slots_path = runtime / "slots"
        slots_path.unlink(missing_ok=True)
        self.slots_path = str(slots_path)
        self.slot_table = SlotTable(self.slots_path, self.config.workers, 0)
        if self.config_path is not None:
            self.accepted_path = runtime / "config.yml"
            self._accept(read_config(self.config_path)[1])
        self.drains_path = create_shared(runtime / "drains.json")

        from prometheus_client import multiprocess  # after the variable is set

        # Import the app once here, so that each forked worker starts in
        # milliseconds and shares these pages until it writes to them.
        importlib.import_module(".app", __package__)

        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hangup)
        signal.signal(signal.SIGUSR1, self._on_drains_changed)
        log.info("starting %d workers on %s:%d", self.config.workers, self.config.host, self.config.port)
        for number in range(self.config.workers):
            if self.stopping:
                break  # stopped while starting: no worker more to stop
            self._spawn(number)
        status = 0
        while self.children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            number = self.children.pop(pid, None)
            if number is None:
                continue
            multiprocess.mark_process_dead(pid, str(metrics_dir))
            self.slot_table.clear_worker(number)  # its requests died with it
            code = os.waitstatus_to_exitcode(wait_status)
            if self.stopping:
                continue
            log.error("worker %d (pid %d) ended with %s; starting it again", number, pid, _describe(code))
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < 60] + [now]
            if len(self.deaths) > MAX_RESTARTS_PER_MINUTE:
                log.error("workers died %d times within a minute; stopping", len(self.deaths))
                status = 1
                self._on_stop(signal.SIGTERM, None)
                continue
            self._spawn(number)
        if runtime.name.startswith("cortex-gateway-"):
            shutil.rmtree(runtime, ignore_errors=True)
        return status

    def _spawn(self, number: int) -> None:
        # SIGHUP stays blocked across the fork, so a reload sent while the
        # worker starts is held for it (not lost, and not its default action,
        # which would end it) until its latch is in place. SIGTERM and SIGINT
        # too: a stop that comes between the fork and the supervisor noting
        # the child reaches the supervisor once it has, so it is passed on to
        # this worker (it was not, and the worker served on until systemd
        # killed it); the worker takes its own from its default action on.
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_ACROSS_FORK)
        pid = os.fork()
        if pid:
            self.children[pid] = number
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_ACROSS_FORK)
            return
        # The worker. Its own process group: a Ctrl-C in a terminal or a kill of
        # the group reaches the supervisor only, which passes it on once (a
        # second SIGTERM would cut a worker's drain short). And it ends with
        # the supervisor, however that ends.
        os.setpgid(0, 0)
        _end_with_parent()
        # Default stop signals until aiohttp installs its own. A SIGHUP before
        # the app listens for it is kept, and the app reloads once it does:
        # the worker may have been forked with the config that reload replaced.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        hangup = HangupLatch()
        signal.signal(signal.SIGHUP, hangup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_ACROSS_FORK)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the app reads the drains file at start
        code = 0
        try:
            accepted = None if self.config_path is None else str(self.accepted_path)
            _run_worker(
                self.config,
                accepted,
                self.table_path,
                True,
                self.drains_path,
                self.listener,
                prefix_index_path=self.prefix_index_path,
                early_hangup=hangup,
                slots=(self.slots_path, number),
            )
        except BaseException:  # a worker reports and exits; never returns into the supervisor
            log.exception("worker %d failed", number)
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _forward(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _on_stop(self, sig: int, _frame: object) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM)

    def _accept(self, text: bytes) -> None:
        """Make ``text`` the configuration workers read: written whole, then renamed."""
        partial = self.accepted_path.with_suffix(".partial")
        partial.write_bytes(text)
        partial.chmod(0o600)
        partial.replace(self.accepted_path)

    def _on_hangup(self, _sig: int, _frame: object) -> None:
        """Check the config file; if it is good, it is what every worker serves from now on."""
        if self.config_path is None:
            return
        try:
            config, text = read_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload failed, every worker keeps the running config: %s", exc)
            return
        # A worker started again must fit beside the running ones: what only
        # a restart changes stays as the gateway started.
        self.config = dataclasses.replace(config, **{f: getattr(self.config, f) for f in RESTART_FIELDS})
        self._accept(text)
        log.info("config from %s accepted: %d model(s); every worker reloads it", self.config_path,
                 len(config.models))  # fmt: skip
        self._forward(signal.SIGHUP)

    def _on_drains_changed(self, _sig: int, _frame: object) -> None:
        # A worker changed the drains file (an admin request): every worker reads it.
        self._forward(signal.SIGUSR1)


class HangupLatch:
    """A worker's SIGHUP handler until its app takes SIGHUP over: notes that a
    reload was asked for (``taken()`` answers once)."""

    def __init__(self) -> None:
        self.pending = False

    def __call__(self, _sig: int, _frame: object) -> None:
        self.pending = True

    def taken(self) -> bool:
        pending, self.pending = self.pending, False
        return pending


def _end_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's stop still reaches it
        log.debug("cannot ask to be stopped with the supervisor")


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"
