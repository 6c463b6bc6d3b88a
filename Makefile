# The two commands of the README: `make demo` runs one build on a throwaway
# local Djinn database, `make test` prepares the machine and runs the suite.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test bench

demo:
	.ci/setup demo
	$(VENV)/bin/python tests/demo.py

test:
	.ci/setup test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench:
	.ci/setup demo
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/dispatch.py
	$(VENV)/bin/python bench/output.py
	$(VENV)/bin/python bench/compare.py

# `make install` puts the worker in a virtualenv of its own and links the
# commands (djinn-worker, and djinn, the offline runner) into $(PREFIX)/bin. The virtualenv is made at its final path:
# with DESTDIR its scripts name the DESTDIR tree, so a DESTDIR install runs
# where it was made but cannot be moved (install again without DESTDIR).
# Existing configs are kept; `make uninstall` keeps configs, stores and logs.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/djinn-worker
UNITDIR ?= /etc/systemd/system
PYTHON ?= python3
# The dist files name the default command path; installs elsewhere fix it.
FIX_BIN = sed 's|/usr/local/bin/djinn-worker|$(BINDIR)/djinn-worker|g'

.PHONY: install uninstall

# ./build is setuptools' scratch space: emptied first, so that modules an
# older checkout left there are not installed.
install:
	@command -v pg_config >/dev/null || { echo "make install: pg_config not found:" \
		"psycopg2 is built against the system's libpq (Debian: apt-get install libpq-dev gcc python3-dev)" >&2; exit 1; }
	$(PYTHON) -m venv "$(DESTDIR)$(LIBDIR)"
	rm -rf build
	"$(DESTDIR)$(LIBDIR)/bin/pip" install --quiet --disable-pip-version-check .
	install -d "$(DESTDIR)$(BINDIR)"
	ln -sfn "$(LIBDIR)/bin/djinn-worker" "$(DESTDIR)$(BINDIR)/djinn-worker"
	ln -sfn "$(LIBDIR)/bin/djinn" "$(DESTDIR)$(BINDIR)/djinn"
	install -d -m 0755 "$(DESTDIR)/etc/djinn"
	for f in worker.toml driver.toml; do \
		[ -e "$(DESTDIR)/etc/djinn/$$f" ] || \
			install -m 0640 "dist/$$f" "$(DESTDIR)/etc/djinn/$$f" || exit 1; \
	done
	install -d "$(DESTDIR)/etc/init.d" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)/etc/logrotate.d"
	$(FIX_BIN) dist/sysvinit/djinn-worker > "$(DESTDIR)/etc/init.d/djinn-worker"
	chmod 0755 "$(DESTDIR)/etc/init.d/djinn-worker"
	$(FIX_BIN) dist/systemd/djinn-worker.service > "$(DESTDIR)$(UNITDIR)/djinn-worker.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/djinn-worker.service"
	install -m 0644 dist/logrotate/djinn-worker "$(DESTDIR)/etc/logrotate.d/djinn-worker"
	install -d "$(DESTDIR)/var/lib/djinn/images" "$(DESTDIR)/var/lib/djinn/artifacts" \
		"$(DESTDIR)/var/lib/djinn/objects" "$(DESTDIR)/var/log/djinn"

uninstall:
	rm -rf "$(DESTDIR)$(LIBDIR)"
	rm -f "$(DESTDIR)$(BINDIR)/djinn-worker" "$(DESTDIR)$(BINDIR)/djinn" \
		"$(DESTDIR)/etc/init.d/djinn-worker" \
		"$(DESTDIR)$(UNITDIR)/djinn-worker.service" \
		"$(DESTDIR)/etc/logrotate.d/djinn-worker"
