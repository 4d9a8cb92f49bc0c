#!/usr/bin/env bash
# The CUDA checks and figures in one run, for a GPU machine lent for a few minutes:
#
#     bash benchmarks/cuda.sh [OUT_DIR]        (default: $OUT if set, else runs/cuda)
#
# 1. tests/test_cuda.py and the probe's CUDA test: CPU and CUDA give the same numbers; host syncs of a
#    measured probe step and of a Muon step do not grow with the number of weights;
# 2. benchmarks/polar.py, optim_step.py (targets: default Muon ≤ 0.8× torch.optim.Muon) and
#    probe_overhead.py with and without --floor (targets: ≤ 1.3× every step, ≤ 1.05× every 10th),
#    each ratio as median [min–max] over interleaved rounds; probe_overhead.py at d_model 32 (host time alone)
#    and --phases (where a measured step's extra time goes; alternating steps, --consecutive, and alternating with
#    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), --sparse (one measured step in SPARSE, default 10, timed
#    step by step), --ops (the aten ops each phase dispatches: about the kernel launches; optim_step.py prints them
#    per step too) and --profile (the finishing phase: cProfile, host synchronisations, torch.profiler);
#    --sparse and --profile again with SPECSCOPE_CUDA_GRAPHS=on (the probe_overhead part times "every step, CUDA
#    graphs" as a row of its own).
# Each part writes OUT_DIR/<part>.txt (15 files) and has its own time limit (LIMIT seconds, default 150), so
# one that hangs does not take the others with it. Runs specscope from src/ with the machine's own python3
# (a CUDA build of torch ≥ 2.6; PYTHON=... to choose another); nothing is installed.
# DEVICE=cpu DIMS=64 ROUNDS=1 REPEATS=1 BLOCK=2 SPARSE=2 runs the same script on a CPU, as a dry run of the script itself.
set -uo pipefail
out=${1:-${OUT:-runs/cuda}}
mkdir -p "$out"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
rounds=${ROUNDS:-5}
repeats=${REPEATS:-10}
block=${BLOCK:-10}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

part() {  # part NAME CMD...: run CMD under the time limit, its output on screen and in $out/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    timeout "${LIMIT:-150}" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

part env "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
part tests "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/probe/test_probe_monitor.py -k cuda
part polar "$py" benchmarks/polar.py --device "$dev" --dims ${DIMS:-256 768} --rounds "$rounds" --repeats "$repeats"
part optim_step "$py" benchmarks/optim_step.py --device "$dev" --skip-rf --rounds "$rounds" --repeats "$repeats" \
    --optimizers "Muon default (gram_newton_schulz)" "Muon polar=newton_schulz" "Muon polar=polar_express" "Muon polar=gram"
# (all candidates, svd, SpecGD and AutoGeometry included, took longer than 90 s on an H200)
part probe_overhead "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" --block "$block"
part probe_floor "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" --block "$block" --floor
part probe_host "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" --block $((2 * block)) --d-model 32 --seq-len 16 --batch 2
part probe_phases "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" --block "$block" --phases
# each arm's steps in a row: on one H100 --phases read the finish at 13.2 ms, --profile (one model's steps in a row) at 6.7
part probe_phases_consecutive "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" --block "$block" \
    --phases --consecutive
# and alternating again with the caching allocator's expandable segments (fewer new segments when blocks get split)
part probe_phases_expandable env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$py" benchmarks/probe_overhead.py \
    --device "$dev" --rounds "$rounds" --block "$block" --phases
part probe_sparse "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" --sparse "${SPARSE:-10}" --periods 2
part probe_ops "$py" benchmarks/probe_overhead.py --device "$dev" --ops
part probe_profile "$py" benchmarks/probe_overhead.py --device "$dev" --profile --block "$block"
# the same every-10th timing and profile with nr(G)'s polar iteration and st(A)'s warm Krylov solves replayed as CUDA graphs
part probe_sparse_graphs env SPECSCOPE_CUDA_GRAPHS=on "$py" benchmarks/probe_overhead.py --device "$dev" --rounds "$rounds" \
    --sparse "${SPARSE:-10}" --periods 2
part probe_profile_graphs env SPECSCOPE_CUDA_GRAPHS=on "$py" benchmarks/probe_overhead.py --device "$dev" --profile --block "$block"
