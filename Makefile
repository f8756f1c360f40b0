# Every target creates what it needs: a fresh clone runs `make run` or `make test` directly.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The daemon on the shipped example config, in dry-run on loopback: events go to stdout as JSON lines.
run: $(STAMP)
	mkdir -p .run/spool
	HAPROXY_FORWARDER_LISTEN__TCP='["127.0.0.1:1514"]' \
	HAPROXY_FORWARDER_LISTEN__UDP='["127.0.0.1:1514"]' \
	HAPROXY_FORWARDER_SPOOL__DIR=.run/spool \
	$(BIN)/haproxy-forwarder --config config/haproxy-forwarder.toml run --dry-run

test: $(STAMP)
	$(BIN)/ruff check haproxy_forwarder devtools tests bench
	$(BIN)/mypy haproxy_forwarder devtools bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check haproxy_forwarder devtools tests bench
	$(BIN)/mypy haproxy_forwarder devtools bench

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
