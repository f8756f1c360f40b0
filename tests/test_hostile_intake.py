"""A misbehaving intake (or a proxy in front of it) against the real daemon: answers that
trickle, huge answers, 413 from a body limit in between, answers echoing the request (key).

One daemon for the module (concurrency 1: answers are forced in the order requests come).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from devtools.daemon import Daemon, base_config
from devtools.probe import metric, peak_rss, steady, wait_until
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder.delivery import Backoff
from haproxy_forwarder.sinks import Kind, Outcome
from tests.conftest import intake_section
from tests.fake_intake import VALID_KEY, FakeIntake

TIMEOUT = 2.0  # intake.timeout
AUTH_RETRY = 0.3


@pytest.fixture(scope="module")
def intake() -> Iterator[FakeIntake]:
    with FakeIntake() as fi:
        yield fi


@pytest.fixture(scope="module")
def daemon(intake: FakeIntake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("hostile-intake")
    cfg = base_config(tmp, intake=intake_section(
        intake, timeout=TIMEOUT, auth_retry=AUTH_RETRY, retry_max=0.5, concurrency=1,
        gzip=False))
    with Daemon(tmp, cfg) as d:
        yield d


@pytest.fixture(autouse=True)
def _fresh(intake: FakeIntake) -> None:
    intake.reset()


def send(d: Daemon, text: str) -> None:
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", text)]))


def test_trickling_answer_ends_at_the_request_deadline(intake: FakeIntake,
                                                       daemon: Daemon) -> None:
    # 200 bytes at one every 0.5 s: each read is well within intake.timeout, the whole
    # answer would take 100 s.
    intake.inject(503, body=b'{"message": "' + b"x" * 186 + b'"}', trickle=0.5)
    before = len(daemon.events("intake_retry"))
    send(daemon, "after a trickling answer")
    assert intake.wait_for_requests(0) and wait_until(lambda: intake.requests, 10)
    # The whole answer would take 100 s: a retry within intake.timeout (and a margin for a
    # loaded machine) means the deadline was the request's, not each read's.
    assert wait_until(lambda: len(daemon.events("intake_retry")) > before, TIMEOUT + 5,
                      what="the retry of the request cut at intake.timeout")
    retry = daemon.events("intake_retry")[-1]
    assert retry["status"] == 503  # classified by its status line, with what came of the rest
    assert intake.wait_for(1, 10)
    assert intake.event_texts() == ["after a trickling answer"]


def test_huge_answers_are_not_read_into_memory(intake: FakeIntake, daemon: Daemon) -> None:
    huge = 300 << 20
    # A huge 200: delivered (not sent again); then a huge 503: retried, then delivered.
    intake.inject(200, size=huge)
    send(daemon, "answered by 300 MB")
    assert wait_until(lambda: len(intake.requests) == 1 and intake.requests[0]["status"], 10)
    intake.inject(503, size=huge)
    send(daemon, "then 300 MB of 503")
    assert intake.wait_for(1, 15)
    # A re-send of the first would show up as a request: none comes over a quiet window.
    wait_until(steady(lambda: len(intake.requests), 0.3), 10, what="the intake's requests settled")
    assert intake.event_texts() == ["then 300 MB of 503"]
    assert [r["status"] for r in intake.requests] == [200, 503, 200]
    # The old client read each answer whole: ~1 GB peak for one of them.
    assert peak_rss(daemon.pid) / 2**20 < 150


def test_413_on_one_small_event_is_kept_and_retried_slowly(intake: FakeIntake,
                                                           daemon: Daemon) -> None:
    refused_before = metric(daemon.status_port, "body_limit_refusals_total")
    errors_before = len(daemon.events("intake_body_limit_check_proxy"))
    intake.inject(413, times=3, body=b"<html>413 Request Entity Too Large</html>")
    send(daemon, "behind a proxy with a small body limit")
    assert intake.wait_for(1, 10), "dead-lettered instead of kept"
    assert intake.event_texts() == ["behind a proxy with a small body limit"]
    statuses = [(r["status"], r["time"]) for r in intake.requests]
    assert [s for s, _ in statuses] == [413, 413, 413, 200]
    # Waits of intake.auth_retry (±20 %), not the fast backoff of transient failures.
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(statuses)]
    assert min(gaps) >= AUTH_RETRY * 0.8 - 0.05
    errors = daemon.events("intake_body_limit_check_proxy")[errors_before:]
    assert len(errors) == 1 and errors[0]["level"] == "error"  # once for the episode
    assert metric(daemon.status_port, "body_limit_refusals_total") == refused_before + 3
    dead = daemon.tmp / "spool" / "dead-letter"
    assert not any("small body limit" in p.read_text() for p in dead.glob("*.jsonl"))


def test_key_echoed_in_a_400_is_scrubbed_from_the_dead_letter(intake: FakeIntake,
                                                              daemon: Daemon) -> None:
    intake.inject(400, echo=True)
    send(daemon, "echoed back with the key")
    assert wait_until(lambda: daemon.events("dead_lettered"), 10)
    files = list((daemon.tmp / "spool" / "dead-letter").glob("*.jsonl"))
    text = "".join(p.read_text() for p in files)
    assert "echoed back with the key" in text  # the answer (and the event) are there
    assert VALID_KEY not in text
    assert '"response":"{\\"message\\":\\"Bad request\\"' in text
    assert "********" in text  # where the key was
    assert VALID_KEY not in daemon.stderr_text()


def test_backoff_waits_auth_retry_after_a_body_limit() -> None:
    wait = Backoff(retry_max=60.0, auth_retry=100.0)
    assert 80 <= wait.delay(1, Outcome(Kind.TOO_LARGE, 413)) <= 120


def test_key_cut_by_the_detail_limit_is_not_left_half_shown(intake: FakeIntake) -> None:
    """The detail kept of an answer is its first 500 characters: scrubbing after the cut
    would leave the first part of a key that straddles it."""
    import asyncio

    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient

    intake.inject(400, body=b"x" * 490 + VALID_KEY.encode() + b" echoed")
    client = IntakeClient(IntakeConfig(**intake_section(intake)))

    async def post() -> Outcome:
        try:
            return await client.post(b"[]")
        finally:
            await client.aclose()

    outcome = asyncio.run(post())
    assert outcome.kind is Kind.REJECTED and outcome.status == 400
    assert outcome.detail.startswith("x" * 490)
    assert VALID_KEY[:10] not in outcome.detail
