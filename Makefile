# Two entry points, both self-installing on a fresh machine that has Python 3.11:
#   make demo   the whole chain on bundled real images (CPU, minutes)
#   make test   the pytest suite as CI runs it
# (and make ablations: the demo's stores, then a small sweep of students compared)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# faiss flavour: cpu (default) or gpu (faiss-gpu: k-means, assignment and kNN on every visible GPU)
FAISS ?= cpu
# torch must come from the package index, never from a local wheel folder (that wheel cannot load torchvision).
export PIP_FIND_LINKS :=

.PHONY: demo ablations test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,$(FAISS)]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pipeline demo --out runs/demo

ablations: $(VENV)/.installed
	$(VENV)/bin/pipeline demo --ablations --out runs/demo

# Triton kernels are checked on CPU by Triton's interpreter (it must be set before triton is imported).
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow and not gpu" -q -p no:cacheprovider --durations=15

clean:
	rm -rf $(VENV) runs
