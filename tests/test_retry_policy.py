"""The retry policy (delivery/retry.py, tenacity wait strategies): the delays it gives, over
many seeded draws, and a worker that really waits them (through its `sleep=` seam).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from haproxy_forwarder.batching import Batch
from haproxy_forwarder.delivery import Backoff
from haproxy_forwarder.delivery.retry import BACKOFF_MIN, RetryWait
from haproxy_forwarder.delivery.router import Entry, Router
from haproxy_forwarder.delivery.worker import Worker
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks import Kind, Outcome
from tests.recording import Log

RETRY_MAX = 60.0
AUTH_RETRY = 100.0
DRAWS = 2000
SEEDS = range(5)
TRANSIENT = Outcome(Kind.RETRY, 503, "unavailable")
TIMEOUT = Outcome(Kind.RETRY, None, "ReadTimeout", uncertain=True)
NOT_SENT = Outcome(Kind.NOT_SENT)
SLOW = [Outcome(Kind.AUTH, 401, "bad key"), Outcome(Kind.AUTH, 403), Outcome(Kind.AUTH, 404),
        Outcome(Kind.TOO_LARGE, 413, "body limit")]


def window(attempt: int, retry_max: float = RETRY_MAX) -> float:
    """The top of the full-jitter window after `attempt` failed attempts."""
    return max(BACKOFF_MIN, min(retry_max, BACKOFF_MIN * 2.0 ** min(attempt - 1, 64)))


def draws(wait: Backoff, attempt: int, outcome: Outcome, n: int = DRAWS) -> list[float]:
    return [wait.delay(attempt, outcome) for _ in range(n)]


# -- transient failures: full jitter ------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_full_jitter_stays_between_half_a_second_and_the_doubling_window(seed: int) -> None:
    wait = Backoff(RETRY_MAX, AUTH_RETRY, random.Random(seed))
    assert draws(wait, 1, TRANSIENT, 50) == [BACKOFF_MIN] * 50  # the first window is 0.5 s
    for attempt in range(2, 12):
        top = window(attempt)
        for outcome in (TRANSIENT, TIMEOUT, NOT_SENT):
            got = draws(wait, attempt, outcome)
            assert min(got) >= BACKOFF_MIN and max(got) <= top, (attempt, outcome)
            # Full jitter: the whole window is used, not a point in it.
            spread = top - BACKOFF_MIN
            assert min(got) < BACKOFF_MIN + 0.05 * spread, (attempt, outcome)
            assert max(got) > top - 0.05 * spread, (attempt, outcome)


@pytest.mark.parametrize("seed", SEEDS)
def test_each_delay_is_one_draw_of_the_injected_rng(seed: int) -> None:
    """Seeded, the delays are exactly uniform(0.5, window) drawn from the rng given (not from
    the `random` module, whose state is disturbed here in between)."""
    wait = Backoff(RETRY_MAX, AUTH_RETRY, random.Random(seed))
    reference = random.Random(seed)
    for attempt in [*range(1, 15), 3, 1, 40]:
        random.seed(attempt)  # the module's generator must play no part
        random.random()
        assert wait.delay(attempt, TRANSIENT) == reference.uniform(BACKOFF_MIN, window(attempt))
        auth = wait.delay(attempt, SLOW[0])
        assert auth == pytest.approx(reference.uniform(0.8 * AUTH_RETRY, 1.2 * AUTH_RETRY))
    # Same seed, same delays; another seed, others.
    a, b, c = (Backoff(RETRY_MAX, AUTH_RETRY, random.Random(s)) for s in (seed, seed, seed + 9))
    seq = [(n, o) for n in range(1, 30) for o in (TRANSIENT, SLOW[0])]
    assert [a.delay(n, o) for n, o in seq] == [b.delay(n, o) for n, o in seq]
    assert [a.delay(n, o) for n, o in seq] != [c.delay(n, o) for n, o in seq]


@pytest.mark.parametrize("retry_max", [0.5, 3.0, 7.3, 60.0, 3600.0])
def test_retry_max_caps_the_window_however_many_attempts(retry_max: float) -> None:
    wait = Backoff(retry_max, AUTH_RETRY, random.Random(7))
    for attempt in [1, 2, 3, 4, 5, 8, 13, 20, 64, 100, 1100, 5000, 10**6]:
        # Past ~1025 attempts (hours of one outage) 0.5 * 2**(attempt-1) no longer fits a float:
        # the window must stay retry_max, not raise.
        got = draws(wait, attempt, TRANSIENT, 500)
        top = window(attempt, retry_max)
        assert min(got) >= BACKOFF_MIN and max(got) <= top, attempt
        if top >= 2 * BACKOFF_MIN:
            assert max(got) > 0.9 * top, attempt  # the cap is reached, not undershot
    assert max(draws(wait, 1000, TRANSIENT)) <= retry_max


# -- Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_retry_after_replaces_the_transient_wait(seed: int) -> None:
    wait = Backoff(RETRY_MAX, AUTH_RETRY, random.Random(seed))
    for attempt in (1, 2, 5, 30):
        for after in (0.0, 0.1, 2.0, 45.0, 600.0):  # shorter, inside, longer than retry_max
            o = Outcome(Kind.RETRY, 429, retry_after=after)
            assert draws(wait, attempt, o, 50) == [after] * 50, (attempt, after)
        assert draws(wait, attempt, Outcome(Kind.RETRY, 503, retry_after=3.0), 20) == [3.0] * 20


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", [Kind.AUTH, Kind.TOO_LARGE])
def test_retry_after_never_shortens_the_slow_wait(seed: int, kind: Kind) -> None:
    wait = Backoff(RETRY_MAX, AUTH_RETRY, random.Random(seed))
    for after in (0.0, 1.0, 79.9):  # all below the slow wait: it stands
        got = draws(wait, 1, Outcome(kind, 401, retry_after=after))
        assert min(got) >= 0.8 * AUTH_RETRY and max(got) <= 1.2 * AUTH_RETRY
        assert min(got) < 0.82 * AUTH_RETRY and max(got) > 1.18 * AUTH_RETRY
    for after in (120.5, 500.0):  # above it: the Retry-After is waited
        assert draws(wait, 3, Outcome(kind, 413, retry_after=after), 50) == [after] * 50
    # In between: the longer of the two, each time.
    got = draws(wait, 2, Outcome(kind, 403, retry_after=AUTH_RETRY))
    assert min(got) == AUTH_RETRY and max(got) > 1.18 * AUTH_RETRY
    assert all(AUTH_RETRY <= d <= 1.2 * AUTH_RETRY for d in got)


# -- 401/403/404 and 413 on one event: auth_retry ±20 % -----------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("auth_retry", [0.1, 60.0, AUTH_RETRY, 3600.0])
def test_refused_key_and_body_limit_wait_auth_retry_within_20_percent(
    seed: int, auth_retry: float
) -> None:
    wait = Backoff(RETRY_MAX, auth_retry, random.Random(seed))
    for outcome in SLOW:
        for attempt in (1, 2, 10, 1000):  # no exponential growth on the slow path
            got = draws(wait, attempt, outcome, 500)
            assert min(got) >= 0.8 * auth_retry and max(got) <= 1.2 * auth_retry
            assert min(got) < 0.83 * auth_retry and max(got) > 1.17 * auth_retry
            assert sum(got) / len(got) == pytest.approx(auth_retry, rel=0.03)


def test_the_slow_path_is_not_capped_by_retry_max_nor_the_fast_one_by_auth_retry() -> None:
    wait = Backoff(retry_max=1.0, auth_retry=3600.0, rng=random.Random(3))
    assert min(draws(wait, 1, SLOW[0])) >= 0.8 * 3600.0
    assert max(draws(wait, 50, TRANSIENT)) <= 1.0
    wait = Backoff(retry_max=3600.0, auth_retry=0.1, rng=random.Random(3))
    assert max(draws(wait, 1, SLOW[3])) <= 0.12
    assert max(draws(wait, 30, TRANSIENT)) > 3000.0


# -- a worker waits what the policy says --------------------------------------------------------


class Recorded:
    """The policy, with what it was asked and what it answered kept."""

    def __init__(self, inner: RetryWait) -> None:
        self.inner = inner
        self.answers: list[tuple[int, Kind, float]] = []

    def delay(self, attempt: int, outcome: Outcome) -> float:
        d = self.inner.delay(attempt, outcome)
        self.answers.append((attempt, outcome.kind, d))
        return d


class Host:
    """worker.Host without a spool: the router in memory only."""

    def __init__(self) -> None:
        self.router = Router(now=lambda: 0.0, spool_ready=None, write_ahead=False,
                             max_in_flight=10, on_pressure=lambda on: None)
        self.counters = Counters()
        self.log = Log()
        self.wake_workers = asyncio.Event()
        self.wake_writer = asyncio.Event()
        self.body_limit_reported = False

    def mark_progress(self) -> None:
        pass

    def dead_letter(self, batch: Batch, reason: str, status: int | None,
                    response: str) -> asyncio.Future[bool]:
        raise AssertionError(f"nothing is dead-lettered here: {reason}")

    async def next_record(self) -> tuple[int, Batch] | None:
        return None

    async def claim(self, entry: Any, batch: Batch) -> None:
        raise AssertionError("no spool, nothing to claim")

    async def ack(self, record: int) -> None:
        raise AssertionError("no spool, nothing to ack")

    def spool_fields(self) -> dict[str, Any]:
        return {}


class ScriptedSink:
    def __init__(self, script: list[Outcome], timeline: list[tuple[str, Any]]) -> None:
        self.script = script
        self.timeline = timeline

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        outcome = self.script.pop(0) if self.script else Outcome(Kind.DELIVERED, 200)
        self.timeline.append(("send", outcome.kind))
        return [(batch, outcome)]

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("seed", SEEDS)
def test_a_worker_sleeps_exactly_the_delays_of_the_policy(seed: int) -> None:
    script = [
        TRANSIENT,
        TIMEOUT,
        Outcome(Kind.RETRY, 429, retry_after=7.0),
        Outcome(Kind.AUTH, 401, "bad key"),
        Outcome(Kind.TOO_LARGE, 413, "body limit"),  # one small event: kept, retried slowly
        Outcome(Kind.AUTH, 403, retry_after=500.0),
        TRANSIENT,
    ]
    timeline: list[tuple[str, Any]] = []

    async def sleep(seconds: float) -> None:
        timeline.append(("sleep", seconds))

    policy = Recorded(Backoff(RETRY_MAX, AUTH_RETRY, random.Random(seed)))

    async def main() -> None:
        host = Host()
        worker = Worker(0, host, ScriptedSink(list(script), timeline), policy, sleep=sleep)
        batch = Batch.from_events(["one event"], [b"2024-05-01T12:00:00.000Z"])
        host.router.submit(batch)
        entry = host.router.take(0)
        assert isinstance(entry, Entry)
        await worker.deliver(entry)
        assert host.counters.delivered_events == 1 and host.counters.retries == len(script)

    asyncio.run(asyncio.wait_for(main(), 10))
    kinds = [o.kind for o in script]
    # The policy was asked after each failed attempt, numbered from 1 ...
    assert [(a, k) for a, k, _ in policy.answers] == list(
        zip(range(1, len(script) + 1), kinds, strict=True))
    # ... and the worker slept what it answered, between that attempt and the next one.
    expected: list[tuple[str, Any]] = []
    for kind, (_, _, d) in zip(kinds, policy.answers, strict=True):
        expected += [("send", kind), ("sleep", d)]
    assert timeline == [*expected, ("send", Kind.DELIVERED)]
    # Those delays are the policy's: within their bounds.
    slept = [d for _, _, d in policy.answers]
    assert slept[0] == BACKOFF_MIN and BACKOFF_MIN <= slept[1] <= 1.0 and slept[2] == 7.0
    assert all(0.8 * AUTH_RETRY <= d <= 1.2 * AUTH_RETRY for d in slept[3:5])
    assert slept[5] == 500.0 and BACKOFF_MIN <= slept[6] <= window(7)
