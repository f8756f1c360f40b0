"""Command line: run, check-config, send-test, --version.

Exit codes: 0 ok, 1 runtime failure (send-test refused), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from typing import Any

import orjson

from . import __version__, logs
from .batching import Batch
from .config import ConfigError, Settings, load
from .intake import IntakeClient, Kind

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="haproxy-forwarder",
        description="Receive HAProxy syslog and push it to the Sekoia.io intake.",
    )
    p.add_argument("--version", action="version", version=f"haproxy-forwarder {__version__}")
    p.add_argument(
        "--config", "-c", metavar="PATH",
        help="TOML config file (default: $HAPROXY_FORWARDER_CONFIG or "
             "/etc/haproxy-forwarder/config.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the forwarder")
    run.add_argument("--dry-run", action="store_true",
                     help="write events as JSON lines to stdout instead of pushing them")
    sub.add_parser("check-config", help="validate and print the effective config (key masked)")
    sub.add_parser("send-test", help="push one test event and print the intake's answer")
    return p


def _load(args: argparse.Namespace, dry_run: bool = False) -> Settings:
    overrides: dict[str, Any] = {"intake": {"dry_run": True}} if dry_run else {}
    settings = load(args.config, overrides)
    if settings.intake.key is not None:
        logs.add_secret(settings.intake.key.get_secret_value())
    return settings


def _run(settings: Settings) -> int:
    from .pipeline import Pipeline

    settings.require_key()
    logs.configure(settings.log.level, settings.log.format)
    log = logs.get_logger("haproxy_forwarder")
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable
        runner = asyncio.run
    pipeline = Pipeline(settings, log)
    try:
        runner(pipeline.run())
    except OSError as exc:
        # Typically a listen address in use or not permitted: one clear line, no traceback.
        log.error("startup_failed", error=str(exc))
        return EXIT_FAILED
    return EXIT_OK


def _check_config(settings: Settings) -> int:
    sys.stdout.write(orjson.dumps(settings.redacted(), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
    if settings.intake.key is None and not settings.intake.dry_run:
        sys.stderr.write("warning: intake.key is not set: `run` will refuse to start\n")
    return EXIT_OK


async def _send_test(settings: Settings) -> int:
    from .encoding import encode, gzip

    settings.require_key()
    client = IntakeClient(settings.intake)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    event = f"haproxy-forwarder {__version__} send-test from {socket.gethostname()} at {now}"
    batch = Batch([event], [now])
    body = encode(batch, settings.intake.endpoint, client.key)
    if settings.intake.gzip:
        body = gzip(body)
    print(f"POST {client.url}")
    outcome = await client.post(body)
    await client.aclose()
    status = outcome.status if outcome.status is not None else "no answer"
    print(f"answer: {status} {outcome.detail}".rstrip())
    return EXIT_OK if outcome.kind is Kind.DELIVERED else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _load(args, dry_run=getattr(args, "dry_run", False))
        if args.command == "run":
            return _run(settings)
        if args.command == "check-config":
            return _check_config(settings)
        if args.command == "send-test":
            return asyncio.run(_send_test(settings))
    except ConfigError as exc:
        for line in exc.problems:
            sys.stderr.write(f"config error: {line}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
