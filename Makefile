# One environment (.venv), two set-up commands: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= quick
# torch is pinned in the same pip command as everything else: an unpinned torch pulls CUDA wheels.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q torch==2.13.0 -e '.[book,test,serve,dicom]'

.PHONY: env reproduce test test-fast cpp lab clean refresh-notebooks gpu-wheels gpu-check

env: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(PIP_INSTALL)
	$(BIN)/python -m ipykernel install --sys-prefix --name spleen-seg --display-name "Python (spleen-seg)" >/dev/null
	touch $@

## the main job: data, training, prediction, evaluation (quick profile unless PROFILE=full)
reproduce: env
	$(BIN)/spleen-seg reproduce --profile $(PROFILE)

## the whole test suite: unit, integration, C++ tests, then the notebooks re-run and compared with
## their stored outputs (nbval, in the notebooks' own folder; notebook 02 trains the quick profile)
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=7200 -p no:cacheprovider
test: env
	$(BIN)/python -m pytest -q --durations=15 tests
	$(BIN)/python -m pytest -q $(NBVAL) notebooks

test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

cpp:
	bash cpp/build.sh

## the GPU check (issue 11; spleen_utils/gpu_check.py). gpu-wheels, where pip reaches PyPI: the wheels a
## GPU machine without network lacks, into the git-ignored gpu_wheels/ (about 10 MB): monai and nibabel
## (pure Python, --no-deps: torch, numpy, scipy, scikit-image, tqdm, psutil, onnx must be there) and this
## project's own wheel. gpu-check, on the GPU machine: install them offline, measure, write book/records/.
GPU_WHEELS ?= gpu_wheels
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --implementation py --abi none \
		--platform any --python-version 3.12 -d $(GPU_WHEELS) monai==1.6.1 nibabel==5.4.2
	$(BIN)/pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation -w $(GPU_WHEELS) . && rm -rf build
	@du -sh $(GPU_WHEELS) && ls $(GPU_WHEELS)

gpu-check:
	GPU_WHEELS=$(abspath $(GPU_WHEELS)) bash scripts/gpu_check.sh

## JupyterLab in the project's environment, with the "Python (spleen-seg)" kernel (the notebooks'
## kernelspec; they take the GPU when there is one)
lab: env
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0 -e '.[book,test,serve,dicom,lab]'
	$(BIN)/python -m ipykernel install --sys-prefix --name spleen-seg --display-name "Python (spleen-seg)" >/dev/null
	cd notebooks && ../$(BIN)/jupyter lab

## copy the notebooks executed by the last `make reproduce` (quick profile, default parameters)
## back into notebooks/ as their stored outputs, without papermill's injected cell and metadata
refresh-notebooks: env
	$(BIN)/spleen-seg reproduce --refresh-only

clean:
	rm -rf _build outputs/runs outputs/notebooks outputs/book
