# The README's two commands:
#   make demo   install into .venv, then the whole pipeline on the built-in toy world (CPU)
#   make test   install into .venv, then the test suite (CPU, offline)
# Everything the demo runs is a plain stage command below: copy any line to run it by hand.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# Idle OpenMP threads sleep instead of spinning: same results bit for bit, and on a machine that
# other jobs share, the tiny demo models run 2-5x faster (spinning threads steal each other's core).
export OMP_WAIT_POLICY ?= PASSIVE

.venv/installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch .venv/installed

install: .venv/installed

test: .venv/installed
	$(PY) -m pytest -q

# The mutation check (docs/reference.md, "What the tests check"): one-line bugs planted in the
# training steps and schedules, one at a time; tests/test_steps.py must fail on each. 7 minutes
# on 2 busy cores (one interpreter per mutant); not part of `make test`.
mutation: .venv/installed
	$(PY) scripts/mutation_check.py

# ---------------------------------------------------------------------------------------------
# The demo. Override any variable: `make demo SEED=1 DEMO=runs/demo_seed1`. The toy world is
# drawn once into $(WORLD) (cached; 26 s on 2 cores: its tiny CLIP ships pretrained in
# toy_clip.safetensors); the rest takes about 2 minutes and is re-run every time. Fixed seeds:
# on one machine with the same THREADS the same command prints the same table; elsewhere expect
# differences within the seed spread the README gives.
WORLD       ?= toy_world
WORLD_FLAGS ?=
DEMO        ?= runs/demo
SEED        ?= 0
METHODS     ?= none l2 sae-preserve
SAE_FLAGS   ?= --expansion 4 --k 8 --epochs 40 --batch-size 256 --warmup-steps 20
FT_FLAGS    ?= --epochs 5 --batch-size 128 --accum-steps 1 --lr 1e-3 --warmup-steps 10 \
               --no-augment --cache-zero-shot --log-every 50 --probe-every 50 --probe-size 256 \
               --workers 0
LAM_l2           ?= 1000
LAM_sae-preserve ?= 1000
LAM_sae-sparse   ?= 1000
LAM_l1           ?= 30
# λ = 1000 for l2 and sae-preserve: about where SAE-FT comes within 0.3 points of the zero-shot
# OOD mean (docs/toy-world.md: "The λ grid behind the defaults"; every λ: `make frontier`).
EVAL_FLAGS  ?= --wise-alphas sweep --workers 0
REPORT_FLAGS ?= --workers 0
# One thread per process, two processes at a time: the tiny demo models barely use a second
# thread (one process with 2 threads ran at 107 % CPU), so the two cores go further running
# two stages at once. Stages that need each other's outputs still run in order (the rules
# below); every stage's output is printed whole when it ends (--output-sync). JOBS=1 runs them
# one by one, with live progress bars.
THREADS     ?= 1
JOBS        ?= 2
SETS = test=$(WORLD)/data:test nocue=$(WORLD)/data:ood_nocue \
       sketch=$(WORLD)/data:ood_sketch pattern=$(WORLD)/data:ood_pattern
CLIP = local-dir:$(WORLD)/clip
RUN  = OMP_NUM_THREADS=$(THREADS) $(PY)

demo: .venv/installed
	$(MAKE) --no-print-directory -j$(JOBS) --output-sync=target demo-run

# The demo's stages, in the order of their dependencies (each runs every time the demo runs):
# world -> SAE -> one fine-tuning run per method -> evaluation and one report per method.
demo-run: demo-evaluate $(addprefix demo-report-,$(METHODS))
	$(PY) interpret.py probes $(addprefix $(DEMO)/,$(METHODS)) --out $(DEMO)/probes.png
	@echo; echo "== the comparison (top-1 %; CKA, FVU, feature preservation on the ID set vs zero-shot)"
	@$(PY) report.py plot $(DEMO)/results.jsonl --out $(DEMO)/wise_ft.png
	@echo "demo outputs in $(DEMO): results.jsonl, wise_ft.png, probes.png, report_*/report.md"

demo-world:
	$(RUN) toy_world.py --out $(WORLD) $(WORLD_FLAGS)

demo-sae: demo-world
	rm -f $(DEMO)/results.jsonl $(DEMO)/interpret.jsonl
	$(RUN) train_sae.py --model $(CLIP) --train-data $(WORLD)/data \
	    --device cpu --workers 0 --seed $(SEED) $(SAE_FLAGS) --out $(DEMO)/sae --overwrite

demo-finetune-%: demo-sae
	$(RUN) finetune.py --model $(CLIP) --train-data $(WORLD)/data --sae $(DEMO)/sae \
	    --reg $* $(if $(LAM_$*),--lam $(LAM_$*)) --device cpu --seed $(SEED) $(FT_FLAGS) \
	    --out $(DEMO)/$* --overwrite

demo-evaluate: $(addprefix demo-finetune-,$(METHODS))
	$(RUN) evaluate.py --runs $(addprefix $(DEMO)/,$(METHODS)) \
	    --wise-runs $(DEMO)/none --sae $(DEMO)/sae --sets $(SETS) --id-set test --device cpu \
	    $(EVAL_FLAGS) --results $(DEMO)/results.jsonl --plot $(DEMO)/wise_ft.png > $(DEMO)/evaluate.log

demo-report-%: demo-finetune-%
	$(RUN) interpret.py report --run $(DEMO)/$* --sae $(DEMO)/sae \
	    --data $(WORLD)/data --split test --device cpu $(REPORT_FLAGS) \
	    --out $(DEMO)/report_$* --results $(DEMO)/interpret.jsonl > /dev/null

# ---------------------------------------------------------------------------------------------
# The lab (docs/tutorial.md): one source, docs/tutorial.py (jupytext's percent format), makes
# docs/tutorial-student.ipynb (exercises as stubs) and docs/tutorial.ipynb (solutions collapsed,
# with the outputs of one run). `make lab` installs JupyterLab into .venv (once) and opens the
# student notebook there, so its kernel is the project's interpreter; `make notebook` re-makes
# both notebooks, executing the full one through a Jupyter kernel; `make tutorial` runs the
# full lab as a plain script. Settings: TUTORIAL_* environment variables (its first cell).
LAB_NOTEBOOK ?= docs/tutorial-student.ipynb

.venv/lab-installed: .venv/installed
	$(PY) -m pip install --quiet jupyterlab
	touch .venv/lab-installed

lab: .venv/lab-installed
	.venv/bin/jupyter lab $(LAB_NOTEBOOK)

tutorial: .venv/installed
	MPLBACKEND=Agg $(PY) docs/tutorial.py

notebook: .venv/installed
	$(PY) scripts/tutorial_notebooks.py

# ---------------------------------------------------------------------------------------------
# The ID–OOD frontier sweep (docs/toy-world.md: "When does SAE-FT beat L2?"): every method
# as a curve over λ (WiSE-FT over α), 3 seeds, compared at matched ID accuracy. Resumable:
# re-run the same command after a stop. `make frontier-ablations` sweeps the SAE-FT variants,
# `make frontier-controls` the PCA-basis control and LDIFS (each sharing the runs already made).
FRONTIER    ?= runs/frontier
TAG         ?= main
SEEDS       ?= 0 1 2
FRONTIER_CURVES ?= l2|--reg l2|100 300 1000 3000 10000\nsae-preserve|--reg sae-preserve|100 300 1000 3000 10000\nres-only|--reg sae-preserve --lam-mask 0|300 1000 3000 10000 30000
ABLATION_CURVES ?= sae-preserve|--reg sae-preserve|100 300 1000 3000 10000\nres-only|--reg sae-preserve --lam-mask 0|300 1000 3000 10000 30000\npres-only|--reg sae-preserve --mu 0|300 3000 30000\nsae-sparse|--reg sae-sparse|300 3000 30000\nsae-preserve-remove|--reg sae-preserve-remove|300 3000 30000\nlam-mask-10|--reg sae-preserve --lam-mask 10|100 1000 10000
# The controls (docs/toy-world.md): L_res through a PCA basis of the SAE's FVU, and LDIFS.
CONTROL_CURVES ?= pca-res|--reg pca --lam-l1 0|3000 10000 30000 100000 300000\nldifs|--reg ldifs --no-cache-zero-shot|3000 10000 30000 100000 300000

frontier: .venv/installed
	$(RUN) toy_world.py --out $(WORLD) $(WORLD_FLAGS)
	OMP_NUM_THREADS=$(THREADS) WORLD=$(WORLD) OUT=$(FRONTIER) SEEDS="$(SEEDS)" PY=$(PY) \
	    TAG=$(TAG) CURVES="$$(printf '$(FRONTIER_CURVES)')" SAE_FLAGS="$(SAE_FLAGS)" \
	    FT_FLAGS="$(FT_FLAGS)" EVAL_FLAGS="$(EVAL_FLAGS)" bash scripts/frontier.sh

frontier-ablations: .venv/installed
	$(MAKE) --no-print-directory frontier TAG=ablations FRONTIER_CURVES='$(ABLATION_CURVES)'

frontier-controls: .venv/installed
	$(MAKE) --no-print-directory frontier TAG=controls FRONTIER_CURVES='$(CONTROL_CURVES)'

# demo-finetune-% and demo-report-% are not listed: make applies no pattern rule to a phony
# target. No file has their names, so they run every time all the same.
.PHONY: install test mutation demo demo-run demo-world demo-sae demo-evaluate frontier \
        frontier-ablations frontier-controls lab tutorial notebook
