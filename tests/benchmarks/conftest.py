"""Runs each benchmark once at toy size on the CPU (session-scoped): the tests read the JSON."""
import json

import pytest

from benchmarks import bench_sampling, bench_train_step

TOY = ["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0"]


@pytest.fixture(scope="session")
def train_results(tmp_path_factory):
    """All five families: the reference-style step and ours eager (on CPU 'auto' is the torch backend,
    so eager_fused would repeat eager; the compiled fixture runs the fused FSDP variant)."""
    out = tmp_path_factory.mktemp("train_step")
    path = bench_train_step.main(TOY + ["--variants", "reference,eager", "--out-dir", str(out)])
    return path, json.loads(path.read_text())


@pytest.fixture(scope="session")
def train_results_compiled(tmp_path_factory):
    """DiT: reference_bf16, per-block compiled (aot_eager: no C++ build on CPU), with the opt-in MLP op, and
    FSDP2 on one rank."""
    out = tmp_path_factory.mktemp("train_step_compiled")
    path = bench_train_step.main(TOY + ["--families", "dit", "--variants",
                                        "reference_bf16,compiled,compiled_fused_mlp,compiled_fused_fsdp",
                                        "--compile-backend", "aot_eager", "--out-dir", str(out)])
    return path, json.loads(path.read_text())


@pytest.fixture(scope="session")
def sampling_results(tmp_path_factory):
    """Every sampler eager (+ cudagraphs, skipped on CPU); DiT's DDPM also compiled."""
    out = tmp_path_factory.mktemp("sampling")
    base = ["--size", "toy", "--device", "cpu", "--out-dir", str(out), "--compile-backend", "aot_eager"]
    bench_sampling.main(base + ["--variants", "eager,cudagraphs"])
    path = bench_sampling.main(base + ["--samplers", "dit_ddpm250_cfg", "--variants", "compiled"])  # merges
    return path, json.loads(path.read_text())
