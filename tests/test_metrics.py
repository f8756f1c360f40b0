"""One registry, one name per thing: /metrics, the `stats` log line and `spool stats` agree,
and every spool counter is on /metrics (a corrupt-segment recovery is visible there)."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from devtools.daemon import Daemon, run_cli
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.observability.counters import Counters, SpoolCounters
from haproxy_forwarder.spool import HEADER_SIZE, Spool
from tests.fake_intake import FakeIntake

MakeDaemon = Callable[..., Daemon]
SAMPLE = re.compile(rb"^haproxy_forwarder_(\w+) (\S+)$", re.M)


def scrape(port: int) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200"
    return {m[1].decode(): float(m[2]) for m in SAMPLE.finditer(body)}


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
    for f in fields(Counters):
        if f.name != "spool":
            assert f"{f.name}_total" in m, f.name
    for f in fields(SpoolCounters):
        assert f"spool_{f.name}_total" in m, f.name
    assert m["spool_quarantined_segments_total"] == 1
    assert m["spool_corrupt_records_total"] >= 1
    for gauge in ("spool_batches", "spool_events", "spool_bytes", "spool_oldest_age_seconds",
                  "in_memory_batches", "connections_open", "paused"):
        assert gauge in m, gauge
    # The periodic stats line carries the same names (without _total).
    stats = d.wait_log("stats", timeout=5)
    assert stats["spool_quarantined_segments"] == 1
    assert d.stop() == 0
    assert d.events("stopped")[-1]["delivered_events"] >= 9


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
    with socket.create_connection(("127.0.0.1", d.status_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    line = (f'haproxy_forwarder_build_info{{version="{info["version"]}",'
            f'ingest="{info["ingest"]}",compressor="{info["compressor"]}"}} 1').encode()
    assert line in body
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
    assert d.stop() == 0
