# async_ttt_ros — the two commands a newcomer needs:  `make demo`  and  `make test`.
# Both set the environment up first (idempotent: seconds when nothing changed).

VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
export FASTDDS_DEFAULT_PROFILES_FILE ?= $(CURDIR)/async_ttt_ros/config/fastdds_large_images.xml
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp
export OMP_NUM_THREADS ?= 1

DEMO_SECONDS ?= 60
PYTEST_ARGS ?=

.PHONY: setup test demo bench-live eval train clean help

help:
	@echo "make demo        run the whole ROS 2 graph on the simulated drifting camera (DEMO_SECONDS=$(DEMO_SECONDS))"
	@echo "make test        run the test suite (sets everything up first)"
	@echo "make setup       build .venv: ROS 2 wheels, torch CPU, interfaces, this package, Fashion-MNIST"
	@echo "make train       train (or reuse) the cached source model"
	@echo "make eval        offline realistic-time evaluation of all methods"
	@echo "make bench-live  live perception latency/CPU benchmark: none vs async vs sync"

setup:
	@bash scripts/setup_env.sh

train: setup
	$(VENV)/bin/async-ttt train

test: setup
	@# Train (or load) the cached source model once with 2 threads, before tests need it.
	$(VENV)/bin/async-ttt train
	$(PYTEST) $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py --duration $(DEMO_SECONDS)

bench-live: setup
	$(PY) scripts/bench_live.py --markdown

eval: setup
	$(VENV)/bin/async-ttt eval --out results/eval

clean:
	rm -rf build install log results
