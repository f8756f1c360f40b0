"""How long a worker waits before sending a failed batch again: tenacity wait strategies.

tenacity only computes the delays here: the worker loop (worker.py) drives the attempts and
never gives up, and an attempt's outcome stays an explicit value (`Outcome`), handed to the
strategies as the *result* of a `tenacity.RetryCallState` (not as an exception).

The policy (`Backoff`):
  transient failures (network, 408, 429, 5xx): full jitter, uniform between 0.5 s and
    min(retry_max, 0.5 s * 2**(attempt - 1)) (tenacity's wait_random_exponential);
  401/403/404 (Kind.AUTH) and a 413 on one small event (Kind.TOO_LARGE, a proxy's body
    limit): `auth_retry` ±20 %, slowly and loudly, forever;
  a Retry-After replaces the transient wait (longer or shorter), and only ever lengthens the
    slow one.

tenacity's random waits draw from the `random` module, which cannot be injected or seeded
per instance; the two random strategies below are tenacity wait strategies (wait_base) that
draw from an injected `random.Random` instead, one draw per delay (as before tenacity, so a
seeded sequence of delays is unchanged).
"""

from __future__ import annotations

import random
from typing import Protocol

import tenacity
from tenacity.wait import WaitBaseT, wait_base

from ..sinks import Kind, Outcome

BACKOFF_MIN = 0.5
# The slow wait (auth_retry) is jittered by this fraction either way.
SLOW_JITTER = 0.2
SLOW_KINDS = frozenset({Kind.AUTH, Kind.TOO_LARGE})

__all__ = [
    "BACKOFF_MIN",
    "Backoff",
    "RetryWait",
    "wait_by_kind",
    "wait_full_jitter",
    "wait_retry_after",
    "wait_uniform",
]


class RetryWait(Protocol):
    def delay(self, attempt: int, outcome: Outcome) -> float:
        """Seconds to wait before attempt `attempt + 1`, after `outcome`."""
        ...


def outcome_of(state: tenacity.RetryCallState) -> Outcome:
    """The Outcome the attempt of `state` ended with (its result)."""
    if state.outcome is None:
        raise RuntimeError("wait computed before the attempt had an outcome")
    result = state.outcome.result()
    if not isinstance(result, Outcome):
        raise TypeError(f"the attempt's result is not an Outcome: {result!r}")
    return result


class wait_full_jitter(tenacity.wait_random_exponential):
    """tenacity's wait_random_exponential ("Full Jitter"), drawing from `rng`.

    The window's top is wait_exponential's: max(min, min(multiplier * 2**(attempt - 1),
    max)), which also stays finite however many attempts there were."""

    def __init__(self, multiplier: float, max: float, min: float, rng: random.Random) -> None:
        super().__init__(multiplier=multiplier, max=max, min=min)
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        high = tenacity.wait_exponential.__call__(self, retry_state)
        return self.rng.uniform(self.min, high)


class wait_uniform(tenacity.wait_random):
    """tenacity's wait_random (uniform between min and max), drawing from `rng`."""

    def __init__(self, min: float, max: float, rng: random.Random) -> None:
        super().__init__(min=min, max=max)
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.rng.uniform(self.wait_random_min, self.wait_random_max)


class wait_retry_after(wait_base):
    """The Retry-After of the outcome when it has one, else `inner`'s wait.

    With `at_least_inner`, the longer of the two: the Retry-After cannot shorten it. `inner`
    is asked in every case, so that a random one draws once per delay whatever the answer.
    """

    def __init__(self, inner: WaitBaseT, *, at_least_inner: bool = False) -> None:
        self.inner = inner
        self.at_least_inner = at_least_inner

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        base = float(self.inner(retry_state))
        after = outcome_of(retry_state).retry_after
        if after is None:
            return base
        return max(after, base) if self.at_least_inner else after


class wait_by_kind(wait_base):
    """`slow`'s wait for the kinds in `slow_kinds`, `fast`'s for the others."""

    def __init__(
        self, slow: WaitBaseT, fast: WaitBaseT, slow_kinds: frozenset[Kind] = SLOW_KINDS
    ) -> None:
        self.slow = slow
        self.fast = fast
        self.slow_kinds = slow_kinds

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        slow = outcome_of(retry_state).kind in self.slow_kinds
        return float((self.slow if slow else self.fast)(retry_state))


class Backoff:
    """Full jitter between 0.5 s and an exponential cap; a Retry-After replaces it.

    401/403/404 wait `auth_retry` (±20 %): a wrong key or URL does not fix itself quickly,
    but giving up would destroy data, so it is retried slowly and loudly, forever. So does a
    413 on one small event (a proxy's body limit: see worker.judge).
    """

    def __init__(
        self, retry_max: float, auth_retry: float, rng: random.Random | None = None
    ) -> None:
        self.retry_max = retry_max
        self.auth_retry = auth_retry
        rng = rng or random.Random()
        self.wait: wait_base = wait_by_kind(
            slow=wait_retry_after(
                wait_uniform(auth_retry * (1 - SLOW_JITTER), auth_retry * (1 + SLOW_JITTER),
                             rng),
                at_least_inner=True,
            ),
            fast=wait_retry_after(
                wait_full_jitter(multiplier=BACKOFF_MIN, max=retry_max, min=BACKOFF_MIN,
                                 rng=rng),
            ),
        )
        # Only the owner of the call states the strategies are given (never run: the worker
        # drives the attempts, forever).
        self._retrying = tenacity.Retrying(wait=self.wait, stop=tenacity.stop_never)

    def delay(self, attempt: int, outcome: Outcome) -> float:
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempt
        state.set_result(outcome)
        return self.wait(state)
