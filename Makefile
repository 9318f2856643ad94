# The two commands of the README. Everything they need is installed by scripts/bootstrap.
.PHONY: start test test-fast check bootstrap

start:  ## start the platform on embedded defaults (Label Studio on SQLite, images on local disk)
	scripts/bootstrap
	.venv/bin/mammoflag up --demo

test:  ## the architecture and type checks, then the whole test suite against real services
	scripts/bootstrap --browser
	.venv/bin/lint-imports
	.venv/bin/mypy
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-fast:  ## only the tests that need no server
	scripts/bootstrap
	.venv/bin/python -m pytest -m "not label_studio and not services and not browser and not slow and not orthanc" $(PYTEST_ARGS)

check:  ## only the architecture (import-linter) and type (mypy) checks
	scripts/bootstrap
	.venv/bin/lint-imports
	.venv/bin/mypy
