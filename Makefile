# The two commands of the README. Everything they need is installed by scripts/bootstrap.
.PHONY: start test test-fast bootstrap

start:  ## start the platform on embedded defaults (Label Studio on SQLite, images on local disk)
	scripts/bootstrap
	.venv/bin/mammoflag up --demo

test:  ## run the whole test suite against real services
	scripts/bootstrap --browser
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-fast:  ## only the tests that need no server
	scripts/bootstrap
	.venv/bin/python -m pytest -m "not label_studio and not services and not browser and not slow" $(PYTEST_ARGS)
