#!/usr/bin/env bash
# One stage of a GPU session per call, each well inside the device tool's 10 minutes; results and logs
# go to $OUT (what the device tool brings back), else to benchmarks/results/session-<date>/.
#
#   bash benchmarks/gpu_session.sh build-test        # build masked_dit._C (sm_90), `masked-dit info`, pytest -m gpu
#   bash benchmarks/gpu_session.sh ops               # bench_ops.py, every op and backend
#   bash benchmarks/gpu_session.sh train dit XL      # bench_train_step.py, one family and size, all variants
#   bash benchmarks/gpu_session.sh train mdtv2 XL compiled_fused 128   # only these variants, at this batch
#   bash benchmarks/gpu_session.sh sample            # bench_sampling.py, 50 of the 250 DDPM steps (rows say so)
#   bash benchmarks/gpu_session.sh profile dit XL 256   # 3 profiled steps of reference + compiled_fused at batch 256:
#                                                       # time by kernel category, top kernels, gzipped Chrome traces
#                                                       # (PROFILE_VARIANTS=... for others; no batch: searched)
#
# Time: the whole stage (the extension build included) must end inside one device call (600 s), so
# each stage runs against a deadline of STAGE_SECONDS (default 560) from its start, and every python
# process gets `timeout` = the time left. `train` runs the reference and eager variants in one process
# (they search the batch), then each compiled variant in its own process at the batch eager found
# (`--batch`: no compile per probed batch), compiled_fused first: a variant cut off by the deadline
# loses only its own row (bench_train_step.py rewrites its JSON after every variant), and rows of
# every process merge into the day's file. A variant that no longer has MIN_SECONDS (default 90) left
# is not started and is named in the log. COMPILED_VARIANTS="compiled_fused" keeps a long stage
# (MDTv2/MaskDiT at XL, ~2-4 min of compile per compiled variant) to the headline variant;
# COMPILE_MODE=max-autotune-no-cudagraphs compiles them with Inductor's GEMM autotuning, into a file of
# its own (tag TAG, default "autotune": its rows do not replace the default mode's).
#
# Calls that follow within the machine's warm window (30 s) reuse its build (ignored outputs are kept
# there); every stage rebuilds only when `masked_dit._C` does not import. Build it here before the
# session (benchmarks/prebuild_ext.sh) and name masked_dit/_C.cpython-312-*.so in `carry`: a fresh
# machine then skips the build (build-test also copies a build made there to $OUT). Without a GPU
# every stage runs at toy size on the CPU instead (how CI-less machines check this script). Wheels
# the image lacks (diffusers, for the VAE tests) travel in .whl/ (benchmarks/fetch_wheels.sh fills
# it): carry ".whl".
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-build-test}
out=${OUT:-benchmarks/results/session-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
deadline=$((SECONDS + ${STAGE_SECONDS:-560}))
min_seconds=${MIN_SECONDS:-90}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    gpu=1; size=(--size full); device=(--device cuda); compile_backend=()
else
    # toy CPU check: aot_eager (no C++ toolchain or Inductor codegen needed, seconds instead of minutes)
    gpu=0; size=(--size toy); device=(--device cpu); compile_backend=(--compile-backend aot_eager)
fi

left() { echo $((deadline - SECONDS)); }

# run_timed LOG CMD...: CMD under `timeout` = the stage's time left, appending to LOG; refuses when
# fewer than min_seconds are left (returns 124 as a timeout would).
run_timed() {
    local log=$1; shift
    local t; t=$(left)
    if [ "$t" -lt "$min_seconds" ]; then
        echo "not started (only ${t}s of the stage left, need ${min_seconds}s): $*" | tee -a "$log"
        return 124
    fi
    timeout "$t" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "stopped by the stage deadline (${t}s): $*" | tee -a "$log"
    return "$rc"
}

build() {  # the CUDA extension, in place (no pip: the image has no index to reach)
    if [ "$gpu" = 1 ] && ! python3 -c "import masked_dit._C" 2> /dev/null; then
        local t; t=$(left); [ "$t" -gt 360 ] && t=360
        FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout "$t" python3 setup.py build_ext --inplace \
            > "$out/build.log" 2>&1 || { echo "build failed: see $out/build.log"; tail -20 "$out/build.log"; }
        echo "# extension build took $SECONDS s of the stage"
    fi
    python3 -m masked_dit info > "$out/info.txt" 2>&1
    cat "$out/info.txt"
}

# The batch a train run's eager variant settled on (eager, else eager_fused), from the day's JSON:
# eager_batch FAMILY SIZE (SIZE: S/B/L/XL, or toy).
eager_batch() {
    python3 - "$out" "$1" "$2" << 'EOF'
import json, sys
from pathlib import Path
out, family, size = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = []
for path in sorted(out.glob("train_step-*.json")):
    rows += [r for r in json.loads(path.read_text()).get("results", [])
             if r.get("family") == family and r.get("size") == size]
for variant in ("eager", "eager_fused"):
    ok = [r for r in rows if r.get("variant") == variant and r.get("status") == "ok"]
    if ok:
        print(ok[-1]["batch"])
        break
EOF
}

case "$stage" in
    build-test)
        build
        if [ "$gpu" = 1 ]; then
            cp masked_dit/_C*.so "$out/" 2> /dev/null && echo "# copied $(ls masked_dit/_C*.so) to \$OUT (carry it back)"
            t=$(left); [ "$t" -gt 300 ] && t=300
            timeout "$t" python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests 2>&1 \
                | tee "$out/gpu_tests.log" | tail -40
        else
            echo "no GPU: pytest -m gpu would only skip"
        fi
        ;;
    ops)
        build > /dev/null
        run_timed "$out/ops.log" python3 benchmarks/bench_ops.py "${device[@]}" "${size[@]}" --out-dir "$out" | tail -40
        ;;
    train)
        build > /dev/null
        family=${2:-dit}; model_size=${3:-XL}; variants=${4:-}; batch=${5:-}
        sizes=(); [ "$gpu" = 1 ] && sizes=(--sizes "$model_size")
        log="$out/train_${family}_${model_size}.log"
        mode=(); [ -n "${COMPILE_MODE:-}" ] && mode=(--compile-mode "$COMPILE_MODE" --tag "${TAG:-autotune}")
        bench=(python3 benchmarks/bench_train_step.py "${device[@]}" "${size[@]}" "${sizes[@]}" --families "$family"
               "${compile_backend[@]}" "${mode[@]}" --out-dir "$out")
        if [ -n "$variants" ]; then
            fixed=(); [ -n "$batch" ] && fixed=(--batch "$batch")
            run_timed "$log" "${bench[@]}" --variants "$variants" "${fixed[@]}" | tail -20
        else
            run_timed "$log" "${bench[@]}" --variants reference,reference_bf16,eager,eager_fused | tail -20
            batch=$(eager_batch "$family" "$([ "$gpu" = 1 ] && echo "$model_size" || echo toy)")
            fixed=(); [ -n "$batch" ] && fixed=(--batch "$batch")
            echo "# compiled variants at batch ${batch:-(searched)}" | tee -a "$log"
            # --warmup 10: the compile (and MDTv2's dynamic-shape recompile) happens in the first steps;
            # five more untimed steps cost seconds and keep `compiled_while_timing` at 0.
            for variant in ${COMPILED_VARIANTS:-compiled_fused compiled_fused_mlp compiled compiled_fused_fsdp}; do
                run_timed "$log" "${bench[@]}" --variants "$variant" --warmup 10 "${fixed[@]}" | tail -3
            done
        fi
        echo "# train stage: ${SECONDS}s" | tee -a "$log"
        ;;
    profile)
        build > /dev/null
        family=${2:-dit}; model_size=${3:-XL}; batch=${4:-}
        sizes=(); batches=(); [ "$gpu" = 1 ] && sizes=(--sizes "$model_size")
        [ -n "$batch" ] && batches=(--batch "$batch")
        run_timed "$out/profile_${family}_${model_size}.log" python3 benchmarks/bench_train_step.py "${device[@]}" \
            "${size[@]}" "${sizes[@]}" "${batches[@]}" "${compile_backend[@]}" --families "$family" \
            --variants "${PROFILE_VARIANTS:-reference,compiled_fused}" --warmup 10 --profile 3 --trace --tag profile \
            --out-dir "$out" | grep -v '^USDT' | tail -60
        ;;
    sample)
        build > /dev/null
        steps=(); [ "$gpu" = 1 ] && steps=(--steps 50 --batches 64,256)
        run_timed "$out/sample.log" python3 benchmarks/bench_sampling.py "${device[@]}" "${size[@]}" "${steps[@]}" \
            "${compile_backend[@]}" --samplers dit_ddpm250_cfg --out-dir "$out" | tail -20
        ;;
    *)
        echo "unknown stage '$stage'; valid: build-test, ops, train FAMILY SIZE [VARIANTS [BATCH]], profile FAMILY SIZE [BATCH], sample" >&2
        exit 2
        ;;
esac
