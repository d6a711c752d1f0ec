# Two commands on a fresh machine: `make demo` and `make test` (each sets itself up).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.stereo_kd_installed
DEMO_FRAMES ?= 20
DEMO_ARGS ?=

.PHONY: install demo test lint bench clean

$(STAMP): setup.py setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: later requirements are then satisfied by this build, not a multi-GB download
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[ros,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m stereo_kd_ros.demo --frames $(DEMO_FRAMES) --out demo_out $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q test

lint: $(STAMP)
	$(VENV)/bin/ruff check stereo_kd_core stereo_kd_ros test launch benchmarks

bench: $(STAMP)
	$(PY) benchmarks/node_overhead.py

clean:
	rm -rf demo_out .pytest_cache build *.egg-info

# Training data for the CPU recipes (see MODEL_CARD.md): Debian's wallpaper photographs as the
# texture pool, psmnet's official weights, and the stage-2 pairs with cached teacher outputs.
TEXTURE_DIRS := /usr/share/wallpapers /usr/share/backgrounds
KD_DATA ?= runs/kd/data

.PHONY: textures kd-data

textures:
	test -d /usr/share/wallpapers || (apt-get update && apt-get install -y --no-install-recommends \
		plasma-workspace-wallpapers gnome-backgrounds mate-backgrounds)

kd-data: $(STAMP) textures
	test -f teachers/psmnet_kitti2015.pt || $(VENV)/bin/stereo-kd fetch-teacher
	test -d $(KD_DATA) || $(VENV)/bin/stereo-kd synth --out $(KD_DATA) --n 300 --seed 12 --height 160 \
		--width 320 --max-disparity 96 $(foreach d,$(TEXTURE_DIRS),--textures $(d)) --no-builtin-photos
	$(VENV)/bin/stereo-kd cache-teacher --teacher teachers/psmnet_kitti2015.pt --data $(KD_DATA)

# Real stereo pairs without ground truth (stereo_kd_core/data/real_pairs.json), rectified and checked,
# then psmnet's pseudo-labels and their confidence (README, "Real-pair corpus"). MIRRORS holds git
# copies of the manifest's repositories (owner+name/repo, owner+name, name or owner/name).
MIRRORS ?= mirrors
REAL_CORPUS ?= runs/real_corpus

.PHONY: real-corpus real-labels

real-corpus: $(STAMP)
	$(PY) -m stereo_kd_core.data.corpus --mirrors $(MIRRORS) --out $(REAL_CORPUS)

real-labels: $(STAMP) real-corpus
	test -f teachers/psmnet_kitti2015.pt || $(VENV)/bin/stereo-kd fetch-teacher
	nice -n 10 $(PY) -m stereo_kd_core.data.corpus_labels --data $(REAL_CORPUS) \
		--teacher teachers/psmnet_kitti2015.pt --confidence
