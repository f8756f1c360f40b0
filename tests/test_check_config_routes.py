"""[intakes.NAME] and [[routes]] as the config check sees them: one line per problem through
config.load(), the route table and the warnings check-config prints (configcheck.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from haproxy_forwarder import config
from haproxy_forwarder.configcheck import risky_settings, route_table_lines, route_warnings

KEY = "abc123"


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's shell changes these configs."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)


def settings(routes: list[dict[str, Any]], intakes: tuple[str, ...] = ("eu", "us"),
             **sections: Any) -> config.Settings:
    return config.Settings(
        listen={"tcp": ["0.0.0.0:1514"], "udp": ["0.0.0.0:1514"], "relp": ["[::]:2514"]},
        intakes={name: {"key": KEY} for name in intakes}, routes=routes, **sections)


ROUTES: list[dict[str, Any]] = [
    {"listener": "relp://[::]:2514", "tls_name": "*.eu.example.org", "intake": "eu"},
    {"source": ["10.0.0.0/8", "2001:db8::/32"], "program": "hapee", "intake": "us"},
    {"source": "192.168.0.0/16", "drop": True},
    {"intake": "eu"},
]


def test_route_table_lines() -> None:
    assert route_table_lines(settings(ROUTES)) == [
        "routes, first match wins (listener  source  tls name  program → intake; "
        "* matches anything):",
        "routes[1]  relp://[::]:2514  *                          *.eu.example.org  *     → eu",
        "routes[2]  *                 10.0.0.0/8, 2001:db8::/32  *                 hapee → us",
        "routes[3]  *                 192.168.0.0/16             *                 *     "
        "→ dropped (drop = true), counted as unrouted_events{reason=\"drop\"}",
        "routes[4]  *                 *                          *                 *     → eu",
    ]


def test_route_table_says_what_no_route_matches() -> None:
    lines = route_table_lines(settings([{"program": "haproxy", "intake": "eu"},
                                        {"program": "hapee", "intake": "us"}]))
    assert lines[1:] == [
        "routes[1]  *  *  *  haproxy → eu",
        "routes[2]  *  *  *  hapee   → us",
        "(no route)                  → dropped, counted as unrouted_events{reason=\"no_route\"}",
    ]


def test_route_warnings() -> None:
    assert route_warnings(settings(ROUTES, intakes=("eu", "us", "spare"))) == [
        'routes[3]: drop = true: the events it matches are discarded, counted as '
        'unrouted_events{reason="drop"}',
        'intakes.spare: no route sends events to it; add a [[routes]] entry with intake = '
        '"spare", or remove [intakes.spare]',
    ]
    assert route_warnings(settings([{"intake": "eu"}], intakes=("eu",))) == []


def test_one_intake_has_no_table_and_no_warning() -> None:
    s = config.Settings(intake={"key": KEY})
    assert route_table_lines(s) == []
    assert route_warnings(s) == []
    assert risky_settings(s) == []
    # One [intakes.NAME] without routes: a catch-all to it, nothing to show either.
    s = config.Settings(intakes={"only": {"key": KEY}})
    assert [r.intake for r in s.route_list] == ["only"]
    assert route_table_lines(s) == [] and route_warnings(s) == []


def _load(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    return caught.value.problems


BAD_TABLE = f"""
[listen]
tcp = ["0.0.0.0:1514"]
udp = ["0.0.0.0:1514"]

[filter]
programs = ["haproxy", "hapee"]

[intakes.eu]
key = "{KEY}"

[intakes.us]
key = "{KEY}"

[[routes]]
program = "hapee"
intake = "eu"

[[routes]]
listener = "tcp://0.0.0.0:1515"
intake = "asia"

[[routes]]
program = ["haproxy", "nginx"]
intake = "us"

[[routes]]
listener = "udp://0.0.0.0:1514"
program = "hapee-lb"
intake = "us"

[[routes]]
intake = "eu"

[[routes]]
source = "10.0.0.0/8"
drop = true
"""

BAD_TABLE_LINES = [
    'routes[2]: intake "asia" is not defined ([intakes.asia] missing; defined: "eu", "us")',
    'routes[2]: listener "tcp://0.0.0.0:1515" names no listener of listen.tcp, listen.udp, '
    'listen.tls or listen.relp; write one of "tcp://0.0.0.0:1514", "udp://0.0.0.0:1514" '
    "(KIND://HOST:PORT), or its HOST:PORT alone for every kind on that address",
    'routes[3]: program "nginx" can never match: filter.programs ("haproxy", "hapee") lets '
    "no such program through; add a prefix of it to filter.programs, or correct the route",
    "routes[4]: can never match: routes[1] before it matches every event it would (each of "
    "its matchers is empty or wider); move routes[4] before routes[1], or remove it",
    "routes[6]: can never match: routes[5] before it is a catch-all (no listener, source, "
    "tls_name or program) and takes every event first; a catch-all must be the last route",
]


def test_a_bad_table_is_one_line_per_problem(tmp_path: Path) -> None:
    assert _load(tmp_path, BAD_TABLE) == BAD_TABLE_LINES


def test_a_bad_table_names_every_problem(tmp_path: Path) -> None:
    """The same lines, whatever the first one is prefixed with (see the test above)."""
    lines = _load(tmp_path, BAD_TABLE)
    assert [line.removeprefix("config: ") for line in lines] == BAD_TABLE_LINES


def test_routes_problems_come_after_the_intake_names(tmp_path: Path) -> None:
    # A route to an intake whose table is refused: the name problem alone (routes are only
    # checked once the intakes are valid).
    lines = _load(tmp_path, f"""
[intakes."bad name"]
key = "{KEY}"

[intakes.us]
key = "{KEY}"

[[routes]]
intake = "us"
""")
    assert [line.removeprefix("config: ") for line in lines] == [
        "intakes.bad name: not a valid name (lower-case letters, digits, '_', '-', '.'; "
        "at most 63)"]


def test_a_good_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[listen]
tcp = ["0.0.0.0:1514"]
udp = []
relp = ["[::]:2514"]

[intakes.eu]
key = "{KEY}"

[intakes.us]
key = "{KEY}"

[[routes]]
listener = "relp://[::]:2514"
intake = "us"

[[routes]]
source = ["10.0.0.0/8", "::ffff:192.168.0.0/112"]
program = "hapee"
intake = "us"

[[routes]]
intake = "eu"
""")
    s = config.load(str(path))
    problems, warnings = s.route_check()
    assert (problems, warnings) == ([], [])
    assert route_table_lines(s)[1:] == [
        "routes[1]  relp://[::]:2514  *                                   *  *     → us",
        "routes[2]  *                 10.0.0.0/8, ::ffff:192.168.0.0/112  *  hapee → us",
        "routes[3]  *                 *                                   *  *     → eu",
    ]
