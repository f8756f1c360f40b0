"""/metrics, /healthz and /readyz of the real daemon.

One registry, one name per thing: /metrics (parsed by prometheus-client's own parsers, so the
exposition is valid), the `stats` log line and `spool stats` agree; the labelled counters
(intake, listener, framing, reason, status class) and the request latency histogram move with
real traffic through real sockets to the fake HTTPS intake. A config with a single [intake]
has one intake, "default": its delivery, spool, dead-letter and drop series say so
(several intakes in one registry: tests/test_metrics_intakes.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from devtools.daemon import Daemon, run_cli
from devtools.probe import until, wait_until
from devtools.traffic import lf_framed, octet_counted, send_tcp, send_udp, traditional
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import Settings
from haproxy_forwarder.observability import logs
from haproxy_forwarder.observability.counters import (
    DURATION_BUCKETS,
    LISTENER_FIELDS,
    SCALAR_FIELDS,
    SpoolCounters,
)
from haproxy_forwarder.observability.prometheus import INTAKE_FAMILIES
from haproxy_forwarder.sources import TcpSource, UdpSource
from haproxy_forwarder.spool import HEADER_SIZE, Spool
from haproxy_forwarder.wiring import build
from tests.fake_intake import FakeIntake

MakeDaemon = Callable[..., Daemon]
# {(sample name, ((label, value), ...) sorted): value}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
P = "haproxy_forwarder_"
DEFAULT = "default"  # the one intake of a config with a single [intake]


def http_get(port: int, path: str, accept: str = "") -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of one GET on the status endpoint."""
    extra = f"Accept: {accept}\r\n" if accept else ""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    ctype = next(v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
                 if k.lower() == "content-type")
    return int(lines[0].split()[1]), ctype, body


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape(port: int) -> Samples:
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    return parse(body.decode())


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(P + name, tuple(sorted(labels.items())))]


def total(m: Samples, name: str, **labels: str) -> float:
    """Summed over every label set holding `labels` (with none: what the `stats` log line
    shows)."""
    want = set(labels.items())
    return sum(v for (n, have), v in m.items() if n == P + name and want <= set(have))


def names(m: Samples) -> set[str]:
    return {n for n, _ in m}


def family(sample: str) -> str:
    """The flat name of a sample's family: haproxy_forwarder_x_total -> x (histogram samples
    to their histogram's name)."""
    name = sample.removeprefix(P)
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def corrupt_segment(spool_dir: Path) -> None:
    """Three records; the middle one gets a flipped byte (corruption, not a torn tail)."""
    sp = Spool(spool_dir)
    sp.open()
    for tag in ("a", "b", "c"):
        sp.append(Batch.from_events([f"{tag}{i}" for i in range(4)], ["2026-12-01T00:00:00Z"] * 4))
    sp.close()
    (seg,) = (spool_dir / "segments").glob("*.seg")
    raw = bytearray(seg.read_bytes())
    second = len(raw) // 3  # records are the same size
    raw[second + HEADER_SIZE + 5] ^= 0x40
    seg.write_bytes(bytes(raw))


def test_every_counter_is_on_metrics_and_a_recovery_is_counted(
    intake: FakeIntake, daemon: MakeDaemon, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    corrupt_segment(spool_dir)
    d = daemon(intake)
    d.wait_log("spool_recovered_with_corruption")
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "live")]))
    assert intake.wait_for(9, 15)  # a and c recovered (8 events) + the live one
    m = scrape(d.status_port)
    have = names(m)
    for name in SCALAR_FIELDS:
        assert f"{P}{name}_total" in have, name
    for name in (*LISTENER_FIELDS, "framing_errors"):
        assert f"{P}{name}_total" in have, name
    for f in SpoolCounters.__dataclass_fields__:
        assert f"{P}spool_{f}_total" in have, f
    assert value(m, "spool_quarantined_segments_total", intake=DEFAULT) == 1
    assert value(m, "spool_corrupt_records_total", intake=DEFAULT) >= 1
    # One intake: every per-intake family has its series, all of them intake="default".
    per_intake = [dict(labels) for (n, labels) in m if family(n) in INTAKE_FAMILIES]
    assert not INTAKE_FAMILIES - {family(n) for n in have}
    assert {labels.get("intake") for labels in per_intake} == {DEFAULT}
    # Unrouted events: global, by reason, at 0 (a single intake routes every event to it).
    assert value(m, "unrouted_events_total", reason="drop") == 0
    assert value(m, "unrouted_events_total", reason="no_route") == 0
    for gauge in ("spool_batches", "spool_events", "spool_bytes", "spool_oldest_age_seconds",
                  "spool_max_bytes", "in_memory_batches", "backlog_batches", "paused",
                  "connections_open", "listener_up", "last_delivery_timestamp_seconds"):
        assert P + gauge in have, gauge
    # spool.max_size's default, all of it the one intake's
    assert value(m, "spool_max_bytes", intake=DEFAULT) == 1024 * 1024 * 1024
    # The periodic stats line carries the same names (without _total), labels summed.
    stats = d.wait_log("stats", timeout=5)
    assert stats["spool_quarantined_segments"] == 1
    assert stats["unrouted_events"] == stats["proxy_refused"] == stats["proxy_headers"] == 0
    m = scrape(d.status_port)  # nothing moves any more: both are the same picture
    stats = d.wait_log("stats", timeout=5)
    for name in ("received_frames", "received_bytes", "connections_accepted",
                 "delivered_events", "accepted_events"):
        assert stats[name] == total(m, name + "_total"), name
    assert d.stop() == 0
    assert d.events("stopped")[-1]["delivered_events"] >= 9


def _classes(fi: FakeIntake) -> dict[str, int]:
    """Status classes of the requests the intake really answered (0: no answer sent)."""
    out = {"2xx": 0, "4xx": 0, "5xx": 0, "network": 0}
    for r in fi.requests:
        out["network" if r["status"] == 0 else f"{r['status'] // 100}xx"] += 1
    return out


def test_labelled_counters_histogram_and_status_classes_follow_real_traffic(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    d = daemon(intake, intake={"auth_retry": 0.1, "retry_max": 0.5})
    tcp = f"tcp://127.0.0.1:{d.tcp_port}"
    udp = f"udp://127.0.0.1:{d.udp_port}"
    octet = octet_counted([traditional("haproxy", f"octet {i}") for i in range(3)])
    lf = lf_framed([traditional("haproxy", f"lf {i}") for i in range(2)])
    datagrams = [traditional("haproxy", f"udp {i}") for i in range(2)]
    send_tcp(d.tcp_port, octet)
    send_tcp(d.tcp_port, lf)
    send_udp(d.udp_port, datagrams)
    assert intake.wait_for(7, 15)
    # The intake has them once it answered; the daemon counts them once it read the answer.
    def counted() -> Samples | None:
        got = scrape(d.status_port)
        return got if value(got, "delivered_events_total", intake=DEFAULT) == 7 else None

    m = wait_until(counted, 15, "the 7 events counted as delivered")
    assert value(m, "received_frames_total", listener=tcp, framing="octet") == 3
    assert value(m, "received_frames_total", listener=tcp, framing="lf") == 2
    assert value(m, "received_frames_total", listener=udp, framing="datagram") == 2
    assert value(m, "received_bytes_total", listener=tcp) == len(octet) + len(lf)
    assert value(m, "received_bytes_total", listener=udp) == sum(map(len, datagrams))
    assert value(m, "connections_accepted_total", listener=tcp) == 2
    assert value(m, "framing_errors_total", listener=tcp, framing="octet") == 0
    assert value(m, "udp_dropped_total", listener=udp) == 0
    assert value(m, "listener_up", listener=tcp) == value(m, "listener_up", listener=udp) == 1
    assert value(m, "delivered_events_total", intake=DEFAULT) == 7
    # One latency sample and one status class per request the intake answered.
    assert {c: value(m, "intake_requests_total", intake=DEFAULT, status_class=c) for c in
            ("2xx", "4xx", "5xx", "network")} == _classes(intake)
    n = value(m, "intake_request_duration_seconds_count", intake=DEFAULT)
    assert n == len(intake.requests) >= 1
    assert value(m, "intake_request_duration_seconds_bucket", intake=DEFAULT, le="+Inf") == n
    assert value(m, "intake_request_duration_seconds_sum", intake=DEFAULT) > 0
    assert value(m, "last_delivery_timestamp_seconds", intake=DEFAULT) == pytest.approx(
        time.time(), abs=60)
    before = m

    # 503, no answer at all, 401 (the key refused), then accepted: one event, four requests.
    intake.inject(503)
    intake.inject(0)
    intake.inject(401)
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "retried")]))
    assert intake.wait_for(8, 30)
    intake.inject(400)  # refused for good: a dead letter
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "refused")]))
    d.wait_log("dead_lettered")
    # An intake slower than 0.3 s: that request cannot land at or below 0.25 s.
    intake.set_delay(0.3)
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "slow")]))
    assert intake.wait_for(9, 15)
    intake.set_delay(0)
    assert wait_until(lambda: value(scrape(d.status_port), "delivered_events_total",
                                    intake=DEFAULT) == 9, 15.0)
    m = scrape(d.status_port)
    got = {c: value(m, "intake_requests_total", intake=DEFAULT, status_class=c)
           for c in ("2xx", "4xx", "5xx", "network")}
    assert got == _classes(intake)
    assert got["5xx"] == got["network"] == 1 and got["4xx"] == 2  # the 401 and the 400
    assert value(m, "intake_key_rejected_total", intake=DEFAULT) == 1
    assert value(m, "retries_total", intake=DEFAULT) == 3
    assert value(m, "dead_lettered_events_total", intake=DEFAULT, reason="rejected") == 1
    assert total(m, "dead_lettered_events_total") == 1
    assert total(m, "dropped_events_total") == 0
    assert value(m, "intake_request_duration_seconds_count", intake=DEFAULT) == len(
        intake.requests) == n + 6

    def delta(le: str) -> float:
        return (value(m, "intake_request_duration_seconds_bucket", intake=DEFAULT, le=le)
                - value(before, "intake_request_duration_seconds_bucket", intake=DEFAULT,
                        le=le))

    assert delta("+Inf") == 6
    assert delta("0.25") <= 5  # the slow one is above
    assert (value(m, "intake_request_duration_seconds_sum", intake=DEFAULT)
            - value(before, "intake_request_duration_seconds_sum", intake=DEFAULT)) >= 0.3
    counts = [value(m, "intake_request_duration_seconds_bucket", intake=DEFAULT, le=repr(b))
              for b in DURATION_BUCKETS]
    assert counts == sorted(counts)  # cumulative, as Prometheus expects

    # OpenMetrics when the scraper asks for it (Prometheus does), by the library's parser.
    status, ctype, body = http_get(
        d.status_port, "/metrics",
        accept="application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert status == 200 and ctype.startswith("application/openmetrics-text"), ctype
    fams = {f.name: f for f in openmetrics_families(body.decode())}
    assert fams[P + "build"].type == "info"
    assert fams[P + "delivered_events"].type == "counter"
    assert fams[P + "intake_request_duration_seconds"].type == "histogram"

    # Ready while running; from SIGTERM on, 503 while it drains (here: a sender that keeps
    # its connection open holds the drain for TCP_DRAIN_GRACE), and still scrapeable.
    assert http_get(d.status_port, "/readyz")[:1] == (200,)
    held = socket.create_connection(("127.0.0.1", d.tcp_port))
    held.sendall(octet_counted([traditional("haproxy", "last")]))
    assert wait_until(lambda: value(scrape(d.status_port), "connections_open",
                                    listener=tcp) == 1, 15.0)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: http_get(d.status_port, "/readyz")[0] == 503, timeout=5)
    status, _, body = http_get(d.status_port, "/readyz")
    assert status == 503 and "shutting down" in json.loads(body)["reasons"]
    # Listeners closed on purpose: not a liveness failure.
    status, _, body = http_get(d.status_port, "/healthz")
    assert status == 200, body
    assert value(scrape(d.status_port), "listener_up", listener=tcp) == 0
    held.close()
    assert d.stop() == 0
    assert intake.wait_for(10, 5)


def test_udp_datagrams_dropped_under_backpressure_are_counted_per_listener(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    # One batch in flight at a slow intake, one waiting: backpressure; UDP cannot be held back.
    intake.set_delay(2.0)
    d = daemon(intake, intake={"concurrency": 1}, batch={"max_in_flight": 1, "max_delay": 0.05})
    udp = f"udp://127.0.0.1:{d.udp_port}"

    def dropped() -> float:
        return value(scrape(d.status_port), "udp_dropped_total", listener=udp)

    i = 0
    deadline = time.monotonic() + 20
    with socket.create_connection(("127.0.0.1", d.tcp_port)) as tcp:
        while dropped() == 0 and time.monotonic() < deadline:
            tcp.sendall(octet_counted([traditional("haproxy", f"tcp {i}")]))
            send_udp(d.udp_port, [traditional("haproxy", f"udp {i}")])
            i += 1
            time.sleep(0.02)  # the senders' pace (the scenario), not a wait for something
    n = dropped()
    assert n > 0, d.stderr_text()[-2000:]
    assert d.events("backpressure_on")
    intake.set_delay(0)
    assert d.stop() == 0
    assert d.events("stopped")[-1]["udp_dropped"] >= n


async def _aget(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_healthz_fails_when_a_listener_closes_under_the_daemon(tmp_path: Path) -> None:
    """In-process (nothing outside can close a daemon's socket): a real Daemon from build()
    on real loopback sockets, whose UDP socket and TCP server are then closed the way a fatal
    socket error closes them, not through stop()."""
    settings = Settings(
        listen={"tcp": ["127.0.0.1:0"], "udp": ["127.0.0.1:0"]}, intake={"dry_run": True},
        status={"listen": "127.0.0.1:0"}, spool={"dir": str(tmp_path)},
    )

    async def main() -> None:
        d = build(settings, logs.get_logger("test"))
        await d.start()
        assert d.status is not None and d.status.server is not None
        port = d.status.server.sockets[0].getsockname()[1]
        assert (await _aget(port, "/healthz"))[0] == 200
        assert (await _aget(port, "/readyz"))[0] == 200
        [tcp] = [src for src in d.listeners if isinstance(src, TcpSource)]
        [udp] = [src for src in d.listeners if isinstance(src, UdpSource)]
        transport = udp._transport
        assert transport is not None
        transport.close()
        await until(lambda: udp.down, what="the UDP listener seen closed")
        status, body = await _aget(port, "/healthz")
        assert status == 503
        assert json.loads(body)["reasons"] == [f"listener {udp.name} is down (closed, not by us)"]
        assert (await _aget(port, "/readyz"))[0] == 503
        m = parse((await _aget(port, "/metrics"))[1].decode())
        assert value(m, "listener_up", listener=udp.name) == 0
        assert value(m, "listener_up", listener=tcp.name) == 1
        server = tcp._server
        assert server is not None
        server.close()
        await until(lambda: tcp.down, what="the TCP listener seen closed")
        reasons = json.loads((await _aget(port, "/healthz"))[1])["reasons"]
        assert f"listener {tcp.name} is down (closed, not by us)" in reasons
        d.request_stop("SIGTERM")
        await d.shutdown()

    uvloop.run(main())  # the daemon's loop, as `run` uses


def test_spool_stats_uses_the_metric_names(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    sp = Spool(spool_dir)
    sp.open()
    sp.append(Batch.from_events(["x", "y"], ["2026-12-01T00:00:00Z"] * 2))
    sp.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[spool]\ndir = "{spool_dir}"\n')
    out = run_cli("--config", str(config), "spool", "stats")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["spool_batches"] == 1 and info["spool_events"] == 2
    assert info["spool_appended_batches"] == 0  # counters of this process, not of the daemon


def test_build_info_says_which_implementations_run(intake: FakeIntake, daemon: MakeDaemon) -> None:
    from haproxy_forwarder import ingest
    from haproxy_forwarder.buildinfo import build_info

    info = build_info()
    d = daemon(intake)
    started = d.wait_log("started")
    assert (started["ingest"], started["compressor"]) == (info["ingest"], info["compressor"])
    m = scrape(d.status_port)
    assert m[(P + "build_info", tuple(sorted(info.items())))] == 1
    version = run_cli("--version")
    assert version.stdout.strip() == (f"haproxy-forwarder {info['version']} "
                                      f"(ingest: {info['ingest']}, gzip: {info['compressor']})")
    assert d.stop() == 0
    # Built but not in use (an import failure, a wrong Python) must not pass unnoticed.
    if ingest.built() and not os.environ.get("HAPROXY_FORWARDER_NO_EXTENSIONS"):
        assert ingest.IMPLEMENTATION == "native", ingest.IMPORT_ERROR


def test_no_extensions_selects_the_pure_reader_and_says_so(intake: FakeIntake,
                                                           daemon: MakeDaemon) -> None:
    d = daemon(intake, env={"HAPROXY_FORWARDER_NO_EXTENSIONS": "1",
                            "HAPROXY_FORWARDER_EXPECT_COMPILED": "1"})
    assert d.wait_log("started")["ingest"] == "python"
    assert "HAPROXY_FORWARDER_NO_EXTENSIONS" in d.wait_log("ingest_pure_python")["reason"]
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "pure")]))
    assert intake.wait_for(1, 10)
    # The pure reader counts frames per framing too (the same first-byte rule).
    m = scrape(d.status_port)
    assert value(m, "received_frames_total", listener=f"tcp://127.0.0.1:{d.tcp_port}",
                 framing="octet") == 1
    assert d.stop() == 0
