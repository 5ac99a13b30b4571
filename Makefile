# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test evaluate evaluate-guided reproduce-digits reproduce-digits-cond reproduce-digits-eps evaluate-eps export-digits-diffusers bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed  ## sample the shipped digits checkpoints (unconditional and guided) and print their evaluation tables
	$(PY) demo.py

test: $(VENV)/.installed  ## the test suite (about 7 minutes on 2 CPU cores, on a fresh clone)
	$(PY) -m pytest -q tests

evaluate: $(VENV)/.installed  ## every measure against NFE for the shipped digits models: checkpoints/digits/evaluation.md, .csv, .png
	$(PY) evaluate.py --module digits_u --checkpoints checkpoints/digits/original/checkpoint.pt \
	    checkpoints/digits/base_*/checkpoint.pt --num_images 1000 --chunk_size 1000 --seed 0 --device cpu \
	    --out checkpoints/digits/evaluation

evaluate-guided: $(VENV)/.installed  ## accuracy, KID, FID and pairing at each guidance weight for the shipped guided digits models: checkpoints/digits_cond/evaluation.*
	$(PY) evaluate.py --module digits_cond_u --checkpoints checkpoints/digits_cond/original/checkpoint.pt \
	    checkpoints/digits_cond/guided_*/checkpoint.pt --guidance 0,0.5,1,2,4 --nfe 2,4,8,16,32 --num_images 1000 \
	    --chunk_size 1000 --seed 0 --device cpu --out checkpoints/digits_cond/evaluation

reproduce-digits-cond: $(VENV)/.installed  ## rerun the whole guided digits chain from scratch, evaluation included
	bash bench/reproduce_digits_cond.sh

evaluate-eps: $(VENV)/.installed  ## the shipped eps-teacher chains measured: checkpoints/digits_eps/evaluation.* (v students) and evaluation_x.* (x students)
	$(PY) evaluate.py --module digits_u --checkpoints checkpoints/digits_eps/original/checkpoint.pt \
	    checkpoints/digits_eps/base_[0-9]*/checkpoint.pt --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 \
	    --seed 0 --device cpu --samplers ddim,dpmpp_2m --distilled_samplers ddim --out checkpoints/digits_eps/evaluation
	$(PY) evaluate.py --module digits_u --checkpoints checkpoints/digits_eps/original/checkpoint.pt \
	    checkpoints/digits_eps/x_*/checkpoint.pt --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 \
	    --device cpu --samplers ddim --out checkpoints/digits_eps/evaluation_x

reproduce-digits-eps: $(VENV)/.installed  ## a 1000-step linear-schedule eps teacher trained and distilled to one step (v students) and to 8 (x students), evaluation included
	bash bench/reproduce_digits_eps.sh

reproduce-digits: $(VENV)/.installed  ## rerun the whole digits chain from scratch (about 45 minutes on 2 CPU cores)
	bash bench/reproduce_digits.sh

export-digits-diffusers: $(VENV)/.installed  ## every shipped digits checkpoint as a diffusers folder in hub/<chain>/<stage>, and its images against sample.py's: bench/diffusers_exports.md
	$(PY) bench/diffusers_exports.py --out_dir hub --report bench/diffusers_exports.md

bench: $(VENV)/.installed  ## CPU benchmarks (digits, a 128x128 CelebA UNet, sample.py's memory against the number of images, the FID InceptionV3's rate, train.py and sample.py against diffusers' training example and DDIMPipeline); numbers go into bench/RESULTS.md by hand
	mkdir -p bench/out
	$(PY) bench/bench.py --module digits_u --device cpu --batch_size 128 --num_timesteps 128 --threads 2 --json bench/out/digits_cpu.json
	$(PY) bench/bench.py --module celeba_u --device cpu --batch_size 1 --resolution 128 --threads 2 --iters 3 --warmup 1 \
	    --sampler_steps 2 --sampler_reps 3 --max_sampling_s 30 --memory_iters 2 --json bench/out/celeba128_cpu.json
	$(PY) bench/sample_memory.py --counts 2000,20000 --json bench/out/sample_memory.json
	$(PY) bench/inception_rate.py --device cpu --threads 1 --batch_size 25 --iters 3 --json bench/out/inception_rate_cpu1.json
	$(PY) bench/inception_rate.py --device cpu --threads 2 --batch_size 25 --iters 3 --json bench/out/inception_rate_cpu2.json
	$(PY) bench/diffusers_speed.py --device cpu --threads 2 --json bench/out/diffusers_speed_cpu.json

clean-venv:
	rm -rf $(VENV)
