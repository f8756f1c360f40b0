"""intake.key_file (the key in a file only its owner reads, re-read on SIGHUP) and
intake.insecure_skip_verify (off unless asked for, and then warned about at each start)."""

from __future__ import annotations

import signal
from pathlib import Path

from devtools.daemon import Daemon, base_config, run_cli
from devtools.keys import INTAKE_KEY as VALID_KEY
from devtools.probe import wait_until
from devtools.toml import write_toml
from devtools.traffic import octet_frame, send_tcp, traditional
from tests.fake_intake import FakeIntake

OTHER_KEY = "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4"


def key_file(tmp: Path, key: str, mode: int = 0o600, name: str = "intake.key") -> Path:
    path = tmp / name
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def check_config(tmp: Path, intake: dict[str, object]) -> tuple[int, str, str]:
    cfg = tmp / "check.toml"
    write_toml(cfg, base_config(tmp, intake=intake))
    res = run_cli("--config", str(cfg), "check-config")
    return res.returncode, res.stdout, res.stderr


def test_the_key_is_read_from_its_file_and_never_shown(tmp_path: Path) -> None:
    path = key_file(tmp_path, VALID_KEY)
    rc, out, err = check_config(tmp_path, {"key_file": str(path)})
    assert rc == 0, err
    assert VALID_KEY not in out + err
    assert '"key": "********"' in out and str(path) in out


def test_a_key_file_others_can_read_is_refused_naming_the_mode_not_the_key(
    tmp_path: Path,
) -> None:
    for mode in (0o644, 0o640, 0o604, 0o660):
        path = key_file(tmp_path, VALID_KEY, mode)
        rc, out, err = check_config(tmp_path, {"key_file": str(path)})
        assert rc == 2, (oct(mode), out, err)
        assert f"has mode {mode:04o}" in err and "chmod 600" in err
        assert VALID_KEY not in out + err


def test_bad_key_files_are_refused_with_one_clear_line(tmp_path: Path) -> None:
    secret = "not a key: has spaces"
    cases = {
        "missing": (tmp_path / "absent.key", "No such file"),
        "empty": (key_file(tmp_path, "", name="empty.key"), "is empty"),
        "not alnum": (key_file(tmp_path, secret, name="bad.key"), "must be alphanumeric"),
        "a folder": (tmp_path, "is not a regular file"),
    }
    for what, (path, message) in cases.items():
        rc, out, err = check_config(tmp_path, {"key_file": str(path)})
        assert rc == 2 and message in err, (what, err)
        assert secret not in out + err
    both = key_file(tmp_path, VALID_KEY, name="both.key")
    rc, _, err = check_config(tmp_path, {"key": VALID_KEY, "key_file": str(both)})
    assert rc == 2 and "either intake.key or intake.key_file" in err
    assert VALID_KEY not in err


def _events(d: Daemon, first: int, n: int) -> None:
    send_tcp(d.tcp_port, b"".join(
        octet_frame(traditional("haproxy", f"event {first + i}")) for i in range(n)))


def test_the_daemon_uses_the_file_key_and_a_new_one_after_sighup(tmp_path: Path) -> None:
    path = key_file(tmp_path, VALID_KEY)
    with FakeIntake() as fi:
        cfg = base_config(tmp_path, intake={"url": fi.url, "ca_file": fi.ca_file,
                                            "key_file": str(path)})
        d = Daemon(tmp_path, cfg).start()
        try:
            _events(d, 0, 5)
            assert fi.wait_for(5, 15), d.stderr_text()
            # The key is rotated: the intake now only takes the new one.
            fi.key = OTHER_KEY
            path.write_text(OTHER_KEY + "\n")
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            d.wait_log("reloaded")
            _events(d, 5, 5)
            assert fi.wait_for(10, 15), d.stderr_text()
            assert sorted(e.event for e in fi.events) == [f"event {i}" for i in range(10)]
            # A key file made readable by others is refused at the next reload: old key kept.
            path.chmod(0o644)
            d.proc.send_signal(signal.SIGHUP)
            d.wait_log("reload_failed")
            failed = d.events("reload_failed")
            assert any("has mode 0644" in str(f) for f in failed), d.stderr_text()
            _events(d, 10, 1)
            assert fi.wait_for(11, 15), d.stderr_text()
        finally:
            d.stop()
        logs = d.stderr_text() + d.stdout_path.read_text()
        assert VALID_KEY not in logs and OTHER_KEY not in logs


def test_tls_verification_is_only_skipped_when_asked_and_then_warned(tmp_path: Path) -> None:
    with FakeIntake() as fi:
        # No ca_file: the fake intake's certificate is not trusted.
        strict = base_config(tmp_path / "a", intake={"url": fi.url, "key": VALID_KEY,
                                                     "retry_max": 0.5})
        d = Daemon(tmp_path, strict).start()
        try:
            _events(d, 0, 3)
            wait_until(lambda: len(d.events("intake_retry")) >= 2, 10,
                       "two 'intake_retry' lines (certificate refused)", detail=d.stderr_text)
            retries = d.events("intake_retry")
            assert "CERTIFICATE_VERIFY_FAILED" in str(retries[0]), retries[0]
            assert fi.events == [], "delivered to an intake whose certificate is not trusted"
            assert not d.events("intake_tls_verification_disabled")
        finally:
            d.stop(signal.SIGKILL)
        loose = base_config(tmp_path / "b", intake={"url": fi.url, "key": VALID_KEY,
                                                    "insecure_skip_verify": True})
        d2 = Daemon(tmp_path, loose, file_prefix="loose").start()
        try:
            assert d2.events("intake_tls_verification_disabled"), d2.stderr_text()
            _events(d2, 0, 3)
            assert fi.wait_for(3, 15), d2.stderr_text()
        finally:
            d2.stop()
    rc, _, err = check_config(tmp_path, {"key": VALID_KEY, "insecure_skip_verify": True})
    assert rc == 0 and "warning: intake.insecure_skip_verify = true" in err
