# streamgen: `make demo` and `make test` are the whole workflow; both build .venv on first use.
#
# The venv is reinstalled only when its install key changes: a hash of pyproject.toml, the torch
# pin and the set of top-level packages (setuptools' editable finder maps only the top-level
# packages that existed at install time, so a new one such as trainer/ needs a reinstall).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: pip takes the CPU wheel from local disk. Installing the project first would
# let pip resolve "torch" on its own and fetch a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.streamgen-install-key
PYTEST_ARGS ?=
TEST_TIMEOUT_S ?= 600

INSTALL_KEY = $(shell { cat pyproject.toml; echo torch==$(TORCH_VERSION); ls -d */__init__.py 2>/dev/null; } \
                | sha256sum | cut -c1-16)

# This machine's pip config lists local index folders that lack most packages; pip warns per package.
PIP_QUIET = 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }

DEMO_PROMPT := a matte blue mug standing still on a wooden table, static camera, bright lighting
DEMO_PROMPT_2 := a matte white mug standing still on a wooden table, static camera, bright lighting
DEMO_SECONDS ?= 8
DEMO_SWITCH_S ?= 4
DEMO_PORT ?= 50051
# Generated gRPC stubs (git-ignored): streamgen/api/v1/streamgen_pb2{,_grpc}.py{,i}, rebuilt when the proto changes.
PROTO := protos/streamgen/v1/streamgen.proto
STUBS := streamgen/api/v1/streamgen_pb2.py streamgen/api/v1/streamgen_pb2_grpc.py streamgen/api/v1/streamgen_pb2.pyi

.PHONY: help venv check-venv proto browser-deps obs-deps nginx-deps test test-all demo lint clean distclean

help:
	@echo "make demo       serve the committed default model + stream out/demo.mp4 over gRPC"
	echo "make test       ruff + pytest (skips tests marked slow)"
	echo "make test-all   ruff + pytest including slow tests"
	echo "make lint       ruff check"
	echo "make venv       create/refresh .venv (torch $(TORCH_VERSION)+cpu, then -e '.[dev,webrtc,train]', then gRPC stubs)"
	echo "make browser-deps  install Debian's chromium + chromium-driver for the browser tests (part of make test)"
	echo "make obs-deps   install Debian's obs-studio + xvfb for the OBS test (part of make test)"
	echo "make nginx-deps install Debian's nginx for the load-balancer tests, deploy/local/run.sh (part of make test)"
	echo "make proto      (re)generate the gRPC stubs from $(PROTO) into streamgen/api/v1/"
	echo "make clean      remove caches, build output and out/;  make distclean also removes .venv"

venv:
	@key="$(INSTALL_KEY)"
	if [[ -x $(BIN)/python && -f $(STAMP) && "$$(cat $(STAMP))" == "$$key" ]]; then
	  echo "venv: $(VENV) is up to date ($$key)"
	  exit 0
	fi
	start=$$SECONDS
	[[ -x $(BIN)/python ]] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip $(PIP_QUIET)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(PIP_QUIET)
	$(BIN)/python -m pip install --quiet -e '.[dev,webrtc,train]' $(PIP_QUIET)
	$(MAKE) --no-print-directory check-venv
	$(BIN)/python -m streamgen.api.build
	echo "$$key" > $(STAMP)
	echo "venv: installed in $$((SECONDS - start)) s"

# Fails unless torch is exactly the CPU build and nothing CUDA-flavoured slipped in through a dependency.
check-venv:
	@freeze="$$($(BIN)/python -m pip list --format=freeze 2>/dev/null)"
	grep -iE '^(torch|nvidia-|triton|cuda-)' <<<"$$freeze" | sed 's/^/  /' || true
	if ! grep -qx 'torch==$(TORCH_VERSION)+cpu' <<<"$$freeze"; then
	  echo "error: $(VENV) must have torch==$(TORCH_VERSION)+cpu (see README, 'Development')" >&2
	  exit 1
	fi
	if grep -qiE '^(nvidia-|torchvision|triton|cuda-)' <<<"$$freeze"; then
	  echo "error: CUDA packages or torchvision in $(VENV); a dependency pulled a GPU torch build" >&2
	  exit 1
	fi
	echo "check-venv: torch $(TORCH_VERSION)+cpu, no nvidia-*/torchvision/triton"

# Stubs are build output: regenerated whenever the .proto is newer (streamgen.api.build also checks
# a content hash, and importing streamgen.api.v1 regenerates missing stubs as a last resort).
proto: venv $(STUBS)

$(STUBS) &: $(PROTO) streamgen/api/build.py
	@$(BIN)/python -m streamgen.api.build --force

# Headless Chromium for the tests marked `browser` (the WebRTC page): Debian's chromium and
# chromium-driver, installed with apt-get when missing and we are root (or have passwordless sudo).
# When that is impossible it says why and goes on; the browser tests then skip saying the same,
# except under CI, where they fail.
browser-deps:
	@if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then exit 0; fi
	sudo=""
	if ! command -v apt-get >/dev/null; then
	  echo "browser-deps: no apt-get on this machine: install chromium and chromedriver yourself" >&2; exit 0
	fi
	if [[ $$(id -u) -ne 0 ]]; then
	  if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
	    echo "browser-deps: not root and no passwordless sudo: run 'apt-get install chromium chromium-driver' as root" >&2
	    exit 0
	  fi
	fi
	start=$$SECONDS
	echo "browser-deps: apt-get install chromium chromium-driver (for the browser tests)"
	if $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver \
	    >/dev/null; then
	  echo "browser-deps: installed in $$((SECONDS - start)) s ($$(/usr/bin/chromium --version 2>/dev/null))"
	else
	  echo "browser-deps: apt-get failed (see above)" >&2
	fi

# OBS Studio under Xvfb for the test marked `obs` (a Media Source playing the gateway's /live.ts):
# Debian's obs-studio (with obs-websocket) and xvfb, installed like browser-deps; Mesa's software
# GL comes with them. Same rules: says why and goes on when it cannot; the test then skips (fails under CI).
obs-deps:
	@if [[ -x /usr/bin/obs && -x /usr/bin/Xvfb ]]; then exit 0; fi
	sudo=""
	if ! command -v apt-get >/dev/null; then
	  echo "obs-deps: no apt-get on this machine: install obs-studio and xvfb yourself" >&2; exit 0
	fi
	if [[ $$(id -u) -ne 0 ]]; then
	  if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
	    echo "obs-deps: not root and no passwordless sudo: run 'apt-get install obs-studio xvfb' as root" >&2
	    exit 0
	  fi
	fi
	start=$$SECONDS
	echo "obs-deps: apt-get install obs-studio xvfb (for the OBS test)"
	if $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq obs-studio xvfb \
	    >/dev/null; then
	  echo "obs-deps: installed in $$((SECONDS - start)) s ($$(/usr/bin/obs --version 2>/dev/null | head -n 1))"
	else
	  echo "obs-deps: apt-get failed (see above)" >&2
	fi

# Debian's nginx for deploy/local/run.sh and tests/deploy (replicas behind a gRPC load balancer),
# installed like browser-deps. run.sh runs nginx with its own prefix and config, never the system
# service. Same rules: says why and goes on when it cannot; the tests then skip (fail under CI).
nginx-deps:
	@if [[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null; then exit 0; fi
	sudo=""
	if ! command -v apt-get >/dev/null; then
	  echo "nginx-deps: no apt-get on this machine: install nginx yourself" >&2; exit 0
	fi
	if [[ $$(id -u) -ne 0 ]]; then
	  if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
	    echo "nginx-deps: not root and no passwordless sudo: run 'apt-get install nginx' as root" >&2
	    exit 0
	  fi
	fi
	start=$$SECONDS
	echo "nginx-deps: apt-get install nginx (for the load-balancer tests)"
	if $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq nginx >/dev/null; then
	  echo "nginx-deps: installed in $$((SECONDS - start)) s ($$(/usr/sbin/nginx -v 2>&1))"
	else
	  echo "nginx-deps: apt-get failed (see above)" >&2
	fi

test: venv proto browser-deps obs-deps nginx-deps
	@$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout $(TEST_TIMEOUT_S) $(PYTEST_ARGS)

test-all: venv proto browser-deps obs-deps nginx-deps
	@$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout $(TEST_TIMEOUT_S) -m "" $(PYTEST_ARGS)

# Serve the committed default model in the background, stream a clip through the gRPC client
# (switching the prompt half way), stop the server cleanly (SIGTERM drains, exit 0).
demo: venv proto
	@mkdir -p out
	echo "demo: starting 'streamgen serve' (the committed default model) on 127.0.0.1:$(DEMO_PORT)"
	$(BIN)/streamgen serve --port $(DEMO_PORT) --metrics-port 0 --log-format text 2> out/demo-server.log &
	server=$$!
	trap 'kill -TERM $$server 2>/dev/null || true; wait $$server 2>/dev/null || true' EXIT
	if ! $(BIN)/python -m streamgen.server.health --address 127.0.0.1:$(DEMO_PORT) --wait 120 --quiet; then
	  echo "demo: the server did not become healthy; its log (out/demo-server.log):" >&2
	  tail -n 20 out/demo-server.log >&2
	  exit 1
	fi
	echo "demo: server SERVING; $$(grep -o 'metrics=http[^ ]*' out/demo-server.log | head -n 1 | sed 's/=/ at /')"
	$(BIN)/python -m clients.stream --server 127.0.0.1:$(DEMO_PORT) --prompt "$(DEMO_PROMPT)" \
	  --seconds $(DEMO_SECONDS) --seed 0 --switch $(DEMO_SWITCH_S):"$(DEMO_PROMPT_2)" --out out/demo.mp4
	kill -TERM $$server
	wait $$server
	trap - EXIT
	echo "demo: wrote out/demo.mp4 - open it with any video player (e.g. 'ffplay out/demo.mp4', VLC or a browser)"
	echo "demo: server log in out/demo-server.log; it drained and exited 0"
	echo "demo: live preview in a browser or OBS: run '$(BIN)/streamgen serve' and '$(BIN)/python -m clients.webrtc --grpc 127.0.0.1:$(DEMO_PORT)', then open http://127.0.0.1:8080"

lint: venv
	@$(BIN)/ruff check .

clean:
	@rm -rf build dist out .pytest_cache .ruff_cache ./*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

# Also removes the venv and generated protobuf stubs (regenerated by the next install).
distclean: clean
	@rm -rf $(VENV)
	[[ ! -d streamgen/api ]] || find streamgen/api \( -name '*_pb2.py' -o -name '*_pb2_grpc.py' -o -name '*_pb2.pyi' \) -delete
