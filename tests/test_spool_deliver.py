"""`haproxy-forwarder spool deliver`: a dead forwarder's spool delivered from another place.

A real daemon (devtools/daemon.py) takes events while its intake is down, so they wait in its
spool; it is SIGKILLed (a dead host); its spool directory is copied (the disk mounted on
another host, or a copy) and `spool deliver` is run against it with another forwarder's config
(the FakeIntake, no listener). Observed from outside: events at the intake, exit codes, the
command's output, `spool stats` of the copy.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from devtools.daemon import Daemon, base_config, run_cli, write_toml
from devtools.probe import metric, wait_until
from devtools.traffic import haproxy_line, octet_counted, rfc5424, send_tcp
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake

N = 6000  # events the dead forwarder left in its spool (several batches: batch.max_events 500)

pytestmark = pytest.mark.timeout(120)


def events(n: int, tag: str) -> tuple[bytes, list[str]]:
    texts = [f"{tag} e{i} {haproxy_line(i)}" for i in range(n)]
    return octet_counted(rfc5424("haproxy", t) for t in texts), texts


def dead_forwarder(tmp: Path, intake: FakeIntake, n: int = N,
                   **sections: Any) -> tuple[Path, list[str]]:
    """A daemon fed `n` events with its intake down, SIGKILLed once all are in its spool; its
    spool.dir, and the events. The intake is down on return."""
    home = tmp / "dead"
    home.mkdir()
    intake.set_down(True)
    if "intakes" not in sections:
        sections.setdefault("intake", intake_section(intake, retry_max=0.5))
    cfg = base_config(home, batch={"max_events": 500, "max_delay": 0.2}, **sections)
    d = Daemon(home, cfg).start()
    try:
        payload, texts = events(n, "dead")
        send_tcp(d.tcp_port, payload)
        wait_until(lambda: metric(d.status_port, "spool_events") == n, 30,
                   f"all {n} events in the dead forwarder's spool", detail=d.stderr_text)
    finally:
        assert d.proc is not None
        d.proc.kill()  # SIGKILL: no shutdown, nothing flushed beyond what is on disk
        d.proc.wait(10)
        d.close_files()
    return Path(cfg["spool"]["dir"]), texts


def rescuer_config(tmp: Path, intake: FakeIntake, **sections: Any) -> Path:
    """The config of the forwarder that delivers the spool: its own spool.dir elsewhere."""
    home = tmp / "rescuer"
    home.mkdir(exist_ok=True)
    path = home / "config.toml"
    if "intakes" not in sections:
        sections.setdefault("intake", intake_section(intake, retry_max=0.5))
    write_toml(path, base_config(home, **sections))
    return path


def deliver(config: Path, folder: Path, *extra: str,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(config), "spool", "deliver", "--dir", str(folder), *extra,
                   timeout=timeout)


def spool_events(folder: Path, intake_name: str | None = None) -> int:
    """Events on the spool at `folder` (a spool.dir), read by `spool stats`."""
    cfg = folder.parent / f"stats-{time.monotonic_ns()}.toml"
    sections: dict[str, Any] = {"spool": {"dir": str(folder)}}
    if intake_name is not None:
        sections["intakes"] = {intake_name: {"url": "https://127.0.0.1:9"}}
    write_toml(cfg, sections)
    r = run_cli("--config", str(cfg), "spool", "stats")
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    return int(out["spool_events"])


def assert_exactly_once(intake: FakeIntake, expected: list[str]) -> None:
    got = collections.Counter(intake.event_texts())
    want = collections.Counter(expected)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{sum(missing.values())} missing (e.g. {list(missing)[:2]}), "
        f"{sum(extra.values())} extra (e.g. {list(extra)[:2]})")


def test_a_dead_forwarders_spool_is_delivered_exactly_once(
        tmp_path: Path, intake: FakeIntake) -> None:
    spool, texts = dead_forwarder(tmp_path, intake)
    assert not intake.events
    copy = tmp_path / "mounted" / "haproxy-forwarder"
    shutil.copytree(spool, copy)  # the dead host's disk, mounted elsewhere
    intake.set_down(False)
    t0 = time.monotonic()
    r = deliver(rescuer_config(tmp_path, intake), copy)
    took = time.monotonic() - t0
    print(f"\nspool deliver: {len(texts)} events in {took:.1f} s\n{r.stdout}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_exactly_once(intake, texts)
    assert spool_events(copy) == 0
    assert re.search(rf": {N} events in \d+ batches \(oldest \d+ s\) to intake default at "
                     rf"{re.escape(intake.url)}/array", r.stdout), r.stdout
    assert f"done: {N}/{N} events delivered" in r.stdout, r.stdout
    assert "is empty" in r.stdout
    # Nothing left to do: a second run says so, sends nothing.
    again = deliver(rescuer_config(tmp_path, intake), copy)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to deliver" in again.stdout
    assert len(intake.events) == len(texts)


def test_a_named_intakes_spool_is_found_under_intakes(
        tmp_path: Path, intake: FakeIntake) -> None:
    """[intakes.eu] alone: the spool is spool.dir/intakes/eu; --dir names either folder."""
    named = {"intakes": {"eu": intake_section(intake, retry_max=0.5)}}
    spool, texts = dead_forwarder(tmp_path, intake, n=1000, **named)
    assert (spool / "intakes" / "eu" / "segments").is_dir()
    intake.set_down(False)
    cfg = rescuer_config(tmp_path, intake, **named)
    # The intake's own folder: the same spool, found as .../intakes/eu.
    r = deliver(cfg, spool / "intakes" / "eu", "--intake", "eu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "to intake eu" in r.stdout
    assert_exactly_once(intake, texts)
    # The spool.dir: the only intake of the config is chosen; nothing left.
    r = deliver(cfg, spool)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to deliver" in r.stdout
    # A directory with no spool of that intake: a usage error, one clear line.
    r = deliver(cfg, tmp_path / "rescuer")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no spool of intake eu there" in r.stderr


def test_a_spool_locked_by_a_running_daemon_is_refused(
        tmp_path: Path, intake: FakeIntake) -> None:
    home = tmp_path / "live"
    home.mkdir()
    intake.set_down(True)
    cfg = base_config(home, intake=intake_section(intake, retry_max=0.5))
    with Daemon(home, cfg) as d:
        payload, _ = events(200, "live")
        send_tcp(d.tcp_port, payload)
        wait_until(lambda: metric(d.status_port, "spool_events") == 200, 30,
                   "the events on the live daemon's spool")
        r = deliver(rescuer_config(tmp_path, intake), Path(cfg["spool"]["dir"]))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "locked by a running daemon" in r.stdout, r.stdout
        # The running daemon keeps its spool: nothing was taken from it.
        assert metric(d.status_port, "spool_events") == 200


def test_an_intake_still_down_gives_up_after_the_timeout_and_keeps_the_events(
        tmp_path: Path, intake: FakeIntake) -> None:
    spool, texts = dead_forwarder(tmp_path, intake, n=1000)
    cfg = rescuer_config(tmp_path, intake)
    t0 = time.monotonic()
    r = deliver(cfg, spool, "--timeout", "2")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert "gave up: nothing delivered for 2 s (--timeout 2)" in r.stdout, r.stdout
    assert "1000 events stay in" in r.stdout, r.stdout
    assert took < 20, took
    assert spool_events(spool) == 1000
    # Once the intake is back, the next run delivers them, each once.
    intake.set_down(False)
    r = deliver(cfg, spool)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_exactly_once(intake, texts)
    assert spool_events(spool) == 0


def test_a_batch_the_intake_refuses_for_good_goes_to_that_spools_dead_letters(
        tmp_path: Path, intake: FakeIntake) -> None:
    """400 for one request: its events are dead-lettered in the dead forwarder's folder (as
    its daemon would have), the rest delivered; exit 0, the spool empty."""
    spool, texts = dead_forwarder(tmp_path, intake, n=1000)
    intake.set_down(False)
    intake.inject(400, body=b'{"message": "bad event"}')
    r = deliver(rescuer_config(tmp_path, intake), spool)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"spool deliver: (\d+) events refused for good by the intake are in (\S+)",
                  r.stdout)
    assert m is not None, r.stdout
    refused = int(m[1])
    assert Path(m[2]) == spool / "dead-letter"
    assert refused > 0 and len(intake.events) + refused == len(texts)
    assert_exactly_once(intake, [t for t in texts if t in set(intake.event_texts())])
    cfg = spool.parent / "stats.toml"
    write_toml(cfg, {"spool": {"dir": str(spool)}})
    stats = orjson.loads(run_cli("--config", str(cfg), "spool", "stats").stdout)
    assert stats["spool_events"] == 0
    assert stats["dead_letter"]["events"] == refused
