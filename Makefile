# The README's two commands: `make test` and `make demo`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Debian packages the tests use: the QEMU oracles, filesystems to freeze,
# and what the guest test builds its initramfs from.
SYSTEM_PACKAGES := qemu-utils qemu-guest-agent qemu-system-x86 e2fsprogs \
	util-linux psmisc busybox-static python3-venv python3-pip zstd \
	iproute2 procps kmod locales

.PHONY: test demo system-deps venv clean

test: system-deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: system-deps venv
	$(PY) -m hostclient.demo

# As root on Debian, install whatever of SYSTEM_PACKAGES is missing; anyone
# else gets told, and the tests that need a missing tool skip with a reason.
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing system packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "note: missing system packages (tests that need them will skip): $$missing"; \
	fi

venv: $(VENV)/.installed

# The editable install puts the checkout on sys.path with a plain .pth line
# (setuptools' "compat" mode), so that start-up costs what it costs after a
# normal install: the default mode's import hook loads pathlib, re and more
# into every interpreter of the venv, about 8 ms of each qimg, qga or
# quiesce start-up. Where setuptools no longer has that mode, the default
# one is used.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --config-settings editable_mode=compat -e '.[test,all]' \
		|| $(PY) -m pip install -q -e '.[test,all]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
