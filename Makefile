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

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,all]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
