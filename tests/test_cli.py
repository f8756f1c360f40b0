"""The command line as users meet it: exit codes, stdout and stderr lines, nothing else.

Every process here is the real CLI (``python -m haproxy_forwarder`` or the console script),
with TOML configs in the test's folder and loopback listeners on OS-chosen ports.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import REPO, Daemon, base_config, run_cli, write_toml
from devtools.probe import samples, wait_at_rest, wait_until
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder import __version__
from haproxy_forwarder.config import Settings
from tests.fake_intake import VALID_KEY, FakeIntake

MakeDaemon = Callable[..., Daemon]

# Alphanumeric (so valid) and unmistakable: if it shows up anywhere, it leaked.
SECRET_KEY = "Zq7LeakCanaryIntakeKey4242xyzW"
FRA2_URL = "https://intake.fra2.sekoia.io/api/v1/intake-http"


# A config file that leaves every setting to the environment (an empty file is refused).
ENV_ONLY = "# settings from the environment\n"

def _config(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _intake(fi: FakeIntake, **extra: Any) -> dict[str, Any]:
    return {"url": fi.url, "ca_file": fi.ca_file, "key": VALID_KEY, **extra}


def _safe_config(tmp_path: Path, **sections: Any) -> Path:
    """A full config that could really run: loopback listeners, spool in tmp_path."""
    path = tmp_path / f"cfg-{uuid.uuid4().hex[:8]}.toml"
    write_toml(path, base_config(tmp_path, **sections))
    return path


def _assert_config_errors(res: subprocess.CompletedProcess[str], *needles: str) -> list[str]:
    """Exit 2, only `config error:` lines on stderr, no traceback, each needle on some line."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.splitlines()
    assert lines, "no error line on stderr"
    assert all(line.startswith("config error: ") for line in lines), lines
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)
    return lines


def _check_config_json(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


# -- --version and entry points ---------------------------------------------------------------


def test_version_python_dash_m() -> None:
    res = run_cli("--version")
    assert res.returncode == 0
    # The version, and which implementations run (issue 9: never silently slow).
    assert res.stdout.strip().startswith(f"haproxy-forwarder {__version__} (ingest: ")
    assert "Traceback" not in res.stderr


def test_console_script_same_as_python_dash_m(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "haproxy-forwarder"
    if not script.exists():
        found = shutil.which("haproxy-forwarder")
        if found is None:
            pytest.skip("console script haproxy-forwarder not installed (pip install -e .)")
        script = Path(found)
    cfg = _config(tmp_path, "[batch]\nmax_events = 12\n")
    for args in (["--version"], ["--config", str(cfg), "check-config"],
                 ["--config", str(tmp_path / "absent.toml"), "check-config"]):
        by_script = subprocess.run([str(script), *args], capture_output=True, text=True,
                                   timeout=30, cwd=REPO)
        by_module = run_cli(*args)
        assert by_script.returncode == by_module.returncode, args
        assert by_script.stdout == by_module.stdout, args
        assert by_script.stderr == by_module.stderr, args


def test_no_command_is_a_usage_error() -> None:
    res = run_cli()
    assert res.returncode == 2
    assert "usage:" in res.stderr and "Traceback" not in res.stderr


# -- bad configurations: exit 2, one `config error:` line per problem --------------------------


BAD_CONFIGS = {
    "invalid_toml": ("[intake\nkey = 1\n", "invalid TOML"),
    "misspelt_key": ("[batch]\nmax_event = 10\n", "batch.max_event: unknown key"),
    "misspelt_section": ("[intak]\nurl = \"https://x\"\n", "intak: unknown key"),
    "wrong_type": ("[batch]\nmax_events = \"many\"\n", "batch.max_events"),
    "wrong_type_list": ("[listen]\ntcp = \"127.0.0.1:1514\"\n", "listen.tcp"),
    "out_of_range": ("[batch]\nmax_events = 0\n", "batch.max_events"),
    "out_of_range_size": ("[listen]\nmax_message_size = 10\n", "listen.max_message_size"),
    "listen_without_port": ("[listen]\ntcp = [\"1514\"]\n", "listen.tcp"),
    "listen_port_too_big": ("[listen]\nudp = [\"127.0.0.1:70000\"]\n", "listen.udp"),
    "listen_port_not_number": ("[listen]\ntcp = [\"127.0.0.1:syslog\"]\n", "listen.tcp"),
    "unknown_endpoint": ("[intake]\nendpoint = \"bulk\"\n", "intake.endpoint"),
    "unknown_region": ("[intake]\nregion = \"fra9\"\n", "intake.region"),
    "url_without_scheme": ("[intake]\nurl = \"intake.sekoia.io\"\n", "intake.url"),
    "url_ftp": ("[intake]\nurl = \"ftp://intake.sekoia.io\"\n", "intake.url"),
    "region_and_url": (
        "[intake]\nregion = \"fra2\"\nurl = \"https://intake.example.test\"\n", "not both"
    ),
    "log_level": ("[log]\nlevel = \"loud\"\n", "log.level"),
    "empty_programs": ("[filter]\nprograms = []\n", "filter.programs"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_clear_line(tmp_path: Path, case: str) -> None:
    text, needle = BAD_CONFIGS[case]
    cfg = _config(tmp_path, text)
    lines = _assert_config_errors(run_cli("--config", str(cfg), "check-config"), needle)
    assert len(lines) == 1, lines


@pytest.mark.parametrize("command", [("run",), ("run", "--dry-run"), ("send-test",)])
def test_every_command_refuses_a_bad_config(tmp_path: Path, command: tuple[str, ...]) -> None:
    cfg = _config(tmp_path, "[batch]\nmax_event = 10\n")
    res = run_cli("--config", str(cfg), *command, timeout=20)
    _assert_config_errors(res, "batch.max_event: unknown key")
    assert res.stdout == ""


def test_plain_http_url_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[intake]\nurl = \"http://intake.sekoia.io\"\n")
    _assert_config_errors(run_cli("--config", str(cfg), "check-config"), "intake.url")


def test_several_problems_give_several_lines(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "\n".join([
        "[listen]", "tcp = [\"nowhere\"]", "max_conections = 3",
        "[batch]", "max_events = -1",
        "[intake]", "endpoint = \"bulk\"", "timeout = \"soon\"",
    ]) + "\n")
    lines = _assert_config_errors(
        run_cli("--config", str(cfg), "check-config"),
        "listen.tcp", "listen.max_conections", "batch.max_events", "intake.endpoint",
        "intake.timeout",
    )
    assert len(lines) == 5, lines


def test_missing_file_given_with_config_option(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "config.toml"
    lines = _assert_config_errors(run_cli("--config", str(missing), "check-config"), str(missing))
    assert "not found" in lines[0]


def test_missing_file_given_with_env_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    res = run_cli("check-config", env={"HAPROXY_FORWARDER_CONFIG": str(missing)})
    lines = _assert_config_errors(res, str(missing))
    assert "not found" in lines[0]


def test_config_file_from_env_variable_is_read(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[batch]\nmax_events = 321\n")
    res = run_cli("check-config", env={"HAPROXY_FORWARDER_CONFIG": str(cfg)})
    assert _check_config_json(res)["batch"]["max_events"] == 321


def test_config_option_wins_over_env_variable(tmp_path: Path) -> None:
    chosen = _config(tmp_path, "[batch]\nmax_events = 11\n", "chosen.toml")
    other = _config(tmp_path, "[batch]\nmax_events = 22\n", "other.toml")
    res = run_cli("--config", str(chosen), "check-config",
                  env={"HAPROXY_FORWARDER_CONFIG": str(other)})
    assert _check_config_json(res)["batch"]["max_events"] == 11


def test_directory_as_config_file(tmp_path: Path) -> None:
    _assert_config_errors(run_cli("--config", str(tmp_path), "check-config"), str(tmp_path))


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("HAPROXY_FORWARDER_LISTEN__TCP", "notjson", "listen"),
        ("HAPROXY_FORWARDER_BATCH__MAX_EVENTS", "lots", "batch.max_events"),
        ("HAPROXY_FORWARDER_BATCH__MAX_EVENTS", "0", "batch.max_events"),
        ("HAPROXY_FORWARDER_INTAKE__ENDPOINT", "bulk", "intake.endpoint"),
        ("HAPROXY_FORWARDER_INTAKE__GZIP", "perhaps", "intake.gzip"),
    ],
)
def test_bad_environment_value(tmp_path: Path, variable: str, value: str, needle: str) -> None:
    cfg = _config(tmp_path, ENV_ONLY)
    res = run_cli("--config", str(cfg), "check-config", env={variable: value})
    lines = _assert_config_errors(res, needle)
    assert len(lines) == 1, lines


def test_bad_environment_list_names_the_variable(tmp_path: Path) -> None:
    res = run_cli("--config", str(_config(tmp_path, ENV_ONLY)), "check-config",
                  env={"HAPROXY_FORWARDER_LISTEN__TCP": "notjson"})
    lines = _assert_config_errors(res)
    assert len(lines) == 1
    assert "HAPROXY_FORWARDER_LISTEN__TCP" in lines[0] and "JSON" in lines[0]


@pytest.mark.parametrize("variable", ["HAPROXY_FORWARDER_BATCH_MAX_EVENTS",
                                      "HAPROXY_FORWARDER_INTAK__KEY"])
def test_misspelt_environment_variable_is_an_error(tmp_path: Path, variable: str) -> None:
    res = run_cli("--config", str(_config(tmp_path, ENV_ONLY)), "check-config", env={variable: "3"})
    _assert_config_errors(res, variable)


def test_run_without_key_exits_2_naming_intake_key(tmp_path: Path) -> None:
    cfg = _safe_config(tmp_path)
    res = run_cli("--config", str(cfg), "run", timeout=20)
    lines = _assert_config_errors(res, "intake.key")
    assert len(lines) == 1, lines


def test_send_test_without_key_exits_2(tmp_path: Path) -> None:
    cfg = _safe_config(tmp_path)
    _assert_config_errors(run_cli("--config", str(cfg), "send-test", timeout=20), "intake.key")


def test_check_config_without_key_warns_but_succeeds(tmp_path: Path) -> None:
    res = run_cli("--config", str(_safe_config(tmp_path)), "check-config")
    assert _check_config_json(res)["intake"]["key"] is None
    assert "intake.key" in res.stderr and "Traceback" not in res.stderr


# -- environment over file; check-config shows the effective config ---------------------------


def test_env_overrides_file_in_check_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[batch]\nmax_events = 100\nmax_delay = 2.5\n"
                            "[intake]\nkey = \"FileKey123\"\n")
    res = run_cli("--config", str(cfg), "check-config", env={
        "HAPROXY_FORWARDER_BATCH__MAX_EVENTS": "777",
        "HAPROXY_FORWARDER_INTAKE__KEY": SECRET_KEY,
    })
    data = _check_config_json(res)
    assert data["batch"]["max_events"] == 777  # env wins
    assert data["batch"]["max_delay"] == 2.5  # the file still counts for the rest
    assert data["intake"]["key"] == "********"
    assert SECRET_KEY not in res.stdout + res.stderr
    assert "FileKey123" not in res.stdout + res.stderr


def test_env_key_overrides_file_key_for_real(tmp_path: Path, intake: FakeIntake) -> None:
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": _intake(intake, key="WrongFileKey1")})
    res = run_cli("--config", str(cfg), "send-test", env={"HAPROXY_FORWARDER_INTAKE__KEY":
                                                          VALID_KEY})
    assert res.returncode == 0, res.stdout + res.stderr
    assert intake.wait_for(1, 10), f"events at the intake: want 1, got {len(intake.events)}"


def test_region_fra2_gives_documented_url(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[intake]\nregion = \"fra2\"\n")
    data = _check_config_json(run_cli("--config", str(cfg), "check-config"))
    assert data["intake"]["url"] == FRA2_URL
    # Same URL written out is not a conflict.
    cfg2 = _config(tmp_path, f"[intake]\nregion = \"fra2\"\nurl = \"{FRA2_URL}\"\n", "c2.toml")
    assert _check_config_json(run_cli("--config", str(cfg2), "check-config"))["intake"][
        "url"] == FRA2_URL


@pytest.mark.parametrize(("region", "endpoint_url"), [
    ("fra1", "https://intake.sekoia.io/array"),
    ("usa1", "https://intake.usa1.sekoia.io/api/v1/intake-http/array"),
    ("sgp1", "https://intake.sgp1.sekoia.io/array"),
])
def test_every_region_gives_its_documented_endpoint(region: str, endpoint_url: str) -> None:
    assert Settings(intake={"region": region, "dry_run": True}).intake.endpoint_url \
        == endpoint_url


def test_region_from_env(tmp_path: Path) -> None:
    res = run_cli("--config", str(_config(tmp_path, ENV_ONLY)), "check-config",
                  env={"HAPROXY_FORWARDER_INTAKE__REGION": "fra2"})
    assert _check_config_json(res)["intake"]["url"] == FRA2_URL


# -- the intake key never appears in any output ------------------------------------------------


def test_key_masked_in_check_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"[intake]\nkey = \"{SECRET_KEY}\"\n")
    res = run_cli("--config", str(cfg), "check-config")
    assert _check_config_json(res)["intake"]["key"] == "********"
    assert SECRET_KEY not in res.stdout + res.stderr


@pytest.mark.parametrize(
    "bad_key",
    [
        "Zq7 Leak Canary 4242",  # a space, as from a careless copy and paste
        "Zq7-Leak_Canary/4242+xyz",  # not alphanumeric
        "Zq7LeakCanary4242\t",  # trailing tab
        "Zq7LeakCanary4242\"quoted",
    ],
)
@pytest.mark.parametrize("where", ["file", "env"])
def test_invalid_key_is_not_echoed_in_config_errors(tmp_path: Path, bad_key: str,
                                                    where: str) -> None:
    env: dict[str, str] = {}
    if where == "file":
        cfg = _config(tmp_path, f"[intake]\nkey = {json.dumps(bad_key)}\n")
    else:
        cfg = _config(tmp_path, ENV_ONLY)
        env["HAPROXY_FORWARDER_INTAKE__KEY"] = bad_key
    for command in ("check-config", "send-test"):
        res = run_cli("--config", str(cfg), command, env=env)
        _assert_config_errors(res, "intake.key")
        out = res.stdout + res.stderr
        assert bad_key not in out and bad_key.strip() not in out
        assert "Zq7" not in out and "Canary" not in out


@pytest.mark.parametrize("value", [
    '{"key": "Zq7 Leak Canary 4242"}',  # invalid key inside a JSON section
    '{"key": "Zq7LeakCanary4242", ',  # broken JSON holding the key
    '{"key": ["Zq7LeakCanary4242"]}',  # wrong type
])
def test_key_in_bad_environment_json_is_not_echoed(tmp_path: Path, value: str) -> None:
    res = run_cli("--config", str(_config(tmp_path, ENV_ONLY)), "check-config",
                  env={"HAPROXY_FORWARDER_INTAKE": value})
    _assert_config_errors(res)
    assert "Zq7" not in res.stdout + res.stderr


def test_key_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[intake]\nkey = 7424242424242\n")
    res = run_cli("--config", str(cfg), "check-config")
    _assert_config_errors(res, "intake.key")
    assert "7424242424242" not in res.stdout + res.stderr


def test_key_in_invalid_toml_is_not_echoed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"[intake]\nkey = \"{SECRET_KEY}\nendpoint = \"array\"\n")
    res = run_cli("--config", str(cfg), "check-config")
    _assert_config_errors(res, "invalid TOML")
    assert SECRET_KEY not in res.stdout + res.stderr


def test_key_never_in_daemon_logs_through_401_and_retries(
    tmp_path: Path, intake: FakeIntake, daemon: MakeDaemon
) -> None:
    echo = b'{"message": "key ' + SECRET_KEY.encode() + b' is not valid"}'
    intake.inject(401, body=echo)
    intake.inject(400, body=echo)  # dead-lettered: its response is logged too
    d = daemon(intake, intake={"key": SECRET_KEY, "auth_retry": 0.1}, shutdown_timeout=0.5,
               log={"level": "debug", "format": "json", "stats_interval": 0.2})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "first")]))
    d.wait_log("dead_lettered")
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "second")]))
    wait_until(lambda: len(d.events("intake_refused_check_config")) >= 4, 10,
               "four 'intake_refused_check_config' lines (the 401 retried)")
    served = ""
    if d.status_port:  # the status endpoint is output too
        for path in ("/metrics", "/healthz"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{d.status_port}{path}",
                                            timeout=5) as resp:
                    served += resp.read().decode()
            except urllib.error.HTTPError as exc:  # /healthz may well be 503 here
                served += exc.read().decode()
        assert "intake" in served or "haproxy_forwarder" in served
    assert d.stop() == 0
    text = d.stderr_text() + d.stdout_path.read_text() + served
    assert "is not valid" in text  # the intake's answer was logged...
    assert SECRET_KEY not in text  # ...with the key masked
    assert intake.events == []


def test_send_test_wrong_key_exits_1_shows_401_not_the_key(tmp_path: Path,
                                                           intake: FakeIntake) -> None:
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": _intake(intake, key=SECRET_KEY)})
    res = run_cli("--config", str(cfg), "send-test")
    assert res.returncode == 1
    assert "401" in res.stdout
    assert SECRET_KEY not in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert intake.events == []


def test_send_test_does_not_print_key_echoed_by_the_intake(tmp_path: Path,
                                                           intake: FakeIntake) -> None:
    # Proxies and API gateways do echo the request in error pages; the /array body holds the key.
    intake.inject(400, body=b'{"message": "malformed: [{\\"intake_key\\": \\"'
                  + VALID_KEY.encode() + b'\\"}]"}')
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": _intake(intake)})
    res = run_cli("--config", str(cfg), "send-test")
    assert res.returncode == 1
    assert "400" in res.stdout
    assert VALID_KEY not in res.stdout + res.stderr


# -- send-test -----------------------------------------------------------------------------------


def test_send_test_delivers_one_event(tmp_path: Path, intake: FakeIntake) -> None:
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": _intake(intake)})
    res = run_cli("--config", str(cfg), "send-test")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "200" in res.stdout
    assert intake.url in res.stdout
    assert intake.wait_for(1, 10), f"events at the intake: want 1, got {len(intake.events)}"
    events = intake.events
    assert len(events) == 1
    assert "send-test" in events[0].event and __version__ in events[0].event
    assert VALID_KEY not in res.stdout + res.stderr


def test_send_test_intake_down_exits_1_clearly(tmp_path: Path, intake: FakeIntake) -> None:
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": _intake(intake, timeout=5.0)})
    intake.set_down(True)
    res = run_cli("--config", str(cfg), "send-test")
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    answer = [line for line in res.stdout.splitlines() if line.startswith("answer:")]
    assert len(answer) == 1, res.stdout
    assert "no answer" in answer[0] and "Connect" in answer[0]


# -- run --dry-run with util-linux logger -------------------------------------------------------


def _logger(*args: str) -> None:
    subprocess.run(["logger", *args], check=True, timeout=10)


def test_dry_run_prints_events_as_json_lines(daemon: MakeDaemon) -> None:
    if shutil.which("logger") is None:
        pytest.skip("`logger` not found: install the Debian package bsdutils (util-linux logger)")
    d = daemon(args=("--dry-run",))
    tag = uuid.uuid4().hex[:8]
    port = str(d.tcp_port)
    _logger("--tcp", "--octet-count", "-n", "127.0.0.1", "-P", port, "-t", "sshd",
            f"sshd {tag} must not appear")
    _logger("--tcp", "--octet-count", "-n", "127.0.0.1", "-P", port, "-t", "haproxy",
            f"rfc5424 octet {tag}")
    _logger("--rfc3164", "--tcp", "--octet-count", "-n", "127.0.0.1", "-P", port,
            "-t", "haproxy", f"rfc3164 octet {tag}")
    _logger("-d", "-n", "127.0.0.1", "-P", str(d.udp_port), "-t", "haproxy", f"udp {tag}")
    want = {f"rfc5424 octet {tag}", f"rfc3164 octet {tag}", f"udp {tag}"}
    wait_until(lambda: len(d.stdout_lines()) >= 3, 10, "three events on stdout",
               detail=d.stdout_lines)
    # All four messages read, nothing held: an extra event would be on stdout now.
    wait_at_rest(d.status_port, frames=4, detail=d.stderr_text)
    assert d.stop() == 0
    raw = d.stdout_path.read_text().splitlines()
    lines = [json.loads(x) for x in raw]
    assert all(set(x) == {"timestamp", "event"} for x in lines), lines
    assert {x["event"] for x in lines} == want
    assert len(lines) == 3
    assert all(isinstance(x["timestamp"], str) and x["timestamp"][:2] == "20" for x in lines)
    assert d.events("stopped")[-1]["filtered_out"] == 1
    # stdout holds events only; every log line went to stderr.
    assert all("level" not in x for x in lines)


# -- signals, startup failures, logs -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_exit_0(intake: FakeIntake, daemon: MakeDaemon,
                                          sig: signal.Signals) -> None:
    d = daemon(intake, batch={"max_delay": 30.0, "idle_flush": 30.0})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", f"flushed on {sig.name}")]))
    wait_until(lambda: samples(d.status_port)["accepted_events_total"] == 1, 10,
               "the event in the open batch")
    assert d.stop(sig) == 0
    assert [e.event for e in intake.events] == [f"flushed on {sig.name}"]
    assert d.events("stopping")[-1]["signal"] == sig.name
    assert d.events("stopped")
    assert "Traceback" not in d.stderr_text()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_listen_port_in_use_fails_with_one_line(tmp_path: Path, proto: str) -> None:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind(("127.0.0.1", 0))
        if proto == "tcp":
            busy.listen()
        port = busy.getsockname()[1]
        listen = {"tcp": ["127.0.0.1:0"], "udp": ["127.0.0.1:0"]}
        listen[proto] = [f"127.0.0.1:{port}"]
        cfg = _safe_config(tmp_path, listen=listen)
        res = run_cli("--config", str(cfg), "run", "--dry-run", timeout=20)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    records = [json.loads(line) for line in res.stderr.splitlines()]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, res.stderr
    error = errors[0]["error"]
    assert errors[0]["event"] == "startup_failed" and str(port) in error
    # uvloop words the UDP case "could not bind to local_addr (...)", without the errno text.
    assert "in use" in error if proto == "tcp" else "bind" in error
    assert not any(r["event"] == "started" for r in records)


def test_logs_are_json_lines_with_started_and_periodic_stats(intake: FakeIntake,
                                                             daemon: MakeDaemon) -> None:
    d = daemon(intake, log={"format": "json", "stats_interval": 0.2})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "counted")]))
    assert intake.wait_for(1, 10), "the event at the intake"
    wait_until(lambda: len(stats := d.events("stats")) >= 3 and stats[-1]["delivered_events"] == 1,
               10, "three stats lines, the last counting the delivery")
    assert d.stop() == 0
    lines = d.stderr_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"event", "level", "timestamp"} <= set(r) for r in records)
    started = [r for r in records if r["event"] == "started"]
    assert len(started) == 1 and started[0]["version"] == __version__
    assert started[0]["level"] == "info"
    stats = [r for r in records if r["event"] == "stats"]
    assert len(stats) >= 3
    assert stats[-1]["delivered_events"] == 1 and stats[-1]["accepted_events"] == 1
    for key in ("received_frames", "connections_accepted", "oversized_frames",
                "framing_errors", "delivered_events"):
        assert key in stats[-1]
    assert records[-1]["event"] == "stopped"
    assert d.stdout_path.read_text() == ""  # stdout is for dry-run events only


def test_region_works_with_the_shipped_example_config() -> None:
    res = run_cli("--config", str(REPO / "config" / "haproxy-forwarder.toml"), "check-config",
                  env={"HAPROXY_FORWARDER_INTAKE__REGION": "usa1"})
    assert _check_config_json(res)["intake"]["url"] == (
        "https://intake.usa1.sekoia.io/api/v1/intake-http"
    )


def test_too_few_file_descriptors_for_max_connections_is_said_at_start(tmp_path: Path) -> None:
    import resource

    cfg = tmp_path / "c.toml"
    write_toml(cfg, base_config(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "HAPROXY_FORWARDER_CONFIG"}
    err = tmp_path / "stderr.log"
    with err.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "haproxy_forwarder", "--config", str(cfg), "run",
             "--dry-run"],
            stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=REPO,
            # A hard limit below max_connections (1024) + margin: the soft one cannot be raised.
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)),
        )

    def logged() -> list[dict[str, Any]]:
        return [json.loads(x) for x in err.read_text().splitlines() if x.endswith("}")]

    def started() -> bool:
        return any(r["event"] == "started" for r in logged()) or proc.poll() is not None

    try:
        wait_until(started, 20, "the 'started' line (or the exit)", detail=err.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, err.read_text()
    lines = logged()
    warn = [r for r in lines if r["event"] == "fd_limit_low"]
    assert warn and warn[0]["nofile"] == 100 and warn[0]["max_connections"] == 1024


# -- --config before or after the command --------------------------------------------------------


def _max_events(res: subprocess.CompletedProcess[str]) -> int:
    return int(_check_config_json(res)["batch"]["max_events"])


def test_config_before_or_after_check_config(tmp_path: Path) -> None:
    a = _config(tmp_path, "[batch]\nmax_events = 101\n", "a.toml")
    b = _config(tmp_path, "[batch]\nmax_events = 202\n", "b.toml")
    assert _max_events(run_cli("--config", str(a), "check-config")) == 101
    assert _max_events(run_cli("check-config", "--config", str(a))) == 101
    assert _max_events(run_cli("check-config", "-c", str(b))) == 202
    # Both places: the one after the command wins, as --help says.
    assert _max_events(run_cli("-c", str(a), "check-config", "--config", str(b))) == 202
    assert _max_events(run_cli("--config", str(b), "check-config", "-c", str(a))) == 101
    assert "the one after the command wins" in " ".join(run_cli("--help").stdout.split())


def test_config_before_or_after_spool_stats(tmp_path: Path) -> None:
    cfg_a = tmp_path / "a.toml"
    cfg_b = tmp_path / "b.toml"
    write_toml(cfg_a, {"spool": {"dir": str(tmp_path / "spool-a")}})
    write_toml(cfg_b, {"spool": {"dir": str(tmp_path / "spool-b")}})

    def spool_dir(*args: str) -> str:
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        return str(json.loads(res.stdout)["spool_dir"])

    assert spool_dir("--config", str(cfg_a), "spool", "stats") == str(tmp_path / "spool-a")
    assert spool_dir("spool", "stats", "--config", str(cfg_a)) == str(tmp_path / "spool-a")
    assert spool_dir("spool", "-c", str(cfg_b), "stats") == str(tmp_path / "spool-b")
    assert spool_dir("-c", str(cfg_a), "spool", "stats", "-c", str(cfg_b)) == str(
        tmp_path / "spool-b")


class _DaemonConfigAfter(Daemon):
    """`haproxy-forwarder run --config FILE`: what people type."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "haproxy_forwarder", "run", "--config",
                str(self.config_path), *self.args]


def test_run_with_config_after_the_command(tmp_path: Path) -> None:
    with _DaemonConfigAfter(tmp_path, base_config(tmp_path), args=("--dry-run",)) as d:
        send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "config after run")]))
        wait_until(d.stdout_lines, 10, "the event on stdout")
        assert d.stop() == 0
    assert [x["event"] for x in d.stdout_lines()] == ["config after run"]
    # The config after `run` is the one read, also when another one comes before it.
    missing = tmp_path / "missing.toml"
    for args in (("run", "--config", str(missing)),
                 ("--config", str(d.config_path), "run", "--dry-run", "-c", str(missing))):
        lines = _assert_config_errors(run_cli(*args, timeout=20), str(missing))
        assert "not found" in lines[0]


# -- status: a summary of the running daemon's /healthz and /metrics -----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _metric(port: int, name: str) -> float:
    for line in _get(f"http://127.0.0.1:{port}/metrics")[1].decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def _wait_metric(port: int, name: str, value: float, timeout: float = 10.0) -> None:
    wait_until(lambda: _metric(port, name) == value, timeout, f"{name} at {value}", step=0.05,
               detail=lambda: _metric(port, name))


def _rows(stdout: str) -> tuple[dict[str, str], list[str]]:
    """The table as {label: value}, and the health reasons (the `- ...` lines)."""
    rows: dict[str, str] = {}
    reasons: list[str] = []
    for line in stdout.splitlines()[1:]:
        m = re.match(r"^ {2}(\S.*?) {2,}(.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
        else:
            reasons.append(line.strip().removeprefix("- "))
    return rows, reasons


class _Live:
    """One daemon for the status tests that only read: 1 event dead-lettered, 7 delivered,
    2 filtered out."""

    def __init__(self, d: Daemon, fi: FakeIntake) -> None:
        self.d = d
        self.fi = fi
        self.url = f"http://127.0.0.1:{d.status_port}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Live]:
    tmp = tmp_path_factory.mktemp("status")
    with FakeIntake() as fi:
        cfg = base_config(tmp, intake=_intake(fi), status={"listen": f"127.0.0.1:{_free_port()}"})
        with Daemon(tmp, cfg) as d:
            fi.inject(400)
            send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "refused")]))
            _wait_metric(d.status_port, "haproxy_forwarder_dead_lettered_events_total", 1)
            send_tcp(d.tcp_port, octet_counted(
                [traditional("haproxy", f"ok {i}") for i in range(7)]
                + [traditional("sshd", "not for the intake")] * 2))
            _wait_metric(d.status_port, "haproxy_forwarder_delivered_events_total", 7)
            assert fi.wait_for(7), f"events at the intake: want 7, got {len(fi.events)}"
            yield _Live(d, fi)


def test_status_table_shows_what_was_sent(live: _Live) -> None:
    # status.listen read from the config, given after the command.
    res = run_cli("status", "--config", str(live.d.config_path), "--once")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    assert res.stdout.splitlines()[0] == f"status of {live.url}"
    rows, reasons = _rows(res.stdout)
    assert reasons == []
    assert rows["health"] == "ok"
    assert rows["received"] == "10 frames, 8 events accepted"
    assert rows["delivered"] == "7 events"
    assert rows["dead-lettered"] == "1 event"
    assert rows["dropped"] == "0 events (UDP under backpressure 0, spool drop_oldest 0)"
    assert rows["in memory"] == "0 batches"
    assert rows["spool"] == "empty"
    assert rows["input"] == "n/a (--once)"
    assert re.fullmatch(r"\d+\.\d s ago", rows["last delivery"]), rows["last delivery"]
    assert rows["backpressure"] == "off"
    assert rows["intake"] == "ok"
    started = live.d.events("started")[0]
    assert f"ingest {started['ingest']}" in rows["running"]
    assert f"version {__version__}" in rows["running"]


def test_status_json_for_scripts(live: _Live) -> None:
    res = run_cli("--config", str(live.d.config_path), "status", "--json", "--once")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["url"] == live.url and report["health"] == "ok" and report["reasons"] == []
    assert report["totals"] == {
        "received_frames": 10, "accepted_events": 8, "delivered_events": 7,
        "dead_lettered_events": 1, "dropped_events": 0, "udp_dropped": 0,
        "spool_dropped_events": 0,
    }
    assert report["backlog"]["in_memory_batches"] == 0
    assert report["backlog"]["spool_events"] == 0
    assert report["rates"]["accepted_events_per_second"] is None  # --once
    assert report["delivered_since_start"] is True
    assert 0 <= report["last_delivery_seconds_ago"] < 300
    assert report["backpressure"] is False and report["intake_failing"] is False
    started = live.d.events("started")[0]
    assert report["build"] == {k: started[k] for k in report["build"]}
    assert report["build"]["version"] == __version__
    # --url instead of the config: the same daemon, the same figures.
    by_url = run_cli("status", "--url", live.url + "/", "--json", "--once")
    assert by_url.returncode == 0
    assert json.loads(by_url.stdout)["totals"] == report["totals"]


def test_status_rates_from_two_scrapes(tmp_path: Path, daemon: MakeDaemon) -> None:
    # Dry-run: no spool, so its series are absent and said to be n/a.
    d = daemon(args=("--dry-run",))
    proc = subprocess.Popen(
        [sys.executable, "-m", "haproxy_forwarder", "status", "--json",
         "--url", f"http://127.0.0.1:{d.status_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    sent = 0
    while proc.poll() is None:  # a steady stream while status takes its two scrapes
        send_tcp(d.tcp_port, octet_counted([traditional("haproxy", f"r{sent}"),
                                            traditional("sshd", "filtered")]))
        sent += 1
        time.sleep(0.02)  # the stream's pace: traffic to measure, no wait for the daemon
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    report = json.loads(out)
    rates = report["rates"]
    assert 0.9 <= rates["interval_seconds"] < 30
    assert 0 < rates["accepted_events_per_second"] <= rates["received_frames_per_second"]
    assert report["backlog"]["spool_batches"] is None
    assert report["totals"]["accepted_events"] <= sent
    text = run_cli("status", "--url", f"http://127.0.0.1:{d.status_port}", "--once")
    assert _rows(text.stdout)[0]["spool"].startswith("n/a")


def test_status_nothing_listening_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    port = _free_port()
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"status": {"listen": f"0.0.0.0:{port}"}})  # reached on loopback
    line = f"no daemon answering on http://127.0.0.1:{port} (is it running? status.listen?)\n"
    res = run_cli("status", "-c", str(cfg))
    assert (res.returncode, res.stdout, res.stderr) == (1, "", line)
    res = run_cli("status", "--url", f"http://127.0.0.1:{port}", "--json")
    assert res.returncode == 1 and res.stderr == line
    assert json.loads(res.stdout)["health"] == "unreachable"


def test_status_usage_errors_exit_2(tmp_path: Path) -> None:
    for url in ("https://127.0.0.1:9514", "127.0.0.1:9514", "http://127.0.0.1:9514/metrics"):
        res = run_cli("status", "--url", url)
        assert res.returncode == 2 and "usage:" in res.stderr, url
        assert "http://HOST:PORT" in res.stderr and "Traceback" not in res.stderr
    cfg = _config(tmp_path, "[status]\nlisten = \"\"\n")
    res = run_cli("status", "-c", str(cfg))
    assert res.returncode == 2 and "status.listen" in res.stderr


def test_status_of_something_else_exits_1(tmp_path: Path) -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = run_cli("status", "--url", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 1
    assert "not as a haproxy-forwarder status endpoint" in res.stderr
    assert "404" in res.stderr and "Traceback" not in res.stderr


def test_status_of_a_failing_daemon_exits_1_with_the_reason(intake: FakeIntake,
                                                            daemon: MakeDaemon) -> None:
    intake.set_down(True)
    d = daemon(intake, intake={"retry_max": 0.5}, spool={"mode": "always"},
               status={"stall_after": 0.5})
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", f"held {i}") for i in range(5)]))
    healthz = f"http://127.0.0.1:{d.status_port}/healthz"
    wait_until(lambda: _get(healthz)[0] == 503, 15, "/healthz at 503", step=0.05)
    _wait_metric(d.status_port, "haproxy_forwarder_spool_events", 5)
    reasons = json.loads(_get(healthz)[1])["reasons"]
    assert reasons
    res = run_cli("status", "--url", f"http://127.0.0.1:{d.status_port}", "--once")
    assert res.returncode == 1, res.stdout + res.stderr
    rows, printed = _rows(res.stdout)
    assert rows["health"] == "failing"

    def digits(text: str) -> str:  # the reasons say for how many seconds
        return re.sub(r"\d+", "N", text)

    assert [digits(r) for r in printed] == [digits(r) for r in reasons]
    assert re.match(r"\d+ batch(es)?, 5 events, \d+ B, oldest ", rows["spool"]), rows["spool"]
    assert rows["delivered"] == "0 events"
    assert rows["last delivery"] == "none since start"
    assert rows["intake"] == "failing"
    res = run_cli("status", "--url", f"http://127.0.0.1:{d.status_port}", "--once", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["health"] == "failing" and report["backlog"]["spool_events"] == 5
    assert intake.events == []


# -- check-config warns about settings that work but are risky -----------------------------------


RISKY: dict[str, tuple[dict[str, Any], str]] = {
    "dry_run": ({"intake": {"dry_run": True}}, "intake.dry_run"),
    "concurrency_unordered_endpoint": (
        {"intake": {"concurrency": 2, "endpoint": "plain-batch"}}, "intake.concurrency = 2"),
    "drop_oldest": ({"spool": {"when_full": "drop_oldest"}}, "spool.when_full"),
    "plain_http_loopback": ({"intake": {"url": "http://127.0.0.1:8080"}},
                            "intake.url = http://127.0.0.1:8080"),
    "status_on_network": ({"status": {"listen": "0.0.0.0:9514"}}, "status.listen"),
}


def _warnings(res: subprocess.CompletedProcess[str]) -> list[str]:
    _check_config_json(res)  # still exit 0 and the config on stdout
    lines = res.stderr.splitlines()
    assert all(line.startswith("warning: ") for line in lines), lines
    return lines


@pytest.mark.parametrize("case", sorted(RISKY))
def test_check_config_warns_about_a_risky_setting(tmp_path: Path, case: str) -> None:
    sections, needle = RISKY[case]
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {**sections, "intake": {"key": VALID_KEY, **sections.get("intake", {})}})
    lines = _warnings(run_cli("check-config", "--config", str(cfg)))
    assert len(lines) == 1 and needle in lines[0], lines


def test_check_config_warns_that_drop_oldest_deletes_acknowledged_relp_messages(
        tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": {"key": VALID_KEY}, "spool": {"when_full": "drop_oldest"},
                     "listen": {"relp": ["127.0.0.1:2514"]}})
    lines = _warnings(run_cli("check-config", "--config", str(cfg)))
    assert len(lines) == 2 and "listen.relp" in lines[1] and "block" in lines[1], lines


def test_check_config_names_the_private_ca_file(tmp_path: Path, intake: FakeIntake) -> None:
    cfg = tmp_path / "c.toml"
    write_toml(cfg, {"intake": _intake(intake)})
    lines = _warnings(run_cli("check-config", "--config", str(cfg)))
    assert len(lines) == 1 and "intake.ca_file" in lines[0], lines
    assert str(intake.ca_file) in lines[0]


def test_check_config_no_warning_for_the_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    # Concurrency with the array endpoint (the default): each event carries its own time.
    write_toml(cfg, {"intake": {"key": VALID_KEY, "concurrency": 8}})
    assert _warnings(run_cli("check-config", "--config", str(cfg))) == []
    shipped = run_cli("--config", str(REPO / "config" / "haproxy-forwarder.toml"),
                      "check-config", env={"HAPROXY_FORWARDER_INTAKE__KEY": VALID_KEY})
    assert _warnings(shipped) == []
