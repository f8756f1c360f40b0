"""End to end: the daemon started through its CLI, real sockets in, the fake HTTPS intake out."""

from __future__ import annotations

import collections
import re
import signal
import socket
from collections.abc import Callable

import pytest

from devtools.daemon import Daemon
from devtools.probe import samples, wait_at_rest, wait_until
from devtools.traffic import (
    haproxy_line,
    lf_framed,
    mixed_stream,
    octet_counted,
    rfc5424,
    send_tcp,
    send_udp,
    traditional,
)
from tests.fake_intake import FakeIntake

MakeDaemon = Callable[..., Daemon]
RECEIVED_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def assert_exactly(intake: FakeIntake, d: Daemon, expected: list[str], frames: int = 0,
                   timeout: float = 60.0) -> None:
    """The intake got `expected`, each once, once the daemon has read `frames` messages and
    has nothing left to send (so anything extra, a duplicate or a filtered message, is there)."""
    assert intake.wait_for(len(expected), timeout), (
        f"only {len(intake.events)} of {len(expected)} events arrived"
    )
    wait_at_rest(d.status_port, frames, detail=d.stderr_text)
    got = collections.Counter(e.event for e in intake.events)
    want = collections.Counter(expected)
    assert got == want, (
        f"missing {list((want - got).elements())[:3]}, extra {list((got - want).elements())[:3]}"
    )


def test_100k_octet_counted_frames_one_connection(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    frames, expected = mixed_stream(100_000)
    send_tcp(d.tcp_port, octet_counted(frames))
    assert_exactly(intake, d, expected, len(frames))
    # No header time zone in the traditional format: the reception time, UTC, milliseconds.
    assert all(RECEIVED_TS.match(e.timestamp or "") for e in intake.events)
    assert {e.endpoint for e in intake.events} == {"/array"}
    # Bodies are gzip-compressed by default.
    assert all(r["content_encoding"] == "gzip" for r in intake.requests)
    assert d.stop() == 0


def test_rfc5424_keeps_header_time(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    frames, expected = mixed_stream(20_000, fmt="rfc5424")
    send_tcp(d.tcp_port, octet_counted(frames))
    assert_exactly(intake, d, expected, len(frames))
    assert {e.timestamp for e in intake.events} == {"2026-11-26T21:58:51.123456+01:00"}


def test_lf_framing(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    frames, expected = mixed_stream(20_000)
    send_tcp(d.tcp_port, lf_framed(frames))
    assert_exactly(intake, d, expected, len(frames))


def test_lf_final_frame_without_trailer_is_delivered(intake: FakeIntake,
                                                     daemon: MakeDaemon) -> None:
    d = daemon(intake)
    send_tcp(d.tcp_port, traditional("haproxy", "first").__add__(b"\n")
             + traditional("haproxy", "last, no LF"))
    assert_exactly(intake, d, ["first", "last, no LF"], 2)


def test_udp(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    frames, expected = mixed_stream(5_000)
    send_udp(d.udp_port, (f + b"\n" for f in frames))
    assert_exactly(intake, d, expected, len(frames))


def test_transient_errors_then_retry_after_nothing_lost_nothing_doubled(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.inject(503, times=3)
    intake.inject(429, headers={"Retry-After": "1"})
    d = daemon(intake, batch={"max_events": 1000})
    frames, expected = mixed_stream(3_000)
    send_tcp(d.tcp_port, octet_counted(frames))
    assert_exactly(intake, d, expected, len(frames))
    # A keep-alive connection the server closed can add a status-less retry: not counted here.
    statuses = [r["status"] for r in intake.requests if r["status"] is not None]
    assert statuses[:4] == [503, 503, 503, 429]
    # Each refusal is logged once. Several batches are in flight at once, so the daemon logs
    # them in the order their answers reach the loop, which need not be the intake's order.
    retries = [r for r in d.events("intake_retry") if r["status"] is not None]
    assert sorted(r["status"] for r in retries) == [429, 503, 503, 503]
    (throttled,) = (r for r in retries if r["status"] == 429)
    assert throttled["retry_in"] >= 1.0  # the Retry-After was honoured


def test_hapee_tag_kept_and_text_normalised(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    frames = [
        b'<134>Nov 26 21:58:51 lb1 hapee-lb[16320]: [ACCESS] 2022 {"ctn":"html"}',
        b"<134>Nov 26 21:58:51 lb1 haproxy[1]:    leading spaces\r\n\x00",
        b"<134>Nov 26 21:58:51 lb1 haproxy[1]: \xef\xbb\xbfbom dropped",
        b"<134>Nov 26 21:58:51 lb1 haproxy[1]: bad \xff utf-8",
        b"<134>Nov 26 21:58:51 lb1 haproxy[1]: line one\nline two",
        b"<134>Nov 26 21:58:51 lb1 haproxyish[1]: prefix match counts",
        b"<134>Nov 26 21:58:51 lb1 nginx[1]: not haproxy",
    ]
    send_tcp(d.tcp_port, octet_counted(frames))
    assert_exactly(intake, d, [
        'hapee-lb[16320]: [ACCESS] 2022 {"ctn":"html"}',
        "leading spaces",
        "bom dropped",
        "bad \ufffd utf-8",
        "line one\nline two",
        "prefix match counts",
    ], len(frames))


def test_event_over_250k_goes_to_dead_letter(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    big = "x" * (250 * 1024 + 1)
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", big),
                                        traditional("haproxy", "small one")]))
    assert_exactly(intake, d, ["small one"], 2)
    files = list((d.tmp / "spool" / "dead-letter").glob("*.jsonl"))
    assert len(files) == 1
    text = files[0].read_text()
    assert big in text and "250 KiB" in text
    assert d.wait_log("dead_lettered")["events"] == 1


def test_400_dead_letters_the_batch(intake: FakeIntake, daemon: MakeDaemon) -> None:
    intake.inject(400, body=b'{"message": "bad request"}')
    d = daemon(intake)
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "refused one")]))
    rec = d.wait_log("dead_lettered")
    assert rec["status"] == 400
    text = next((d.tmp / "spool" / "dead-letter").glob("*.jsonl")).read_text()
    assert "refused one" in text and "bad request" in text
    assert intake.events == []


def test_413_splits_the_batch(intake: FakeIntake, daemon: MakeDaemon) -> None:
    intake.inject(413)
    d = daemon(intake, batch={"max_delay": 0.5})
    lines = [haproxy_line(i) for i in range(10)]
    send_tcp(d.tcp_port, octet_counted(traditional("haproxy", x) for x in lines))
    assert_exactly(intake, d, lines, len(lines))
    assert [r["n_events"] for r in intake.requests if r["status"] == 200] == [5, 5]


def test_wrong_key_is_retried_loudly_and_flows_once_fixed(intake: FakeIntake,
                                                          daemon: MakeDaemon) -> None:
    intake.inject(401, times=2)
    d = daemon(intake, intake={"auth_retry": 0.2})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "kept through 401")]))
    assert_exactly(intake, d, ["kept through 401"], 1)
    errors = d.events("intake_refused_check_config")
    assert len(errors) == 2 and errors[0]["level"] == "error"


def test_other_programs_do_not_arrive(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    send_tcp(d.tcp_port, octet_counted([traditional("sshd", "no"), traditional("haproxy", "yes"),
                                        rfc5424("cron", "no"), rfc5424("haproxy", "yes too")]))
    assert_exactly(intake, d, ["yes", "yes too"], 4)
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["filtered_out"] == 2 and stopped["accepted_events"] == 2


def test_sigterm_flushes_open_batch_and_exits_0(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake, batch={"max_delay": 60.0, "idle_flush": 60.0})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "in the open batch")]))
    wait_until(lambda: samples(d.status_port)["accepted_events_total"] == 1, 10,
               "the event in the open batch")
    assert intake.events == []
    assert d.stop(signal.SIGTERM) == 0
    assert [e.event for e in intake.events] == ["in the open batch"]


def test_sigterm_with_unreachable_intake_spools_then_next_start_delivers(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, shutdown_timeout=1.0)
    lines = [f"e{i}" for i in range(7)]
    send_tcp(d.tcp_port, octet_counted(traditional("haproxy", x) for x in lines))
    wait_until(lambda: samples(d.status_port)["accepted_events_total"] == 7, 10,
               "the 7 events taken in")
    # Not retrying on past shutdown_timeout (1 s): out well within stop's deadline (else
    # killed, and the exit code says so).
    assert d.stop(signal.SIGTERM, timeout=10.0) == 0
    assert d.events("shutdown_dropped") == []
    assert d.events("stopped")[-1]["spool_events"] == 7
    intake.set_down(False)
    d2 = daemon(intake)  # same spool directory
    assert_exactly(intake, d2, lines)


def test_invalid_length_prefix_closes_only_that_connection(intake: FakeIntake,
                                                           daemon: MakeDaemon) -> None:
    d = daemon(intake)
    good = socket.create_connection(("127.0.0.1", d.tcp_port))
    good.sendall(octet_counted([traditional("haproxy", "before")]))
    send_tcp(d.tcp_port, b"12 <134>bad fr" + b"amex\n" + b"garbage here\n")
    good.sendall(octet_counted([traditional("haproxy", "after")]))
    good.close()
    assert_exactly(intake, d, ["before", "after"], 2)
    assert d.wait_log("framing_error")["action"] == "connection closed"


def test_gzip_body_is_really_gzip(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "compressed")]))
    assert_exactly(intake, d, ["compressed"], 1)
    # The fake intake gunzips the body (400 if it is not gzip) before accepting the event.
    assert intake.requests[0]["content_encoding"] == "gzip"
    assert intake.requests[0]["status"] == 200


@pytest.mark.parametrize("endpoint", ["batch", "jsons", "plain-batch"])
def test_other_endpoints(intake: FakeIntake, daemon: MakeDaemon, endpoint: str) -> None:
    d = daemon(intake, intake={"endpoint": endpoint})
    lines = [haproxy_line(i) for i in range(50)]
    send_tcp(d.tcp_port, octet_counted(traditional("haproxy", x) for x in lines))
    assert_exactly(intake, d, lines, len(lines))
    path = {"batch": "/batch", "jsons": "/jsons", "plain-batch": "/plain/batch"}[endpoint]
    assert {e.endpoint for e in intake.events} == {path}


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _healthz_if(port: int, status: int) -> tuple[int, bytes] | None:
    got = _http_get(port, "/healthz")
    return got if got[0] == status else None


def test_metrics_and_health(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake, status={"stall_after": 1.0})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "m1"), traditional("x", "no")]))
    assert_exactly(intake, d, ["m1"], 2)
    status, body = _http_get(d.status_port, "/metrics")
    assert status == 200
    # prometheus-client writes every sample value as a float.
    assert b'haproxy_forwarder_delivered_events_total{intake="default"} 1.0\n' in body
    assert b"haproxy_forwarder_filtered_out_total 1.0\n" in body
    status, body = _http_get(d.status_port, "/healthz")
    assert status == 200 and b'"status":"ok"' in body
    # A backlog with no progress for stall_after seconds is unhealthy, though the process lives.
    intake.set_down(True)
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "stuck")]))
    _, body = wait_until(lambda: _healthz_if(d.status_port, 503), 15,
                         "/healthz at 503 (stalled backlog)", step=0.1)
    assert b"nothing delivered" in body
    intake.set_down(False)
    assert_exactly(intake, d, ["m1", "stuck"], 3, timeout=90)
    wait_until(lambda: _healthz_if(d.status_port, 200), 5, "/healthz back at 200", step=0.1)
