# dist_rec developer entry points. The README's Quickstart is `make main` and
# `make test`; both create .venv and install everything they need first.
#
#   make install   virtual environment + dependencies + native extension
#                  + DeepSpeed (the optional dense engine, docs/deepspeed.md)
#   make main      the main job: 2-process torchrun DLRM training on synthetic data (~5 min)
#   make test      the test suite
#   make bench     the embedding and training benchmarks (write docs/benchmarks.md)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu')

.PHONY: install main test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt requirements-dev.txt requirements-interop.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-interop.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(NATIVE_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# DeepSpeed on the CPU accelerator, its shm comm op compiled here (about 1.5
# min) rather than at the start of every run; --no-deps keeps our torch.
$(VENV)/.deepspeed: requirements-deepspeed.txt | $(VENV)/.deps
	DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
		$(PY) -m pip install --quiet --no-build-isolation --no-deps -r requirements-deepspeed.txt
	touch $@

install: $(VENV)/.built $(VENV)/.deepspeed

main: install
	PYTHON=$(PY) launch/train.sh --config launch/configs/default.yaml

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/bench_embedding.py --preset standard --markdown docs/benchmarks.md
	$(PY) benchmarks/bench_train.py --preset default kaggle multihot --markdown docs/benchmarks.md

clean:
	rm -rf $(VENV) build dist_rec/_C*.so *.egg-info
