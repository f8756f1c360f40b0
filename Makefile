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

.PHONY: run test lint bench clean deb asan fuzz soak

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
	$(BIN)/ruff check haproxy_forwarder devtools tests bench fuzz soak setup.py
	$(BIN)/mypy haproxy_forwarder devtools bench fuzz soak
	HAPROXY_FORWARDER_EXPECT_COMPILED=$(EXPECT_COMPILED) $(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check haproxy_forwarder devtools tests bench fuzz soak setup.py
	$(BIN)/mypy haproxy_forwarder devtools bench fuzz soak

bench: $(STAMP)
	$(BIN)/python -m bench

# The chaos soak with its event ledger (soak/, docs/reliability.md): the real daemon under a
# fault schedule drawn from a seed, TCP, RELP (real rsyslog omrelp) and UDP senders; exits
# non-zero on any event not accounted for. Needs rsyslog and rsyslog-relp; mounts an 8 MiB
# tmpfs for the spool when run as root. E.g. make soak SOAK_ARGS="--minutes 2 --seed 7".
SOAK_MINUTES ?= 10
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python -m soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# The Debian package (dh-virtualenv, debian/): built from a copy of the project's sources under
# $(DEB_BUILD), so no build product lands in the tree; the .deb goes to $(DEB_DIST) and its
# path is the last line printed. Needs: dpkg-dev debhelper dh-virtualenv python3-dev
# python3-venv gcc (dpkg-buildpackage names what is missing).
DEB_BUILD ?= build/deb
DEB_DIST  ?= dist
DEB_SOURCES := pyproject.toml setup.py MANIFEST.in README.md haproxy_forwarder config systemd debian
DEB_EXCLUDES := --exclude=__pycache__ --exclude='*.py[co]' --exclude='*.so' --exclude='*.c' \
	--exclude='*.html' --exclude=debian/haproxy-forwarder --exclude=debian/.debhelper \
	--exclude=debian/files --exclude='debian/*.substvars' --exclude='debian/*.debhelper*' \
	--exclude=debian/debhelper-build-stamp
DEB_FILE = haproxy-forwarder_$(shell dpkg-parsechangelog -l debian/changelog -SVersion)_$(shell dpkg-architecture -qDEB_HOST_ARCH).deb

deb:
	rm -rf $(DEB_BUILD)
	mkdir -p $(DEB_BUILD)/src $(DEB_DIST)
	tar -c $(DEB_EXCLUDES) $(DEB_SOURCES) | tar -x -C $(DEB_BUILD)/src
	cd $(DEB_BUILD)/src && dpkg-buildpackage -us -uc -b
	cp $(DEB_BUILD)/$(DEB_FILE) $(DEB_DIST)/
	@echo $(abspath $(DEB_DIST)/$(DEB_FILE))

# The compiled ingest under AddressSanitizer + UndefinedBehaviorSanitizer (gcc), on the ingest
# suites and the fuzz corpus; a sanitizer report aborts the run (devtools/sanitized.py).
ASAN_TESTS := tests/test_ingest.py tests/test_native_reader.py tests/test_native_header.py \
	tests/test_assemble.py tests/test_storage.py tests/test_framing.py tests/test_header.py \
	tests/test_fuzz_corpus.py tests/test_spool_format.py
asan: $(STAMP)
	$(BIN)/python -m devtools.sanitized build --kind asan
	$(BIN)/python -m devtools.sanitized run --kind asan -- \
		$(abspath $(BIN))/python -m pytest -q -p no:cacheprovider $(ASAN_TESTS)

# atheris (libFuzzer) on the compiled ingest against the pure-Python one, then on the header
# reader, FUZZ_SECONDS each, in a clang build with coverage + ASan/UBSan (needs clang).
# New inputs go to build/fuzz/corpus; a finding stops the run and is written to
# build/fuzz/findings: copy it into tests/fuzz/<harness>/ and it becomes a regression test.
FUZZ_SECONDS ?= 600
FUZZ_DIR := $(abspath build/fuzz)
fuzz: $(STAMP)
	$(BIN)/pip install -q 'atheris>=2.3'
	$(BIN)/python -m devtools.sanitized build --kind fuzz
	$(BIN)/python -c "import pathlib, devtools.fuzzing as f; \
		f.write_seeds(pathlib.Path('$(FUZZ_DIR)/corpus'), conformance=True)"
	mkdir -p $(FUZZ_DIR)/findings
	for h in ingest header; do \
		$(BIN)/python -m devtools.sanitized run --kind fuzz -- \
			$(abspath $(BIN))/python -m fuzz.$$h -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
			-rss_limit_mb=4096 -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_DIR)/findings/$$h- \
			$(FUZZ_DIR)/corpus/$$h $(abspath tests/fuzz)/$$h || exit 1; \
	done

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache build dist
	find haproxy_forwarder -name '*.so' -delete
