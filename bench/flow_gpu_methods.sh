#!/bin/sh
# bench/flow_gpu.py's worker phases for three methods, one after the other on one GPU, with the
# settings of their SD3.5 configs: Flow-GRPO (configs/sd35_pickscore.yaml: CFG 4.5, every step
# the SDE), CPS in a window of 3 steps (configs/sd35_fast_cps_pickscore.yaml: CFG-free) and
# DiffusionNFT (configs/sd35_nft_pickscore.yaml: ODE sampling, CFG-free, 9 timesteps trained,
# KL 1e-4). Writes flow_gpu_h200_<method>.json into $OUT (default: here). The figures of one run
# are in the README (Benchmark, On a GPU) and docs/flow_gpu_h200_*.json.
S="--skip plain ratio_bf16 ratio_fp32 --max-seconds 100"
OUT=${OUT:-.}
python3 bench/flow_gpu.py --device cuda $S --out "$OUT/flow_gpu_h200_flow_grpo.json" > /dev/null
python3 bench/flow_gpu.py --device cuda $S --set sample.guidance_scale=1.0 --set sample.flow.noise_level=0.8 \
    --set sample.flow.sde_type=cps --set sample.flow.sde_window=3 --set "sample.flow.sde_window_range=[0,5]" \
    --set train.timestep_fraction=1.0 --set train.cfg=false --set train.clip_range=1e-5 --set train.kl_coef=0 \
    --out "$OUT/flow_gpu_h200_cps_window.json" > /dev/null
python3 bench/flow_gpu.py --device cuda $S --set sample.guidance_scale=1.0 --set sample.flow.sde_window=0 \
    --set train.algorithm=diffusion_nft --set train.cfg=false --set train.kl_coef=1e-4 \
    --out "$OUT/flow_gpu_h200_nft.json" > /dev/null
