"""The container image: the Dockerfile built with podman and run for real (issue 20).

The image is built from a Debian 12 base made with debootstrap (no image registry is used) by
devtools/container.py, once, and reused while nothing that goes into it changes (its tag is a
hash of the Dockerfile, the build context and the base). The containers run on the host
network, so the daemon inside reaches the fake intake on 127.0.0.1, its CA mounted in.

Skipped, with one line saying why, without podman/runc, as non-root, or without debootstrap and
a Debian mirror when the base image is not there yet. The static checks (Dockerfile, compose)
always run. Here: the first run about 2 minutes (debootstrap ~65 s, the build ~50 s), then
about 40 s with the image reused.
"""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import haproxy_forwarder
from devtools import container
from devtools.probe import metric, wait_at_rest, wait_until
from devtools.traffic import haproxy_line, octet_counted, send_tcp, traditional
from tests.fake_intake import VALID_KEY, FakeIntake

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
SHIPPED_CONFIG = tomllib.loads((REPO / "config/haproxy-forwarder.toml").read_text())

pytestmark = pytest.mark.timeout(1800)  # a first build: debootstrap, then the image

# Inside the container: where the test mounts the intake's CA and the key (as compose does).
CA_IN = "/etc/haproxy-forwarder/intake-ca.pem"
KEY_IN = "/run/secrets/intake_key"
# compose.yaml's hardening, applied to the test containers too (not its nofile ulimit: this
# machine refuses more than its own limit; containers.conf gives 1024).
HARDENED = ("--read-only", "--read-only-tmpfs=false", "--cap-drop=all",
            "--security-opt=no-new-privileges")


# -- static: the Dockerfile and compose.yaml agree with the package and its config ---------


def _dockerfile_instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def test_dockerfile_matches_the_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    args = dict(a.split("=", 1) for a in _dockerfile_instructions("ARG") if "=" in a)
    assert args["VERSION"] == project["version"] == haproxy_forwarder.__version__, \
        "the Dockerfile's ARG VERSION (its OCI version label by default) must follow pyproject"
    assert args["BASE"].startswith("docker.io/library/python:3.")
    labels = " ".join(_dockerfile_instructions("LABEL"))
    assert f'org.opencontainers.image.licenses="{project["license"]["text"]}"' in labels
    assert project["license"]["text"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text()
    for label in ("version", "source", "revision"):
        assert f"org.opencontainers.image.{label}=" in labels
    # The daemon is PID 1 (exec form), gets SIGTERM, runs as a non-root numeric user.
    assert _dockerfile_instructions("ENTRYPOINT") == ['["haproxy-forwarder"]']
    assert _dockerfile_instructions("STOPSIGNAL") == ["SIGTERM"]
    (user,) = _dockerfile_instructions("USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user) and user.split(":")[0] == str(container.UID)
    assert _dockerfile_instructions("VOLUME") == [f'["{SHIPPED_CONFIG["spool"]["dir"]}"]']
    assert SHIPPED_CONFIG["spool"]["dir"] == container.SPOOL_DIR
    (health,) = _dockerfile_instructions("HEALTHCHECK")
    assert 'CMD ["haproxy-forwarder", "status", "--once"]' in health
    assert "ENV" in DOCKERFILE and "HAPROXY_FORWARDER_EXPECT_COMPILED=1" in DOCKERFILE
    ports = {p.split(":")[-1] for p in SHIPPED_CONFIG["listen"]["tcp"]}
    (exposed,) = _dockerfile_instructions("EXPOSE")
    assert {f"{p}/tcp" for p in ports} <= set(exposed.split())


def test_dockerignore_lets_in_what_the_image_key_hashes() -> None:
    """devtools/container.py keys the cached image on CONTEXT_PATHS: the same list as
    .dockerignore lets in, or a change would not rebuild it (or a build would miss a file)."""
    allowed = [line[1:] for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sorted(allowed) == sorted(container.CONTEXT_PATHS)
    copied = " ".join(_dockerfile_instructions("COPY"))
    for path in container.CONTEXT_PATHS:
        assert path.split("/")[-1] in copied, f"{path} is in the context but never copied"


def test_compose_file() -> None:
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    svc = compose["services"]["forwarder"]
    assert svc["build"]["context"] == "."
    volume, target = svc["volumes"][0].split(":")
    assert target == container.SPOOL_DIR and volume in compose["volumes"]
    ports = set(svc["ports"])
    assert {"1514:1514/tcp", "1514:1514/udp", "127.0.0.1:9514:9514"} <= ports
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert env["HAPROXY_FORWARDER_STATUS__LISTEN"].endswith(":9514")
    # The key as a secret, read through intake.key_file from where compose mounts it.
    (secret,) = svc["secrets"]
    assert env["HAPROXY_FORWARDER_INTAKE__KEY_FILE"] == f"/run/secrets/{secret}"
    assert secret in compose["secrets"]
    assert svc["healthcheck"]["test"] == ["CMD-SHELL", "haproxy-forwarder status --once"]
    assert svc["image"].startswith("localhost/")  # podman resolves no short name
    grace = int(svc["stop_grace_period"].rstrip("s"))
    assert grace > SHIPPED_CONFIG["shutdown_timeout"] + 2 * 2  # drain + delivery + spooling
    # Every variable names a setting the daemon knows, and the whole is a valid config: the
    # shipped config with compose's environment, a key file as compose mounts it.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp, "intake_key")
        key.write_text(VALID_KEY + "\n")
        key.chmod(0o600)
        run_env = {k: v for k, v in os.environ.items()
                   if not k.startswith("HAPROXY_FORWARDER_")}
        run_env |= env | {"HAPROXY_FORWARDER_INTAKE__KEY_FILE": str(key)}
        proc = subprocess.run(
            [sys.executable, "-m", "haproxy_forwarder", "--config",
             str(REPO / "config/haproxy-forwarder.toml"), "check-config"],
            capture_output=True, text=True, env=run_env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["status"]["listen"] == "0.0.0.0:9514"
    assert "is not set" not in proc.stderr, proc.stderr


# -- podman ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Iterator[str]:
    """The image of this tree (built once, then reused); containers and volumes of this run
    removed at the end."""
    problem = container.podman_problem() or container.base_problem()
    if problem is not None:
        pytest.skip(problem)
    t0 = time.monotonic()
    built = container.ensure_image()
    took = time.monotonic() - t0
    # Said on the terminal (not captured): the first build is what the suite's time hides.
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    what = f"built in {built.seconds:.0f} s" if built.built else "reused"
    line = f"\ncontainer image {built.name}: {what} (ready in {took:.0f} s, base included)"
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(line, file=sys.stderr)
    try:
        yield built.name
    finally:
        container.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _frames(start: int, n: int) -> tuple[bytes, list[str]]:
    """n octet-counted frames, every tenth from sshd (filtered out); the HAProxy events
    expected at the intake, unique per index (the second batch of a test must not repeat the
    first's lines, or a duplicate would pass for one of them)."""
    frames, expected = [], []
    for i in range(start, start + n):
        if i % 10 == 9:
            frames.append(traditional("sshd", f"Accepted publickey for user{i} from 10.0.0.1"))
        else:
            line = haproxy_line(i)
            frames.append(traditional("haproxy", line))
            expected.append(line)
    return octet_counted(frames), expected


def _key_file(tmp: Path) -> Path:
    """The key as compose's secret gives it: a file of the image's user, mode 0600."""
    key = tmp / "intake.key"
    key.write_text(VALID_KEY + "\n")
    key.chmod(0o600)
    os.chown(key, container.UID, container.UID)
    return key


def _run_env(intake: FakeIntake, status_port: int, **more: str) -> dict[str, str]:
    return {
        "HAPROXY_FORWARDER_INTAKE__URL": intake.url,
        "HAPROXY_FORWARDER_INTAKE__CA_FILE": CA_IN,
        "HAPROXY_FORWARDER_INTAKE__KEY_FILE": KEY_IN,
        # Host network: ports the OS chooses (read back from the "listening" lines), and a
        # status port of our own, which the HEALTHCHECK reads through status.listen.
        "HAPROXY_FORWARDER_LISTEN__TCP": '["127.0.0.1:0"]',
        "HAPROXY_FORWARDER_LISTEN__UDP": '["127.0.0.1:0"]',
        "HAPROXY_FORWARDER_STATUS__LISTEN": f"127.0.0.1:{status_port}",
        "HAPROXY_FORWARDER_BATCH__MAX_DELAY": "0.2",
        **more,
    }


def test_image_as_built(image: str) -> None:
    info = container.image_inspect(image)
    config = info["Config"]
    # Non-root, numeric (orchestrators check runAsNonRoot against it).
    assert config["User"] == f"{container.UID}:{container.UID}"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == haproxy_forwarder.__version__
    assert re.fullmatch(r"[0-9a-f]{40}|", labels["org.opencontainers.image.revision"])
    assert "org.opencontainers.image.source" in labels
    # Kept because devtools builds with --format docker (OCI drops it).
    assert info["Healthcheck"]["Test"] == ["CMD", "haproxy-forwarder", "status", "--once"]
    assert config["Entrypoint"] == ["haproxy-forwarder"] and config["Cmd"] == ["run"]
    assert config["StopSignal"] == "SIGTERM"
    assert container.SPOOL_DIR in config["Volumes"]
    assert "HAPROXY_FORWARDER_EXPECT_COMPILED=1" in config["Env"]

    version = container.run_once(image, "--version").stdout
    assert "ingest: native" in version, version
    # The final stage has no compiler (the build stage had gcc).
    tools = container.run_once(image, "-c", "command -v gcc cc c99 || true",
                               options=["--entrypoint", "sh"]).stdout
    assert tools.strip() == "", f"a compiler in the image: {tools}"
    # The shipped config is valid in the image, its spool on the volume.
    checked = container.run_once(image, "check-config",
                                 options=["-e", f"HAPROXY_FORWARDER_INTAKE__KEY={VALID_KEY}"])
    assert json.loads(checked.stdout)["spool"]["dir"] == container.SPOOL_DIR


def test_refuses_to_start_without_the_compiled_core(image: str, tmp_path: Path) -> None:
    """The image requires its compiled core (HAPROXY_FORWARDER_EXPECT_COMPILED=1 in its
    environment): with `_native` unloadable (an empty file over it: as a broken or foreign
    build would be), the daemon refuses to start, exit 1, saying why. An operator who asks for
    the pure-Python reader (HAPROXY_FORWARDER_NO_EXTENSIONS=1) gets it: a choice, not a fault."""
    native = container.run_once(
        image, "-c", "import haproxy_forwarder.ingest._native as m; print(m.__file__)",
        options=["--entrypoint", "python"]).stdout.strip()
    assert native.endswith(".so"), native
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    empty.chmod(0o644)
    env = {"HAPROXY_FORWARDER_INTAKE__KEY": VALID_KEY,
           "HAPROXY_FORWARDER_LISTEN__TCP": '["127.0.0.1:0"]',
           "HAPROXY_FORWARDER_LISTEN__UDP": '["127.0.0.1:0"]',
           "HAPROXY_FORWARDER_STATUS__LISTEN": ""}
    broken = container.Container(image, env=env, mounts=[f"{empty}:{native}:ro"]).start()
    try:
        assert broken.wait_exit(60) == 1, broken.logs()
        refused = broken.events("startup_failed")
        assert refused and "HAPROXY_FORWARDER_EXPECT_COMPILED=1" in refused[-1]["error"], \
            broken.logs()
        assert broken.events("ingest_extension_failed"), broken.logs()
        assert not broken.events("started")
    finally:
        broken.remove()
    chosen = container.Container(image, env=env | {"HAPROXY_FORWARDER_NO_EXTENSIONS": "1"},
                                 mounts=[f"{empty}:{native}:ro"]).start()
    try:
        started = chosen.wait_started().events("started")[-1]
        assert started["ingest"] == "python", started
        assert chosen.stop() == 0, chosen.logs()
    finally:
        chosen.remove()


def test_outage_stop_and_restart_on_the_same_volume(image: str, tmp_path: Path) -> None:
    """Three containers, one after the other, on one spool volume, the key as compose gives it:

    1. traffic in, every event at the intake; then the intake hangs (takes a request, never
       answers) and more traffic comes: SIGTERM (podman stop) finds that batch in memory,
       in flight, and writes it to the spool before exiting 0;
    2. the intake down (connection refused): the new container finds the spool, cannot
       deliver, more traffic goes to the spool, its healthcheck fails; SIGTERM, exit 0;
    3. the intake back: the third container delivers the spool.
    At the intake, every event exactly once: the hanging request of 1 was dropped unanswered
    by the fake intake, so its batch, spooled as an uncertain delivery, counts once."""
    key = _key_file(tmp_path)
    status_port = _free_port()
    with FakeIntake() as intake:
        spool = container.volume()
        env = _run_env(intake, status_port,
                       # Short, so that the test sees the healthcheck fail during the outage
                       # and a stop with a batch in flight take seconds (defaults: 300, 10).
                       HAPROXY_FORWARDER_STATUS__STALL_AFTER="2",
                       HAPROXY_FORWARDER_SHUTDOWN_TIMEOUT="3")
        mounts = [f"{spool}:{container.SPOOL_DIR}", f"{intake.ca_file}:{CA_IN}:ro",
                  f"{key}:{KEY_IN}:ro"]

        def run() -> container.Container:
            return container.Container(image, env=env, mounts=mounts, extra=HARDENED).start()

        def stop(c: container.Container) -> tuple[float, list[dict[str, Any]]]:
            """SIGTERM through podman stop: exit 0 well within the stop timeout; the time it
            took and the log, its last line `stopped` (the final counters)."""
            t0 = time.monotonic()
            code = c.stop()
            took = time.monotonic() - t0
            assert code == 0, f"exit {code} (137: SIGKILL) after {took:.1f} s\n{c.logs()}"
            assert took < c.stop_timeout, took
            records = c.records()
            assert records and records[-1]["event"] == "stopped", c.logs()
            return took, records

        # 1 --------------------------------------------------------------------------------
        first = run()
        try:
            first.wait_started()
            # PID 1 is the daemon (exec form: it gets the signals), not running as root.
            status = first.exec("cat", "/proc/1/status").stdout
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
            assert uids and set(uids.group(1).split()) == {str(container.UID)}, status
            cmdline = first.exec("cat", "/proc/1/cmdline").stdout
            assert "haproxy-forwarder" in cmdline, cmdline

            payload, before = _frames(0, 3000)
            send_tcp(first.ports["tcp"], payload)
            wait_until(lambda: len(intake.events) >= len(before), 60, "the first events",
                       detail=first.logs)
            wait_at_rest(status_port, frames=3000, detail=first.logs)
            health = first.healthcheck()
            assert health.returncode == 0, (health.stdout, health.stderr)

            intake.set_delay(600)  # a hung intake: the request is read, never answered
            payload, held = _frames(3000, 1000)
            send_tcp(first.ports["tcp"], payload)
            wait_until(lambda: metric(status_port, "accepted_events_total")
                       >= len(before) + len(held), 60, "the held events accepted",
                       detail=first.logs)
            wait_until(lambda: any(r["status"] is None for r in intake.requests), 30,
                       "a request hanging at the intake", detail=first.logs)
            # In memory, in flight (a batch queued behind them for over 1 s would have been
            # spilled to the spool already: on a slow machine, some may be).
            on_disk = int(metric(status_port, "spool_events"))
            assert on_disk < len(held)
            took, log = stop(first)
        finally:
            first.remove()
        incomplete = [r for r in log if r["event"] == "shutdown_incomplete"]
        assert incomplete and incomplete[-1]["spooled_events"] == len(held) - on_disk, log
        assert log[-1]["spool_events"] == len(held), log[-1]
        assert log[-1]["uncertain_deliveries"] >= 1, log[-1]  # cut off in flight
        assert took >= 3, f"SIGTERM did not wait shutdown_timeout for the intake: {took:.1f} s"

        # 2 --------------------------------------------------------------------------------
        intake.set_down(True)  # the hanging request is dropped: nothing of it was ingested
        assert len(intake.events) == len(before)
        intake.set_delay(0)
        second = run()
        try:
            second.wait_started()
            payload, during = _frames(4000, 2000)
            send_tcp(second.ports["tcp"], payload)
            wait_until(lambda: metric(status_port, "accepted_events_total") >= len(during), 60,
                       "the outage's events accepted", detail=second.logs)
            # The HEALTHCHECK reads /healthz: batches waiting, nothing delivered for 2 s.
            wait_until(lambda: second.healthcheck().returncode == 1, 60,
                       "the healthcheck failing during the outage", step=0.5)
            _, log = stop(second)
        finally:
            second.remove()
        assert log[-1]["spool_events"] == len(held) + len(during), log[-1]
        assert len(intake.events) == len(before), "events arrived while the intake was down"

        # 3 --------------------------------------------------------------------------------
        intake.set_down(False)
        third = run()
        try:
            third.wait_started()
            wait_until(lambda: len(intake.events) >= len(before) + len(held) + len(during),
                       60, "the spooled events after the restart", detail=third.logs)
            final = wait_at_rest(status_port, detail=third.logs)
            assert final.get("spool_recovered_events_total") == len(held) + len(during), final
            assert third.healthcheck().returncode == 0
            stop(third)
        finally:
            third.remove()
        got = collections.Counter(intake.event_texts())
        want = collections.Counter(before + held + during)
        assert got == want, (f"lost {sum((want - got).values())}, "
                             f"duplicated {sum((got - want).values())}")
        container.remove_volume(spool)
