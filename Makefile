# Two commands do all the set-up on a fresh machine:
#   make train  the main job        make test   the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: train demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The pinned CPU build where this machine has it; otherwise the newest compatible torch.
	$(PY) -m pip install --quiet "$(TORCH)" || $(PY) -m pip install --quiet "torch>=2.5"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/tedmoe train $(ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/tedmoe demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
