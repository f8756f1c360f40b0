"""The config file at SIGHUP and at start (issue 17): only a regular file is read, off the
event loop; an empty one is refused (one `reload_failed` line, the running config stays
whole), a FIFO swapped in can no longer freeze the daemon. Real daemon, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import tomllib
import uuid
from pathlib import Path

import pytest

from devtools import REPO
from devtools.daemon import Daemon, run_cli, write_toml
from devtools.probe import samples, wait_until
from devtools.traffic import octet_counted
from haproxy_forwarder.config import Settings
from haproxy_forwarder.reload import Refused, read_new
from tests.fake_intake import VALID_KEY, FakeIntake
from tests.test_edges_status import probe
from tests.test_hostile import _wait_events, hp
from tests.test_reload import hup, wait_count
from tests.test_relp_source import RelpClient
from tests.test_tls import (
    MakeDaemon,
    Pki,
    client_context,
    pki,  # noqa: F401 - the fixture
    send,
    tls_section,
)

pytestmark = pytest.mark.timeout(120)

KEY_ENV = {"HAPROXY_FORWARDER_INTAKE__KEY": VALID_KEY}


def tag() -> str:
    return uuid.uuid4().hex[:10]


def ports(d: Daemon) -> dict[str, int]:
    return {str(r["proto"]): int(r["port"]) for r in d.events("listening")}


def start(daemon: MakeDaemon, intake: FakeIntake, p: Pki) -> Daemon:
    """TCP, TLS and RELP listeners, the key in the environment (as the README advises): a
    config file that says nothing would pass validation."""
    d = daemon(intake, env=KEY_ENV, listen={"udp": [], "tls": ["127.0.0.1:0"],
                                            "relp": ["127.0.0.1:0"]},
               tls=tls_section(p))
    cfg = dict(d.config)
    cfg["intake"] = {k: v for k, v in cfg["intake"].items() if k != "key"}
    write_toml(d.config_path, cfg)  # what a reload reads: no key in it
    return d


def deliver_everywhere(d: Daemon, intake: FakeIntake, p: Pki, t: str) -> None:
    """One event through each listener: they are all open, and the intake is the test's."""
    port = ports(d)
    with socket.create_connection(("127.0.0.1", port["tcp"]), timeout=10) as s:
        s.sendall(octet_counted([hp(f"{t} tcp")]))
    send(port["tls"], client_context(p, p.leaf("client1.example.org")),
         octet_counted([hp(f"{t} tls")]))

    async def relp() -> None:
        c = await RelpClient.connect(port["relp"])
        txnr = c.send("syslog", hp(f"{t} relp"))
        await c.wait_for([txnr])
        assert c.answers[txnr].startswith(b"200"), c.answers[txnr]
        await c.close()

    asyncio.run(relp())
    _wait_events(intake, [f"{t} tcp", f"{t} tls", f"{t} relp"], d=d)


# -- SIGHUP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["empty", "blank", "directory"])
def test_a_config_file_with_nothing_to_apply_is_refused_and_everything_stays(
        case: str, intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:  # noqa: F811
    """Before: an empty file applied every default (intake.url back to fra1, the TLS and
    RELP listeners closed)."""
    d = start(daemon, intake, pki)
    deliver_everywhere(d, intake, pki, tag())
    path = d.config_path
    kept = path.read_bytes()
    if case == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_text("" if case == "empty" else " \n\t\n")
    hup(d)
    [failed] = wait_count(d, "reload_failed", 1)
    want = {"empty": "is empty", "blank": "is empty", "directory": "is a directory"}[case]
    assert failed["problem"] == failed["problem"].strip() and want in failed["problem"], failed
    assert str(path) in failed["problem"]
    assert failed["action"] == "the running config stays in force"
    # The failure counted where the reloads are: this SIGHUP's handling is over.
    wait_until(lambda: samples(d.status_port)["reload_failures_total"] == 1, 5,
               "the refused reload counted on /metrics")
    assert samples(d.status_port)["reloads_total"] == 0
    assert not d.events("reloaded") and not d.events("listener_closed")
    assert len(d.events("reload_failed")) == 1
    deliver_everywhere(d, intake, pki, tag())
    # The same file, whole again: applied.
    if case == "directory":
        path.rmdir()
    path.write_bytes(kept)
    hup(d)
    d.wait_log("reloaded")
    stopped = d.stop()
    assert stopped == 0
    last = d.events("stopped")[-1]
    assert (last["reloads"], last["reload_failures"]) == (1, 1)


def test_a_fifo_swapped_in_does_not_freeze_the_daemon(intake: FakeIntake,
                                                      daemon: MakeDaemon) -> None:
    """Before: the reload opened the FIFO on the event loop and waited for a writer forever:
    /healthz timed out and SIGTERM was never acted on."""
    d = daemon(intake)
    path = d.config_path
    kept = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    hup(d)
    # The loop goes on: health answers at once, again and again.
    for _ in range(5):
        code, body = probe(d.status_port, "/healthz", timeout=2.0)
        assert code == 200, (code, body)
    [failed] = wait_count(d, "reload_failed", 1, timeout=5)
    assert "named pipe" in failed["problem"] and "regular file" in failed["problem"], failed
    t = tag()
    with socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10) as s:
        s.sendall(octet_counted([hp(f"{t} after the fifo")]))
    _wait_events(intake, [f"{t} after the fifo"], d=d)
    # A SIGHUP again while the FIFO is there: refused again, nothing stuck.
    hup(d)
    wait_count(d, "reload_failed", 2, timeout=5)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0  # acted on: out within the wait's deadline
    path.unlink()
    path.write_bytes(kept)


def test_reading_happens_off_the_event_loop_and_a_hung_read_is_refused() -> None:
    """A loader that never returns (a hung filesystem): the loop keeps running, and the
    reload is refused after the timeout instead of waiting forever."""
    release, returned = threading.Event(), threading.Event()

    def hung() -> Settings:
        release.wait(30)
        returned.set()
        return Settings()

    async def main() -> tuple[int, str, bool]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            await read_new(hung, timeout=0.5)
        except Refused as exc:
            problem = exc.problems[0]
        else:  # pragma: no cover - what the test must catch
            raise AssertionError("a hung read was not refused")
        finally:
            task.cancel()
        return ticks, problem, returned.is_set()

    try:
        ticks, problem, read_returned = asyncio.run(main())
    finally:
        release.set()
    assert ticks >= 20, ticks  # the loop ran all along (0 if the read blocked it)
    assert not read_returned  # refused while the read still hangs: not waited for
    assert problem == "config: not read within 0.5 s (a hung filesystem?)"


def test_a_loader_error_comes_back_from_the_thread() -> None:
    from haproxy_forwarder.config import ConfigError

    def bad() -> Settings:
        raise ConfigError(["batch.max_events: too small", "intake.url: bad"])

    with pytest.raises(Refused) as info:
        asyncio.run(read_new(bad))
    assert info.value.problems == ["batch.max_events: too small", "intake.url: bad"]


# -- at start ---------------------------------------------------------------------------------


def _safe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"cfg-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_an_empty_config_file_is_a_config_error_at_start(text: str, command: str,
                                                         tmp_path: Path) -> None:
    """The README runs the daemon on a file (or on no file at the default path): an empty
    file named on the command line is a file cut short, not a wish for every default."""
    path = _safe(tmp_path, text)
    res = run_cli("--config", str(path), command, env=KEY_ENV, timeout=20)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {path}: is empty"), lines
    assert "Traceback" not in res.stderr and VALID_KEY not in res.stdout + res.stderr


def test_a_comment_only_file_runs_on_defaults_and_environment(tmp_path: Path) -> None:
    path = _safe(tmp_path, "# everything from the environment\n")
    res = run_cli("--config", str(path), "check-config",
                  env={**KEY_ENV, "HAPROXY_FORWARDER_INTAKE__REGION": "fra2"})
    assert res.returncode == 0, res.stderr
    assert "intake.fra2.sekoia.io" in res.stdout


@pytest.mark.parametrize("kind", ["fifo", "char_device"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(kind: str,
                                                                tmp_path: Path) -> None:
    """Before: `--config` naming a FIFO waited for a writer forever."""
    if kind == "fifo":
        path = tmp_path / "config.fifo"
        os.mkfifo(path)
        want = "is a named pipe"
    else:
        path, want = Path("/dev/zero"), "is a character device"
    try:
        res = run_cli("--config", str(path), "check-config", env=KEY_ENV, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"check-config waited on {path}") from None
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {path}: {want}"), lines
    assert "regular file" in lines[0]


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    real = _safe(tmp_path, "[batch]\nmax_events = 77\n")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    res = run_cli("--config", str(link), "check-config", env=KEY_ENV)
    assert res.returncode == 0, res.stderr
    assert '"max_events": 77' in res.stdout


def test_a_huge_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    with path.open("wb") as fh:
        fh.write(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    res = run_cli("--config", str(path), "check-config", env=KEY_ENV)
    assert res.returncode == 2
    assert "larger than 4 MiB" in res.stderr, res.stderr


# -- the shipped example ----------------------------------------------------------------------


def test_the_example_config_uses_no_deprecated_name() -> None:
    """config/haproxy-forwarder.toml is what users copy: it says idle_timeout, not the old
    evict_idle_after (still read, as idle_timeout)."""
    with (REPO / "config" / "haproxy-forwarder.toml").open("rb") as fh:
        data = tomllib.load(fh)
    assert "evict_idle_after" not in data["listen"]
    assert data["listen"]["idle_timeout"] == Settings().listen.idle_timeout
    # Every key it sets is a setting of today (not only accepted through an alias).
    for section, values in data.items():
        if isinstance(values, dict):
            fields = type(getattr(Settings(), section)).model_fields
            assert set(values) <= set(fields), (section, set(values) - set(fields))
