#!/usr/bin/env bash
# One stage of a GPU session per call, each well inside the device tool's 10 minutes; results and logs
# go to $OUT (what the device tool brings back), else to benchmarks/results/session-<date>/.
#
#   bash benchmarks/gpu_session.sh build-test        # build masked_dit._C (sm_90), `masked-dit info`, pytest -m gpu
#   bash benchmarks/gpu_session.sh ops               # bench_ops.py, every op and backend
#   bash benchmarks/gpu_session.sh train dit XL      # bench_train_step.py, one family and size, all variants
#   bash benchmarks/gpu_session.sh sample            # bench_sampling.py, 50 of the 250 DDPM steps (scale img/s by 1/5)
#   bash benchmarks/gpu_session.sh profile dit XL 256   # 3 profiled steps of reference + compiled_fused at batch 256:
#                                                       # time by kernel category, top kernels, gzipped Chrome traces
#                                                       # (PROFILE_VARIANTS=... for others; no batch: searched)
#
# Calls that follow within the machine's warm window reuse its build (ignored outputs are kept there);
# every stage rebuilds only when `masked_dit._C` is missing. Without a GPU every stage runs at toy
# size on the CPU instead (how CI-less machines check this script). Wheels the image lacks
# (diffusers, for the VAE tests) travel in .whl/ (benchmarks/fetch_wheels.sh fills it): carry ".whl".
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-build-test}
out=${OUT:-benchmarks/results/session-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    gpu=1; size=(--size full); device=(--device cuda)
else
    gpu=0; size=(--size toy); device=(--device cpu)
fi

build() {  # the CUDA extension, in place (no pip: the image has no index to reach)
    if [ "$gpu" = 1 ] && ! python3 -c "import masked_dit._C" 2> /dev/null; then
        FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace \
            > "$out/build.log" 2>&1 || { echo "build failed: see $out/build.log"; tail -20 "$out/build.log"; }
    fi
    python3 -m masked_dit info > "$out/info.txt" 2>&1
    cat "$out/info.txt"
}

case "$stage" in
    build-test)
        build
        if [ "$gpu" = 1 ]; then
            # whatever the build left of the device tool's 600 s per command (a first build can take minutes)
            left=$((570 - SECONDS)); [ "$left" -lt 60 ] && left=60
            timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests 2>&1 \
                | tee "$out/gpu_tests.log" | tail -40
        else
            echo "no GPU: pytest -m gpu would only skip"
        fi
        ;;
    ops)
        build > /dev/null
        timeout 420 python3 benchmarks/bench_ops.py "${device[@]}" "${size[@]}" --out-dir "$out" 2>&1 | tee "$out/ops.log" | tail -40
        ;;
    train)
        build > /dev/null
        family=${2:-dit}; model_size=${3:-XL}
        sizes=(); [ "$gpu" = 1 ] && sizes=(--sizes "$model_size")
        timeout 480 python3 benchmarks/bench_train_step.py "${device[@]}" "${size[@]}" "${sizes[@]}" \
            --families "$family" --out-dir "$out" 2>&1 | tee "$out/train_${family}_${model_size}.log" | tail -20
        ;;
    profile)
        build > /dev/null
        family=${2:-dit}; model_size=${3:-XL}; batch=${4:-}
        sizes=(); batches=(); [ "$gpu" = 1 ] && sizes=(--sizes "$model_size")
        [ -n "$batch" ] && batches=(--batch "$batch")
        timeout 480 python3 benchmarks/bench_train_step.py "${device[@]}" "${size[@]}" "${sizes[@]}" "${batches[@]}" \
            --families "$family" --variants "${PROFILE_VARIANTS:-reference,compiled_fused}" --profile 3 --trace \
            --tag profile --out-dir "$out" 2>&1 | tee "$out/profile_${family}_${model_size}.log" | grep -v '^USDT' | tail -60
        ;;
    sample)
        build > /dev/null
        steps=(); [ "$gpu" = 1 ] && steps=(--steps 50 --batches 64,256)
        timeout 480 python3 benchmarks/bench_sampling.py "${device[@]}" "${size[@]}" "${steps[@]}" \
            --samplers dit_ddpm250_cfg --out-dir "$out" 2>&1 | tee "$out/sample.log" | tail -20
        ;;
    *)
        echo "unknown stage '$stage'; valid: build-test, ops, train FAMILY SIZE, profile FAMILY SIZE [BATCH], sample" >&2
        exit 2
        ;;
esac
