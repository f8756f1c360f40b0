# Every target creates what it needs: a fresh clone runs `make run` or `make test` directly.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The Cython modules and what they include. The editable install compiles them when it runs,
# so a changed .pyx/.pxi means installing again (the stamp depends on them).
CYTHON_SOURCES := $(shell find haproxy_forwarder -name '*.pyx' -o -name '*.pxi' -o -name '*.pxd')
# HAPROXY_FORWARDER_NO_EXTENSIONS=1 make test: the pure-Python install and run, as in production.
NO_EXTENSIONS := $(filter-out 0 false no,$(shell echo '$(HAPROXY_FORWARDER_NO_EXTENSIONS)' | tr A-Z a-z))
# One stamp per kind of install, so switching kinds reinstalls.
STAMP  := $(VENV)/.installed$(if $(NO_EXTENSIONS),-pure)
# Where there are Cython sources and extensions are wanted, the tests require them compiled
# and in use: a build that fell back to pure Python fails `make test` instead of passing slowly.
EXPECT_COMPILED := $(if $(and $(CYTHON_SOURCES),$(if $(NO_EXTENSIONS),,1)),1,0)

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py MANIFEST.in $(CYTHON_SOURCES)
	rm -f $(VENV)/.installed*
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/haproxy-forwarder --version
	touch $(STAMP)

# The daemon on the shipped example config, in dry-run on loopback: events go to stdout as JSON lines.
run: $(STAMP)
	mkdir -p .run/spool
	HAPROXY_FORWARDER_LISTEN__TCP='["127.0.0.1:1514"]' \
	HAPROXY_FORWARDER_LISTEN__UDP='["127.0.0.1:1514"]' \
	HAPROXY_FORWARDER_SPOOL__DIR=.run/spool \
	$(BIN)/haproxy-forwarder --config config/haproxy-forwarder.toml run --dry-run

test: $(STAMP)
	$(BIN)/ruff check haproxy_forwarder devtools tests bench setup.py
	$(BIN)/mypy haproxy_forwarder devtools bench
	HAPROXY_FORWARDER_EXPECT_COMPILED=$(EXPECT_COMPILED) $(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check haproxy_forwarder devtools tests bench setup.py
	$(BIN)/mypy haproxy_forwarder devtools bench

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache build dist
	find haproxy_forwarder -name '*.so' -delete
