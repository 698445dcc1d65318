# BRAID — two commands on a fresh machine:
#   make demo   create .venv, then run the whole workflow on the embedded synthetic default
#   make test   create .venv, then run the test suite (unit + the real DAG end to end)
#   make report the demo's HTML report (report.html)
#   make verify  check a finished run's outputs and print the command that repairs damage
#   make rehearsal  the real configuration at real shapes on this machine (rehearsal/), before GPU hours
#   make gpu-check  every GPU path of the real configuration on one GPU in a few minutes (ARGS=--cpu: tiny, on a CPU)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.braid-installed
TEST_STAMP := $(VENV)/.braid-test-installed
CORES ?= all

.PHONY: demo test report verify dryrun rulegraph rehearsal gpu-check clean

# The workflow's dependencies and SLURM's executor plugin; `make test` adds the test tools (pytest,
# moto, scikit-learn, himalaya, ...), which the demo does not need (about 20 s less to install).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[slurm]'
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/demo --cores $(CORES)
	@echo
	@echo "BRAID demo finished: metrics in results/summary.csv and summary.html, figures in results/summary.png,"
	@echo "results/<subject>/grid-strength-*.png (look here first) and frontier.png, results/<subject>/<encoder>/loss.png;"
	@echo "reconstructions in results/<subject>/<source>/{decode,strength-*/seed-*}/images/, logs in logs/."
	@echo "make report writes report.html, the page to open first."

# two workers, each test file in one of them (the DAG tests share one run per file)
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The HTML report of the demo's run (runs what is not yet done first); open report.html in a browser.
report: $(STAMP)
	$(BIN)/snakemake --profile profiles/demo --cores $(CORES)
	$(BIN)/snakemake --profile profiles/demo --report report.html
	@echo "report: report.html"

# The full-scale rehearsal (about 45 minutes on 2 CPU cores, ~20 GB of disk; needs npm for its S3
# server): config/nsd_ssd1b.yaml + config/rehearsal.yaml at NSD's and SSD-1B's real shapes, in rehearsal/;
# prints each rule's peak memory and wall time, and their extrapolation to the full experiment.
rehearsal: $(STAMP)
	$(BIN)/python -m braid.rehearsal --cores $(CORES)

# Check a finished run's outputs (every Zarr chunk against its checksum, every image folder against
# its manifest) and print the `snakemake --forcerun` command that repairs what is damaged.
verify: $(STAMP)
	$(BIN)/python -m braid.verify $(ARGS)

dryrun: $(STAMP)
	$(BIN)/snakemake -n --profile profiles/demo

# Needs Graphviz's `dot` (Debian/Ubuntu: apt-get install graphviz).
rulegraph: docs/rulegraph.svg
docs/rulegraph.svg: $(STAMP) Snakefile workflow/rules/*.smk
	$(BIN)/snakemake --rulegraph | dot -Tsvg > $@.tmp && mv $@.tmp $@

clean:
	rm -rf results logs .snakemake .braid resources/synthetic_nsd resources/nsd

# Every GPU path of the real configuration on one GPU, in a few minutes, before GPU hours are spent
# (braid.gpu_check): a table in results/gpu-check/gpu-check.md. `make gpu-check ARGS=--cpu` runs it
# at tiny sizes on a CPU (what the tests do).
gpu-check: $(STAMP)
	$(BIN)/python -m braid.gpu_check $(ARGS)
