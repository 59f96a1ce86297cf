# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test protos install clean

$(VENV_PYTHON):
	"$$(scripts/find_python.sh)" -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV_PYTHON) pyproject.toml
	$(VENV_PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lasagne-engine demo

test: $(STAMP)
	$(VENV_PYTHON) -m pytest

# Regenerate common/v1 from protos/ after editing a .proto file.
protos: $(STAMP)
	$(VENV_PYTHON) scripts/generate_protos.py

clean:
	rm -rf $(VENV) .pytest_cache
