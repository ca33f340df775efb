# make demo : tiny FLUX model -> synthetic images -> preprocess + train under torchrun (2 CPU ranks)
# make test : the test suite (CPU, gloo, tiny model; no downloads)
# make demo SHARDING=fsdp NPROC=3 : the demo with the model sharded over 3 ranks (FSDP2)
# GPU users: make venv TORCH_SPEC="torch==2.11.0" (or any CUDA build) before anything else.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
SHARDING ?= auto
PY := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test clean

# the stamp names the torch spec, so `make venv TORCH_SPEC=...` after a first make installs that torch
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || ($(PYTHON) -m pip install -q virtualenv && $(PYTHON) -m virtualenv $(VENV))
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed*
	touch $@

venv: $(STAMP)

demo: venv
	rm -rf demo/cache demo/out
	$(PY) -m flux_lora make-tiny demo/tiny
	$(PY) -m flux_lora demo-data demo/images --count 12
	$(TORCHRUN) --nproc_per_node=$(NPROC) -m flux_lora preprocess --config configs/tiny.yaml
	$(TORCHRUN) --nproc_per_node=$(NPROC) -m flux_lora train --config configs/tiny.yaml --sharding $(SHARDING)
	@echo
	@echo "LoRA:    demo/out/lora.safetensors   (ComfyUI/kohya: demo/out/lora-kohya.safetensors)"
	@echo "loss:    demo/out/loss.png   previews: demo/out/samples/   events: demo/out/events.jsonl"
	@echo "try it:  $(PY) -m flux_lora sample --model demo/tiny --lora demo/out/lora.safetensors --prompt 'sks, a red circle' --size 64 --steps 4 --max-sequence-length 32 --out demo/out/try.png"

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf demo .pytest_cache
