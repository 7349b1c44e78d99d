# specabund developer commands.
#   make test   ruff + the test suite (what CI runs)
#   make demo   simulate -> preprocess -> ... end to end on simulated data, in ./demo
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
DEMO_N ?= 1000
DEMO_EPOCHS ?= 25
# the torch build installed first; the default is the CPU wheel (a bare 'torch' may pull the CUDA build).
# GPU users: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126" venv
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test lint demo bench clean

$(BIN)/specabund:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[dev]"

venv: $(BIN)/specabund

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: venv
	@echo "make demo starts from an empty $(DEMO_DIR)/ (earlier demo outputs are removed)"
	rm -rf $(DEMO_DIR)
	$(BIN)/specabund --workdir $(DEMO_DIR) simulate --n $(DEMO_N) --output-dir sim --seed 1
	$(BIN)/specabund --workdir $(DEMO_DIR) preprocess --reference-csv sim/X_FE.csv \
		--prediction-csv sim/galah_X_FE.csv --fits-dir sim/fits --output-dir processed_data
	$(BIN)/specabund --workdir $(DEMO_DIR) train --data-path processed_data/reference_dataset.npz \
		--elements C_FE MG_FE CA_FE --epochs $(DEMO_EPOCHS) --run-name demo --overwrite --device auto
	$(BIN)/specabund --workdir $(DEMO_DIR) test --model demo --data-path processed_data/test_dataset.npz \
		--truth sim/truth.csv
	$(BIN)/specabund --workdir $(DEMO_DIR) baseline --element MG_FE --model all
	$(BIN)/specabund --workdir $(DEMO_DIR) predict --calibrate --model demo \
		--data-path processed_data/val_dataset.npz --output-dir results/calibration
	$(BIN)/specabund --workdir $(DEMO_DIR) predict --model demo --data-path processed_data/prediction_dataset.npz \
		--output-dir results/predictions --elements C_FE MG_FE CA_FE
	$(BIN)/specabund --workdir $(DEMO_DIR) analyze --model demo --elements MG_FE CA_FE --type both \
		--data-path processed_data/test_dataset.npz --max-spectra 64 --save-batch-results
	$(BIN)/specabund --workdir $(DEMO_DIR) report
	@echo "demo outputs under $(DEMO_DIR)/: processed_data/, models/demo/, results/, plots/, logs/"
	@echo "predictions: $(DEMO_DIR)/results/predictions/predictions.csv"
	@echo "report: $(DEMO_DIR)/results/report.html"

bench: venv
	$(BIN)/python benchmarks/read_fits.py
	$(BIN)/python benchmarks/simulate.py
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
