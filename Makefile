# pama_ext — build, check and test.
#
#   make test            fresh machine: venv (.venv), torch==2.13.0 + test deps, build, nvcc check (skipped
#                        without nvcc), pytest
#   make test VENV=      use the current python3 as is (e.g. a GPU machine with torch preinstalled)
#   make nvcc-check      compile every csrc/cuda/*.cu with bare nvcc for sm_80 and sm_90 (skipped, with a
#                        message, where $(NVCC) is not found; PAMA_EXT_REQUIRE_NVCC=1 makes that an error)
#   make verl-deps       a separate venv ($(VERL_VENV)) with verl 0.9.1 and all it requires, pip-resolved with
#                        $(TORCH_SPEC) (`pip check` clean), plus what verl's trainer modules import; the extension built
#   make test-verl       the verl tests against that real verl (PAMA_EXT_REQUIRE_VERL=1: no skips), on CPU; CI runs it
#   make demo            PAMA vs MORLHF vs MGDA-UB on the embedded tiny world (CPU; prints the table, writes runs/demo)
#   make demo-dpo        preference data: every pama-ext dpo method on the tiny world (table + fronts in runs/demo-dpo)
#   make bench           CPU benchmark of the fused ops (pama_ext/benchmarks/bench_ops.py: pama-ext bench ops)
#   make info            versions, compiled archs, kernels per device
#   make gpu-report      ptxas registers/spills and SASS load widths per kernel, sm_80 and sm_90 (no GPU needed)
#   make wheel           a wheel for the installed torch into dist/ (CPU here; CUDA sm_80+sm_90, sm_90 PTX, with a CUDA torch)
#   make verify-wheel    install the newest wheel into a fresh venv and run the op tests against it
#   make wheel-cuda      a CUDA wheel (sm_80 + sm_90, sm_90 PTX) built on any machine with nvcc: a build venv
#                        (.venv-cuda) gets $(CUDA_TORCH_SPEC) from the registry, no GPU needed
#   make verify-wheel-cuda  that wheel, installed into a fresh venv with $(CUDA_TORCH_SPEC), tested
#                        (CUDA cases run only where a GPU is present; PAMA_EXT_REQUIRE_CUDA=1 to insist)
#   make wheels          the release matrix into dist/, each wheel repaired to a manylinux tag
#                        (tools/build_wheels.sh): CPU wheels for CPython 3.10-3.13 against $(TORCH_SPEC), CUDA
#                        wheels (sm_80 + sm_90, sm_90 PTX) for 3.11 and 3.12 against $(CUDA_TORCH_SPEC);
#                        interpreters from pyenv; WHEELS="cu-3.12 cpu-3.10" for some entries. Slow (about
#                        an hour on 2 cores, several GB of torch downloads) and not part of `make test`
#   make verify-wheels   each of those wheels installed into a fresh venv with its Python and torch, op tests
#                        run against it; results appended to dist/verify-results.tsv
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
NVCC ?= nvcc
NVCC_ARCHS ?= 80 90
# the torch a CUDA wheel is built against: the registry's default Linux build of 2.11.0 is +cu130,
# the torch of the project's GPU machines; CUDA_HOME defaults to the toolkit of the nvcc on PATH
CUDA_TORCH_SPEC ?= torch==2.11.0
CUDA_VENV ?= .venv-cuda
CUDA_HOME ?= $(shell NVCC=$(NVCC) bash tools/cuda_home.sh)
PYTEST_ARGS ?=
TRAIN_DEPS ?= transformers tokenizers vaderSentiment pyyaml tqdm matplotlib scipy peft==0.21.2
# the TRL adapter's tests run trl itself (its own deps: accelerate, datasets; torch and transformers are kept)
INTEGRATION_DEPS ?= trl==1.16.0
# the Triton epilogue of the fused output layer (pama_ext/triton_kernels.py): its tests run the kernels under
# TRITON_INTERPRET=1 on CPU tensors and compile them for sm_80 / sm_90 without a GPU (the pin is theirs)
TRITON_VERSION ?= 3.9.0
# make verl-deps / test-verl: verl in a venv of its own, because verl 0.9.1 pins transformers<5.11 (and
# tensordict<=0.10, omegaconf<2.4 through hydra-core) while the project's venv has newer ones. verl's own
# requirements are resolved by pip together with TORCH_SPEC; the rest of VERL_DEPS are the packages of verl's
# `verl-core` extra that its trainer modules (ray_trainer, ppo.v1, the reward loop) import at import time.
VERL_VENV ?= .venv-verl
VERL_DEPS ?= verl==0.9.1 TransferQueue>=0.1.10 cachetools fastapi uvicorn
VERL_TEST_DEPS ?= pytest hypothesis expecttest numpy scipy ninja setuptools wheel
VERL_TESTS ?= python_tests/test_integrations.py python_tests/test_integrations_verl_e2e.py

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
VENV_STAMP :=
else
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.created
endif

CU_SOURCES := $(wildcard csrc/cuda/*.cu)
CU_OBJECTS := $(patsubst csrc/cuda/%.cu,build/nvcc/%.o,$(CU_SOURCES))
CU_HEADERS := $(wildcard csrc/*.h) $(wildcard csrc/cuda/*.cuh)

.PHONY: test install build nvcc-check bench info clean demo study demo-dpo wheel verify-wheel gpu-report verl-deps \
	test-verl wheel-cuda verify-wheel-cuda wheels verify-wheels

test: install
	$(MAKE) -j4 nvcc-check VENV="$(VENV)" PYTHON="$(PYTHON)"
	PAMA_EXT_REQUIRE_NATIVE=1 $(PY) -m pytest python_tests -q $(PYTEST_ARGS)

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

# Installs only what is missing, so it also works where no package registry is reachable.
install: $(VENV_STAMP)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -c "import pytest, hypothesis, expecttest, numpy, scipy, ninja, setuptools, wheel" 2>/dev/null || \
		$(PY) -m pip install -q pytest hypothesis expecttest numpy scipy ninja setuptools wheel || \
		echo "make: WARNING: could not install the test dependencies (no package registry?); using what is installed"
	@$(PY) -c "import transformers, tokenizers, vaderSentiment, yaml, tqdm, matplotlib, scipy, peft" 2>/dev/null || \
		$(PY) -m pip install -q $(TRAIN_DEPS) || \
		echo "make: WARNING: could not install the trainer dependencies; the trainer tests and make demo will not run"
	@$(PY) -c "import trl, datasets, accelerate" 2>/dev/null || \
		$(PY) -m pip install -q $(INTEGRATION_DEPS) || \
		echo "make: WARNING: could not install trl; the TRL integration tests will be skipped"
	@$(PY) -c "import sys, triton; sys.exit(triton.__version__ != '$(TRITON_VERSION)')" 2>/dev/null || \
		$(PY) -m pip install -q "triton==$(TRITON_VERSION)" || \
		echo "make: WARNING: could not install triton==$(TRITON_VERSION); the Triton kernel tests will be skipped"
	$(MAKE) build VENV="$(VENV)" PYTHON="$(PYTHON)"

# the extension, built in place and installed editable into the interpreter given (here and in verl-deps)
BUILD_ARGS := -m pip install -q --no-build-isolation --no-deps -e .

build:
	$(PY) $(BUILD_ARGS)

$(VERL_VENV)/.created:
	$(PYTHON) -m venv $(VERL_VENV)
	touch $@

# One pip resolve for torch, verl and the test tools (nothing installed with --no-deps), then `pip check`.
verl-deps: $(VERL_VENV)/.created
	@$(VERL_VENV)/bin/python -c "import torch, pytest, hypothesis, verl.trainer.ppo.ray_trainer, verl.trainer.ppo.v1" \
		2>/dev/null || $(VERL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(foreach d,$(VERL_DEPS),"$(d)") \
		$(VERL_TEST_DEPS)
	$(VERL_VENV)/bin/python -m pip check
	$(VERL_VENV)/bin/python $(BUILD_ARGS)

test-verl: verl-deps
	PAMA_EXT_REQUIRE_NATIVE=1 PAMA_EXT_REQUIRE_VERL=1 $(VERL_VENV)/bin/python -m pytest $(VERL_TESTS) -q $(PYTEST_ARGS)

# The CUDA sources must compile even where no GPU is present (launch.h and pama_math.h have no torch headers).
# Without nvcc (a CPU-only machine) the check is skipped with a message, so that `make test` still runs
# the tests; PAMA_EXT_REQUIRE_NVCC=1 turns the skip into an error (for a machine that must have nvcc).
NVCC_PATH := $(shell p=$$(command -v "$(firstword $(NVCC))" 2>/dev/null) && test -f "$$p" && test -x "$$p" && echo "$$p")
ifneq ($(NVCC_PATH),)
nvcc-check: $(CU_OBJECTS)
	@echo "nvcc-check: $(words $(CU_SOURCES)) CUDA files compile for sm_$(NVCC_ARCHS)"
else
nvcc-check:
	@if [ "$(PAMA_EXT_REQUIRE_NVCC)" = 1 ]; then \
		echo "make nvcc-check: nvcc not found (NVCC=$(NVCC)) and PAMA_EXT_REQUIRE_NVCC=1" >&2; exit 2; fi
	@echo "nvcc not found: skipping the CUDA compile check (NVCC=$(NVCC); set NVCC to an nvcc to run it)"
endif

build/nvcc/%.o: csrc/cuda/%.cu $(CU_HEADERS)
	@mkdir -p build/nvcc
	$(NVCC) -std=c++17 -O3 -Icsrc $(foreach a,$(NVCC_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) -c $< -o $@

# pama vs morlhf vs mgda-ub, 3 seeds, sentiment vs conciseness: tables with 95 % intervals and verdicts (runs/demo)
demo: install
	$(PY) -m pama_ext.cli compare --out runs/demo

# the study of docs/results.md (resumable: run it again to go on; about an hour on 2 loaded cores)
STUDY_N2 ?= pama,pama:update_norm=active,pama:lr=0.0006,morlhf,morlhf:lr=0.0006,morlhf:weights=0.8/0.2,morlhf:weights=0.2/0.8,mgda-ub
STUDY_N3 ?= pama,pama:update_norm=active,morlhf,mgda-ub
STUDY_FRONTS ?= pama,morlhf,morlhf:weights=0.8/0.2,morlhf:weights=0.2/0.8,linear,linear:weights=0.8/0.2,linear:weights=0.2/0.8
# issue 14: the steerable PAMA front vs MORLHF's over the same sweep, and the PAMA variants (docs/results.md)
STUDY_STEER ?= pama,morlhf
STUDY_VARIANTS ?= pama:granularity=sequence,pama:granularity=batch,pama:ratio_to=ref,pama:noon_order=noon-first
study: install
	$(PY) -m pama_ext.cli compare --out runs/study --settings n2 --seeds 0,1,2,3,4 --methods $(STUDY_N2)
	$(PY) -m pama_ext.cli compare --out runs/study --settings n3 --seeds 0,1,2 --methods $(STUDY_N3) --hv-ref nadir
	$(PY) -m pama_ext.cli compare --out runs/study --settings legacy --seeds 0,1,2
	$(PY) -m pama_ext.cli compare --out runs/study --settings n2 --seeds 0,1,2 --methods $(STUDY_FRONTS)
	$(PY) -m pama_ext.cli compare --out runs/steer --settings n2 --seeds 0,1,2 --methods $(STUDY_STEER) --sweep 0.8/0.2,0.2/0.8
	$(PY) -m pama_ext.cli compare --out runs/steer --settings n2 --seeds 0,1,2 --methods pama,morlhf,$(STUDY_VARIANTS)

demo-dpo: install
	$(PY) -m pama_ext.dpo.demo

bench: install
	$(PY) -m pama_ext.benchmarks.bench_ops

wheel: install
	PYTHON=$(PY) bash tools/build_wheel.sh

verify-wheel:
	PYTHON=$(PYTHON) bash tools/verify_wheel.sh $$(ls -1t dist/pama_ext-*.whl | head -1)

$(CUDA_VENV)/.created:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" numpy ninja setuptools wheel
	touch $@

wheel-cuda: $(CUDA_VENV)/.created
	@test -x "$(CUDA_HOME)/bin/nvcc" || { echo "make wheel-cuda: no CUDA toolkit (CUDA_HOME=$(CUDA_HOME)); set NVCC or CUDA_HOME" >&2; exit 2; }
	CUDA_HOME="$(CUDA_HOME)" PAMA_EXT_CUDA=1 PYTHON=$(CUDA_VENV)/bin/python bash tools/build_wheel.sh

verify-wheel-cuda:
	TORCH_SPEC="$(CUDA_TORCH_SPEC)" VERIFY_SYSTEM_SITE=0 PYTHON=$(PYTHON) \
		bash tools/verify_wheel.sh $$(ls -1t dist/pama_ext-*+cu*.whl | head -1)

# the matrix entries of tools/build_wheels.sh to build or verify (empty: all of them)
WHEELS ?=
wheels:
	TORCH_SPEC="$(TORCH_SPEC)" CUDA_TORCH_SPEC="$(CUDA_TORCH_SPEC)" CUDA_HOME="$(CUDA_HOME)" \
		bash tools/build_wheels.sh $(WHEELS)

verify-wheels:
	TORCH_SPEC="$(TORCH_SPEC)" CUDA_TORCH_SPEC="$(CUDA_TORCH_SPEC)" bash tools/build_wheels.sh --verify $(WHEELS)

# ptxas resources and SASS load widths of every kernel, one pair of files per arch of NVCC_ARCHS:
# benchmarks/results/ptxas_sm<ARCH>.txt and sass_summary_sm<ARCH>.txt (no GPU needed; the SASS part needs
# cuobjdump + nvdisasm: the CUDA toolkit's, or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)
gpu-report:
	for a in $(NVCC_ARCHS); do ARCH=$$a NVCC=$(NVCC) PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash tools/gpu_report.sh || exit 1; done

info: install
	$(PY) -m pama_ext.cli info

clean:
	rm -rf build dist *.egg-info pama_ext/_C*.so pama_ext/_build_info.py $(CUDA_VENV) $(VERL_VENV)
