.PHONY: setup test lint format bench build
setup:
	bash scripts/setup.sh
build:
	.venv/bin/python -m pip install -q --no-build-isolation -e .
test:
	bash scripts/test.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
bench:
	bash scripts/bench.sh
