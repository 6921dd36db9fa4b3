"""What the configuration holds for the request path's parts: one frozen
dataclass per policy (routing and prefix affinity, the breakers, per-key
limits, the queues). config.py builds them from the config file; the modules
that apply them (affinity, breaker, limits, queueing) import them from here,
so that the configuration never imports the code that uses it."""

from __future__ import annotations

from dataclasses import dataclass

# Routing policies a model may have.
LEAST_OUTSTANDING = "least_outstanding"
PREFIX_AFFINITY = "prefix_affinity"
# The replica with the least predicted time to first token (predict.py).
PREDICTED_TTFT = "predicted_ttft"
POLICIES = (LEAST_OUTSTANDING, PREFIX_AFFINITY, PREDICTED_TTFT)


@dataclass(frozen=True, slots=True)
class AffinitySettings:
    """The gateway-wide settings of prefix affinity."""

    # Words in the shared index (each 8 bytes; a conversation takes one per block).
    index_entries: int = 1 << 20
    # At most this many leading bytes of a conversation are hashed.
    prefix_bytes: int = 16384
    block_bytes: int = 1024
    # A client that names its session here (or in the `user` field) is routed by it.
    session_header: str = "X-Session-Id"


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """One model's routing: the policy, and when a busy preferred replica spills."""

    policy: str = PREFIX_AFFINITY
    # The preferred replica is passed over when its load (requests in flight
    # there and waiting for it) is at least this much above the least loaded
    # usable replica's ...
    spill_absolute: int = 4
    # ... and more than this many times as much.
    spill_relative: float = 1.5
    # When the preferred replica has no free slot but need not spill, a
    # request waits up to this many seconds for one there, then takes any.
    # Engines that finish requests often (many slots, fast prompts) free one
    # long before; it bounds the wait on a slow engine, or a stuck one. Half
    # the queue's max_wait bounds it too, so that the request then spills
    # rather than times out.
    home_wait: float = 20.0

    def spills(self, preferred: int, least: int) -> bool:
        """Is the preferred replica, with a load of ``preferred``, too busy
        beside the least loaded one, with ``least``?"""
        return preferred - least >= self.spill_absolute and preferred > self.spill_relative * least


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window: int = 20
    min_samples: int = 5
    failure_rate: float = 0.5
    cooldown: float = 10.0


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    models: frozenset[str] | None = None  # None: every model
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    per_slot: int = 4
    max_wait: float = 30.0


@dataclass(frozen=True, slots=True)
class FlowClass:
    """A priority class of client keys: who is served first when slots are short."""

    name: str
    # Lower is served first, as vLLM's own `priority` field counts (the
    # gateway passes it on to vLLM engines that schedule by priority).
    priority: int
    # Seconds a request of this class waits for a slot before a 429.
    max_wait: float
    # Slots of each model kept free for this class and the ones above it:
    # less important classes never take the last ones.
    reserved_slots: int = 0


# The classes every gateway has (a config may redefine them or add more).
INTERACTIVE, STANDARD, BATCH = "interactive", "standard", "batch"
BUILTIN_PRIORITIES = {INTERACTIVE: 0, STANDARD: 10, BATCH: 20}


@dataclass(frozen=True, slots=True)
class KeyFlow:
    """A client key's place in the queues: its class and its weight within it."""

    flow_class: str = STANDARD
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """How the models' queues order waiting requests.

    enabled: by class, then by each key's weighted share of the tokens served
    (the key with the least served per weight goes first); disabled: first
    come, first served, every key alike.
    """

    enabled: bool = True
    classes: tuple[FlowClass, ...] = ()
    default_class: str = STANDARD

    def named(self, name: str) -> FlowClass:
        for flow_class in self.classes:
            if flow_class.name == name:
                return flow_class
        raise KeyError(name)

    def above(self, flow_class: FlowClass) -> tuple[FlowClass, ...]:
        """The classes served before ``flow_class``."""
        return tuple(c for c in self.classes if c.priority < flow_class.priority)
