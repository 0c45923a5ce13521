# The two commands a new user runs: `make demo` and `make test`. Each creates .venv and installs
# what it needs first; only Python 3.11+ is required.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := data/demo

.PHONY: demo demo-scale-mae demo-gfm demo-contrastive test test-slow bench clean help

help:
	@echo "make demo   build the built-in sample, convert it, and pretrain MP-MAE atto on it (CPU)"
	@echo "make demo-scale-mae  pretrain a small Scale-MAE on the same sample (CPU)"
	@echo "make demo-gfm  GFM continual pretraining (SimMIM + distillation from a frozen teacher)"
	@echo "make demo-contrastive  dense contrastive pretraining (Embedding Earth) on the sample"
	@echo "make test   run the test suite"
	@echo "make test-slow  the minutes-long statistical tests (pretraining beats random init)"
	@echo "make bench  run the benchmarks in benchmarks/"

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mmearth_jax needs Python 3.11 or newer; set PYTHON=python3.X")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,torch,notebook,geo]'
	@touch $@

demo: $(STAMP)
	$(BIN)/mmearth-jax synth --out $(DEMO)/h5 --n 256 --size 64 --seed 0
	$(BIN)/mmearth-jax convert --src $(DEMO)/h5 --out $(DEMO)/shards --shards 8 --workers 2
	$(BIN)/mmearth-jax verify $(DEMO)/shards
	rm -rf $(DEMO)/run
	$(BIN)/mmearth-jax train --config configs/mp_mae.py:demo --workdir $(DEMO)/run \
	    --config.data.path=$(DEMO)/shards --config.eval.dataset=mmearth:$(DEMO)/shards
	rm -f $(DEMO)/mp_mae_atto.pth
	$(BIN)/mmearth-jax to-torch --checkpoint $(DEMO)/run --layout mmearth \
	    --out $(DEMO)/mp_mae_atto.pth --check mmearth:$(DEMO)/shards

demo-scale-mae: $(STAMP) $(DEMO)/shards/manifest.json
	rm -rf $(DEMO)/scale_mae_run
	$(BIN)/mmearth-jax train --config configs/scale_mae.py:demo --workdir $(DEMO)/scale_mae_run \
	    --config.data.path=$(DEMO)/shards --config.eval.dataset=mmearth:$(DEMO)/shards

demo-gfm: $(STAMP) $(DEMO)/shards/manifest.json
	rm -rf $(DEMO)/gfm_teacher.pth $(DEMO)/gfm_teacher $(DEMO)/gfm_run
	$(BIN)/python configs/gfm.py demo-teacher $(DEMO)/gfm_teacher.pth
	$(BIN)/mmearth-jax from-torch --checkpoint $(DEMO)/gfm_teacher.pth --out $(DEMO)/gfm_teacher
	$(BIN)/mmearth-jax train --config configs/gfm.py:demo --workdir $(DEMO)/gfm_run \
	    --config.data.path=$(DEMO)/shards --config.teacher.checkpoint=$(DEMO)/gfm_teacher \
	    --config.eval.dataset=mmearth:$(DEMO)/shards

demo-contrastive: $(STAMP) $(DEMO)/shards/manifest.json
	rm -rf $(DEMO)/contrastive_run
	$(BIN)/mmearth-jax train --config configs/dense_contrastive.py:demo \
	    --workdir $(DEMO)/contrastive_run --config.data.path=$(DEMO)/shards \
	    --config.eval.dataset=mmearth:$(DEMO)/shards

# The built-in sample, for the demos that do not build it themselves.
$(DEMO)/shards/manifest.json: | $(STAMP)
	$(BIN)/mmearth-jax synth --out $(DEMO)/h5 --n 256 --size 64 --seed 0
	$(BIN)/mmearth-jax convert --src $(DEMO)/h5 --out $(DEMO)/shards --shards 8 --workers 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" --durations=25 tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow tests

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) data *.egg-info
