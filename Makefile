# The two commands of README.md: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NCLEANER := $(VENV)/bin/ncleaner
STAMP := $(VENV)/.ncleaner-installed
DEMO := demo_out

.PHONY: demo test install lint sample-data clean browser screenshot

install: $(STAMP)

# torch and torchvision are pinned here (the versions this project is tested with);
# the package itself accepts any recent torch. The ray extra is installed so that make test
# runs the Ray engine's tests (tests/test_ray_engine.py; they skip where Ray is missing).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(NCLEANER) fit sample_data --out $(DEMO)/model --force
	$(NCLEANER) score sample_data --model $(DEMO)/model --out $(DEMO)/report --overwrite \
		--keep-json-fields ncleaner_noisy
	$(NCLEANER) filter sample_data --report $(DEMO)/report --out $(DEMO)/clean --auto \
		--rejected-out $(DEMO)/rejected --force
	$(NCLEANER) inspect sample_data --report $(DEMO)/report --out $(DEMO)/inspect.html --auto \
		--truth-field ncleaner_noisy --model $(DEMO)/model
	$(PY) pipelines/demo_summary.py $(DEMO)

# tests/test_inspect_browser.py runs the inspect page in Chromium, the Debian package. It is
# installed here when missing and apt-get can (as root, or through sudo without a password);
# where it cannot, this says so and goes on, and the browser test skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no apt-get here; install Chromium to run the browser test (it skips without it)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "make browser: apt-get could not install chromium; the browser test skips without it"; \
	elif sudo -n true 2>/dev/null; then \
		(sudo apt-get update -qq && sudo apt-get install -y -qq chromium) || \
		echo "make browser: apt-get could not install chromium; the browser test skips without it"; \
	else \
		echo "make browser: installing chromium needs root (sudo apt-get install chromium); the browser test skips"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q

# The picture of the inspect page in docs/commands.md (after make demo).
screenshot: $(STAMP) browser
	$(PY) pipelines/inspect_screenshot.py $(DEMO)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

sample-data: $(STAMP)
	$(PY) pipelines/make_sample_data.py --out sample_data

clean:
	rm -rf $(DEMO) .pytest_cache
