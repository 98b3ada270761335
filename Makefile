# The two commands of README.md: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NCLEANER := $(VENV)/bin/ncleaner
STAMP := $(VENV)/.ncleaner-installed
DEMO := demo_out

.PHONY: demo test install lint sample-data clean

install: $(STAMP)

# torch and torchvision are pinned here (the versions this project is tested with);
# the package itself accepts any recent torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(NCLEANER) fit sample_data --out $(DEMO)/model --force
	$(NCLEANER) score sample_data --model $(DEMO)/model --out $(DEMO)/report --overwrite \
		--keep-json-fields ncleaner_noisy
	$(NCLEANER) filter sample_data --report $(DEMO)/report --out $(DEMO)/clean --auto \
		--rejected-out $(DEMO)/rejected --force
	$(PY) pipelines/demo_summary.py $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

sample-data: $(STAMP)
	$(PY) pipelines/make_sample_data.py --out sample_data

clean:
	rm -rf $(DEMO) .pytest_cache
