"""Command line: run, check-config, send-test, status, spool, --version.

Exit codes: 0 ok, 1 runtime failure (send-test refused, status failing or unreachable),
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import __version__
from .batching import Batch
from .buildinfo import describe
from .config import ConfigError, IntakeConfig, Settings, load
from .observability import logs
from .sinks.intake import IntakeClient, Kind

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


CONFIG_HELP = ("TOML config file (default: $HAPROXY_FORWARDER_CONFIG or "
               "/etc/haproxy-forwarder/config.toml); accepted before or after the command: "
               "given in both places, the one after the command wins")


def _config_option(parser: argparse.ArgumentParser, top: bool) -> None:
    # After the command the default is SUPPRESS: an absent option there must not reset the
    # value given before the command (argparse copies a subparser's defaults over it).
    parser.add_argument("--config", "-c", metavar="PATH", dest="config",
                        default=None if top else argparse.SUPPRESS, help=CONFIG_HELP)


def _command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    _config_option(parser, top=False)
    return parser


def _status_url(value: str) -> str:
    from .statusreport import check_url

    try:
        return check_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="haproxy-forwarder",
        description="Receive HAProxy syslog and push it to the Sekoia.io intake.",
        epilog="Exit codes: 0 ok, 1 runtime failure (status: failing or no daemon answering), "
               "2 usage or configuration error.",
    )
    p.add_argument("--version", action="version", version=describe())
    _config_option(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _command(sub, "run", help="run the forwarder")
    run.add_argument("--dry-run", action="store_true",
                     help="write events as JSON lines to stdout instead of pushing them")
    _command(sub, "check-config",
             help="validate and print the effective config (key masked); warn about risky "
                  "settings on stderr")
    send = _command(sub, "send-test", help="push one test event and print the intake's answer")
    _intake_option(send)
    status = _command(
        sub, "status", help="health, rates, backlog and totals of the running daemon",
        description="Read the running daemon's /healthz and /metrics (at status.listen of the "
                    "config, or --url) and print a summary. Exit 0 healthy, 1 failing or "
                    "unreachable.")
    status.add_argument("--url", metavar="http://HOST:PORT", type=_status_url,
                        help="the status endpoint to read (default: from status.listen)")
    status.add_argument("--once", action="store_true",
                        help="one scrape, no rates (by default two scrapes 1 s apart)")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    spool = _command(sub, "spool", help="inspect or manage the disk spool")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    _intake_option(_command(spool_sub, "stats",
                            help="batches, events, bytes, oldest age, dead letters (JSON)"))
    _intake_option(_command(
        spool_sub, "replay-dead-letter",
        help="re-queue dead-lettered events, each back to the intake that refused it (picked "
             "up by the running daemon or its next start)",
    ))
    purge = _command(spool_sub, "purge", help="delete every spooled batch (daemon stopped)")
    purge.add_argument("--yes", action="store_true", help="really delete")
    _intake_option(purge)
    _spool_deliver_parser(spool_sub)
    return p


def _spool_deliver_parser(spool_sub: Any) -> None:
    deliver = _command(
        spool_sub, "deliver",
        help="deliver a spool another forwarder left behind (its disk mounted, or a copy) "
             "with this config's intake settings, no listeners; exit 0 once it is empty",
        description="Deliver every batch of the spool at --dir (the spool.dir of a forwarder "
                    "that is gone) to the intake of this config, acking each on that spool. "
                    "Exit 0 once the spool is empty; 1 when nothing was delivered for "
                    "--timeout seconds (what remains stays on disk), when interrupted, or "
                    "when a running daemon holds the spool; 2 on a usage error.")
    deliver.add_argument("--dir", metavar="PATH", required=True, type=Path,
                         help="the spool.dir of the forwarder that left it; intake NAME's "
                              "spool is PATH/intakes/NAME (PATH may be that folder itself), "
                              "intake default's PATH itself")
    deliver.add_argument("--intake", metavar="NAME",
                         help="the intake whose settings deliver it, and whose spool it is "
                              "(default: the config's only intake, or \"default\")")
    deliver.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                         help="give up when nothing was delivered for this long "
                              "(default 600)")


def _intake_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--intake", metavar="NAME",
                     help="only this intake (default: every intake of the config)")


def _intakes(settings: Settings, only: str | None) -> list[tuple[str, Path]]:
    """(name, spool directory) of the intakes a command works on; ConfigError for a name the
    config does not have."""
    from .intakes import spool_dir

    names = list(settings.intake_table)
    if only is not None:
        if only not in names:
            raise ConfigError([f"--intake {only}: no such intake (the config has: "
                               f"{', '.join(names)})"])
        names = [only]
    return [(name, spool_dir(settings, name)) for name in names]


def _load(args: argparse.Namespace, dry_run: bool = False) -> Settings:
    overrides: dict[str, Any] = {"intake": {"dry_run": True}} if dry_run else {}
    settings = load(args.config, overrides)
    for key in settings.intake_keys():
        logs.add_secret(key)
    return settings


def _run(settings: Settings, loader: Callable[[], Settings] | None = None) -> int:
    """`loader` reads the config again exactly as this run did (SIGHUP)."""
    from .wiring import build

    settings.require_key()
    logs.configure(settings.log.level, settings.log.format)
    log = logs.get_logger("haproxy_forwarder")
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable
        runner = asyncio.run
    from .sources import ListenError
    from .spool import SpoolError

    if not _implementation_ok(log):
        return EXIT_FAILED
    try:
        daemon = build(settings, log, loader)
        runner(daemon.run())
    except ListenError as exc:
        # An address of the config: in use, not on this host, or no such name.
        log.error("startup_failed", error=str(exc))
        return EXIT_CONFIG
    except (OSError, SpoolError) as exc:
        # A listen address in use, a spool directory not writable or locked by another
        # daemon: one clear line, no traceback.
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        log.error("startup_failed", error=f"{exc}{cause}")
        return EXIT_FAILED
    return EXIT_OK


def _implementation_ok(log: Any) -> bool:
    """Say loudly when the compiled ingest is not the one running; refuse to start if it was
    required (HAPROXY_FORWARDER_EXPECT_COMPILED=1: packages and CI that built it)."""
    import os

    from . import ingest
    from .buildinfo import EXPECT_COMPILED_ENV

    if ingest.IMPLEMENTATION == "native":
        return True
    if ingest.IMPORT_ERROR is not None:
        log.error("ingest_extension_failed", error=ingest.IMPORT_ERROR,
                  action="running the pure-Python reader: several times more CPU per message",
                  hint="reinstall the package for this Python (pip install --force-reinstall)")
    elif ingest.disabled():
        log.info("ingest_pure_python", reason=f"{ingest.NO_EXTENSIONS_ENV} is set")
    else:
        log.warning("ingest_pure_python", reason="the compiled reader was not built "
                    "(no C compiler at install time?)", action="several times more CPU per message")
    if os.environ.get(EXPECT_COMPILED_ENV, "") == "1" and not ingest.disabled():
        log.error("startup_failed", error=f"{EXPECT_COMPILED_ENV}=1 but the compiled ingest "
                  "is not in use")
        return False
    return True


def _check_config(settings: Settings) -> int:
    from .configcheck import risky_settings, route_table_lines, route_warnings

    sys.stdout.write(orjson.dumps(settings.redacted(), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
    try:
        settings.require_key()
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"warning: {problem.split(': ', 1)[0]} is not set: `run` will "
                             "refuse to start\n")
    for line in risky_settings(settings):
        sys.stderr.write(f"warning: {line}\n")
    # stdout is the effective config as JSON (scripts parse it): the table goes to stderr.
    for line in route_table_lines(settings):
        sys.stderr.write(f"{line}\n")
    for line in route_warnings(settings):
        sys.stderr.write(f"warning: {line}\n")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from . import statusreport as sr

    if args.url is not None:
        url: str = args.url
    else:
        # The config is only read for status.listen: --url needs no config at all.
        settings = _load(args)
        if not settings.status.listen:
            sys.stderr.write("error: status.listen is empty (the status endpoint is disabled): "
                             "set it, or give --url\n")
            return EXIT_CONFIG
        url = sr.url_from_listen(settings.status.listen)
    try:
        ok, report = sr.report(url, once=args.once)
    except sr.Unreachable as exc:
        line = f"no daemon answering on {url} (is it running? status.listen?)"
        if args.json:
            print(orjson.dumps({"url": url, "health": "unreachable", "error": str(exc)}).decode())
        sys.stderr.write(line + "\n")
        return EXIT_FAILED
    except sr.NotOurs as exc:
        if args.json:
            print(orjson.dumps({"url": url, "health": "unknown", "error": str(exc)}).decode())
        sys.stderr.write(f"{url} answers, but not as a haproxy-forwarder status endpoint: "
                         f"{exc}\n")
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(sr.render(report))
    return EXIT_OK if ok else EXIT_FAILED


async def _send_test(settings: Settings, only: str | None) -> int:
    settings.require_key()
    worst = EXIT_OK
    for name, _ in _intakes(settings, only):
        if len(settings.intake_table) > 1:
            print(f"intake {name}:")
        worst = max(worst, await _send_one(settings.intake_table[name]))
    return worst


async def _send_one(intake: IntakeConfig) -> int:
    from .sinks.encoding import body as encode_body

    client = IntakeClient(intake)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    event = f"haproxy-forwarder {__version__} send-test from {socket.gethostname()} at {now}"
    batch = Batch.from_events([event], [now])
    # The same body the daemon would send for this endpoint.
    data, _ = encode_body(batch, intake.endpoint, client.key, intake.gzip)
    print(f"POST {client.url}")
    outcome = await client.post(data)
    await client.aclose()
    status = outcome.status if outcome.status is not None else "no answer"
    # The answer may echo the request (proxies do), and /array bodies carry the key.
    print(logs.redact(f"answer: {status} {outcome.detail}".rstrip()))
    return EXIT_OK if outcome.kind is Kind.DELIVERED else EXIT_FAILED


def _spool_stats(settings: Settings, only: str | None) -> int:
    chosen = _intakes(settings, only)
    if len(settings.intake_table) == 1:
        out = _one_spool_stats(chosen[0][1])  # as before several intakes
    else:
        out = {"intakes": {name: _one_spool_stats(folder) for name, folder in chosen}}
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def _one_spool_stats(folder: Path) -> dict[str, Any]:
    from .sinks.deadletter import DeadLetters
    from .spool import inspect_spool

    out: dict[str, Any] = {"spool_dir": str(folder)}
    # The names of /metrics and of the `stats` log line (spool_batches, spool_events, ...).
    if (folder / "segments").is_dir():
        info = inspect_spool(folder)
        out.update({(k if k.startswith("spool_") else f"spool_{k}"): v
                    for k, v in info["stats"].items() if k != "max_size"})
        out["recovery"] = info["recovery"]
    else:
        out.update({f"spool_{k}": 0 for k in
                    ("batches", "events", "bytes", "oldest_age_seconds", "segments")})
    dead = DeadLetters(folder)
    files = dead.files()
    out["dead_letter"] = {
        "files": [str(p) for p in files],
        "bytes": dead.size(),
        "events": sum(sum(1 for _ in p.open("rb")) for p in files),
    }
    out["requeue"] = _requeue_stats(folder / "requeue")
    quarantine = folder / "quarantine"
    out["quarantined_files"] = (
        sorted(str(p) for p in quarantine.iterdir()) if quarantine.is_dir() else []
    )
    return out


def _requeue_stats(folder: Path) -> dict[str, Any]:
    """Files `replay-dead-letter` moved that the daemon has not put in the spool yet, and the
    events still to go in them (after the offset the daemon reached in each)."""
    from .delivery.requeue import list_files, read_progress
    from .spool import Filesystem

    fs = Filesystem()
    files = list_files(fs, folder)
    left = 0
    for path in files:
        try:
            offset = read_progress(fs, path) or 0
        except ValueError:
            offset = 0
        try:  # never through a symbolic link (the daemon refuses them too)
            with os.fdopen(fs.open(path, os.O_RDONLY), "rb") as fh:
                fh.seek(offset)
                left += sum(1 for _ in fh)
        except OSError:
            continue
    return {"files": [str(p) for p in files], "events": left}


def _spool_requeue(settings: Settings, only: str | None) -> int:
    several = len(settings.intake_table) > 1
    for name, folder in _intakes(settings, only):
        # Each intake's dead letters go back into its own requeue folder: to that intake.
        _requeue_one(folder, f"intake {name}: " if several else "")
    return EXIT_OK


def _requeue_one(folder: Path, prefix: str) -> None:
    from .sinks.deadletter import DeadLetters
    from .spool.segments import make_private_dirs

    dead = DeadLetters(folder)
    requeue = folder / "requeue"
    files = dead.files()
    if not files:
        print(f"{prefix}no dead letters to re-queue")
        return
    make_private_dirs(requeue)  # 0700, as every folder of the spool (they hold log data)
    events = 0
    for path in files:
        events += sum(1 for _ in path.open("rb"))
        # A rename is atomic: the daemon never sees a half-moved file.
        path.rename(requeue / f"{path.stem}-{time.time_ns()}.jsonl")
    print(f"{prefix}re-queued {events} events from {len(files)} file(s) into {requeue}; "
          "the running daemon (or its next start) sends them")


def _spool_purge(settings: Settings, yes: bool, only: str | None) -> int:
    from .intakes import spool_share

    return max(_purge_one(folder, spool_share(settings, name), yes)
               for name, folder in _intakes(settings, only))


def _purge_one(folder: Path, max_size: int, yes: bool) -> int:
    from .spool import Spool, SpoolLocked

    if not (folder / "segments").is_dir():
        print(f"nothing to purge in {folder}")
        return EXIT_OK
    spool = Spool(folder, max_size=max_size)
    try:
        spool.open()
    except SpoolLocked:
        print("the spool is in use by a running daemon: stop it first", file=sys.stderr)
        return EXIT_FAILED
    try:
        st = spool.stats()
        if not st["batches"]:
            print(f"nothing to purge in {folder}")
            return EXIT_OK
        if not yes:
            print(f"would delete {st['batches']} batches ({st['events']} events) in {folder}; "
                  "run again with --yes to do it")
            return EXIT_FAILED
        batches, events = spool.purge()
        print(f"deleted {batches} batches ({events} events) from {folder}")
        return EXIT_OK
    finally:
        spool.close()


def _spool_deliver(settings: Settings, folder: Path, only: str | None,
                   timeout: float | None) -> int:
    from .drain import deliver

    return deliver(settings, folder, only, timeout)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(args)
        dry_run = getattr(args, "dry_run", False)
        settings = _load(args, dry_run=dry_run)
        if args.command == "run":
            return _run(settings, lambda: _load(args, dry_run=dry_run))
        if args.command == "check-config":
            return _check_config(settings)
        if args.command == "send-test":
            return asyncio.run(_send_test(settings, args.intake))
        if args.command == "spool":
            if args.spool_command == "stats":
                return _spool_stats(settings, args.intake)
            if args.spool_command == "replay-dead-letter":
                return _spool_requeue(settings, args.intake)
            if args.spool_command == "purge":
                return _spool_purge(settings, args.yes, args.intake)
            if args.spool_command == "deliver":
                return _spool_deliver(settings, args.dir, args.intake, args.timeout)
    except ConfigError as exc:
        for line in exc.problems:
            sys.stderr.write(f"config error: {line}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        # e.g. the spool directory is not readable: one line, not a traceback.
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_FAILED
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
