"""The intake key never leaves the process: one scenario through everything that writes
output, logs or files, then every byte of it searched for the key (and its encoded forms).

The intake here echoes the request (body and headers, as proxies' error pages do) in every
forced answer, and the /array endpoint without gzip carries the key in every body: the
answers the daemon stores and logs are full of it unless it is scrubbed.
"""

from __future__ import annotations

import base64
import signal
import urllib.parse
import urllib.request
from pathlib import Path

from devtools.daemon import Daemon, base_config, run_cli, write_toml
from devtools.probe import wait_until
from devtools.traffic import octet_counted, send_tcp, traditional
from tests.conftest import intake_section
from tests.fake_intake import VALID_KEY, FakeIntake

FORMS = {
    "key": VALID_KEY.encode(),
    "url-encoded": urllib.parse.quote(VALID_KEY, safe="").encode(),
    "base64": base64.b64encode(VALID_KEY.encode()),
    "base64 basic auth": base64.b64encode(f":{VALID_KEY}".encode()),
    "reversed": VALID_KEY[::-1].encode(),  # nobody writes it so; a cheap sanity check
}


def get(d: Daemon, path: str) -> bytes:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.status_port}{path}", timeout=5) as r:
            return bytes(r.read())
    except urllib.error.HTTPError as exc:  # /healthz answers 503 while the intake is down
        return bytes(exc.read())


def metric(body: bytes, name: str) -> float:
    """The sample, its labelled series (per intake) summed."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith((f"haproxy_forwarder_{name} ", f"haproxy_forwarder_{name}{{")))


def send(d: Daemon, *texts: str) -> None:
    send_tcp(d.tcp_port, octet_counted(traditional("haproxy", t) for t in texts))


def test_the_key_appears_nowhere(intake: FakeIntake, tmp_path: Path) -> None:
    out: dict[str, bytes] = {}  # everything a user or operator could see, by where
    cfg = base_config(tmp_path, intake=intake_section(
        intake, gzip=False, auth_retry=0.2, retry_max=0.5, timeout=3.0),
        log={"level": "debug", "format": "json", "stats_interval": 0.5})
    config = tmp_path / "config.toml"
    d = Daemon(tmp_path, cfg, config_path=config).start()

    # deliveries
    send(d, *(f"delivered {i}" for i in range(20)))
    assert intake.wait_for(20), f"events at the intake: want 20, got {len(intake.events)}"
    # a 401, then flows
    intake.inject(401, echo=True)
    send(d, "through a 401")
    d.wait_log("intake_refused_check_config")
    assert intake.wait_for(21), f"events at the intake: want 21, got {len(intake.events)}"
    # a 400: dead-lettered with the (echoed) answer
    intake.inject(400, echo=True)
    send(d, "dead-lettered")
    d.wait_log("dead_lettered")
    # a 413 from a body limit and a 503, both echoing: retried
    intake.inject(413, echo=True)
    intake.inject(503, echo=True)
    send(d, "through 413 and 503")
    assert intake.wait_for(22), f"events at the intake: want 22, got {len(intake.events)}"
    # spooling: the intake down, batches on disk
    intake.set_down(True)
    send(d, *(f"spooled {i}" for i in range(50)))
    wait_until(lambda: metric(get(d, "/metrics"), "spool_appended_batches_total") > 0, 10,
               "a batch on the spool while the intake is down")
    out["/metrics while down"] = get(d, "/metrics")
    out["/healthz while down"] = get(d, "/healthz")
    out["status command"] = run_cli("--config", str(config), "status", "--once",
                                    "--json").stdout.encode()
    # SIGHUP, then the intake back: the spool drains
    d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    d.wait_log("reloaded")
    intake.set_down(False)
    assert intake.wait_for(72, 20), f"events at the intake: want 72, got {len(intake.events)}"
    out["/metrics"] = get(d, "/metrics")
    out["/healthz"] = get(d, "/healthz")
    assert d.stop(signal.SIGTERM) == 0

    # the CLI commands that read the config
    for name, args in {
        "check-config": ["check-config"],
        "send-test": ["send-test"],
        "spool stats": ["spool", "stats"],
    }.items():
        res = run_cli("--config", str(config), *args)
        assert res.returncode == 0, res.stderr
        out[f"{name} stdout"], out[f"{name} stderr"] = res.stdout.encode(), res.stderr.encode()
    intake.inject(400, echo=True)
    res = run_cli("--config", str(config), "send-test")
    assert res.returncode == 1 and "400" in res.stdout and "Bad request" in res.stdout
    out["send-test 400 stdout"], out["send-test 400 stderr"] = (res.stdout.encode(),
                                                               res.stderr.encode())
    # dry-run: events on stdout, the key configured but never sent nor shown
    dry_cfg = tmp_path / "dry.toml"
    write_toml(dry_cfg, {**cfg, "spool": {"dir": str(tmp_path / "dry-spool")}})
    dry = Daemon(tmp_path, {**cfg, "spool": {"dir": str(tmp_path / "dry-spool")}},
                 args=["--dry-run"], config_path=dry_cfg, file_prefix="dry").start()
    send(dry, "dry one")
    wait_until(dry.stdout_lines, 10, "the dry-run event on stdout")
    assert dry.stop() == 0

    # the scenario really went through what it claims
    logs = {r.get("event") for r in d.logs()}
    assert {"intake_refused_check_config", "dead_lettered", "intake_body_limit_check_proxy",
            "intake_retry", "reloaded"} <= logs
    dead = list((tmp_path / "spool" / "dead-letter").glob("*.jsonl"))
    assert dead and b"Bad request" in dead[0].read_bytes()
    assert b"dry one" in dry.stdout_path.read_bytes()

    # every daemon's stdout and stderr, and every file under both spool directories
    for path in tmp_path.glob("*.log"):
        out[path.name] = path.read_bytes()
    for path in tmp_path.glob("*.out"):
        out[path.name] = path.read_bytes()
    for spool in (tmp_path / "spool", tmp_path / "dry-spool"):
        for path in spool.rglob("*"):
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(tmp_path))] = path.read_bytes()
    searched = set(out)
    assert {"check-config stdout", "send-test stdout", "/metrics"} <= searched
    assert any("dead-letter" in k for k in searched)
    assert len(searched) > 15, sorted(searched)
    leaks = [(where, form) for where, data in out.items()
             for form, needle in FORMS.items() if needle in data]
    assert leaks == [], leaks
