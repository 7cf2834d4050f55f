"""The compiled extension's op schemas (csrc/bindings/*.cpp) match the Python ops that call them.

No GPU needed: the ``m.def`` strings are parsed from the C++ sources with torch's own schema
parser and compared with the ``masked_dit::*`` custom ops (names, argument order and types,
mutability, returns), so a binding that drifts from its Python front fails here, not on a GPU.
Also checks the cuda backend's Python wrappers route unsupported inputs (fp64 modulation,
D > kMaxD) away from the extension, against a CPU stand-in that enforces the bindings' checks.
"""
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from masked_dit.ops import adaln as adaln_mod
from masked_dit.ops import tokens  # noqa: F401  (registers the masked_dit::* token ops)

ROOT = Path(__file__).resolve().parents[2]
BINDINGS = ROOT / "csrc" / "bindings"
PY_FRONTS = [ROOT / "masked_dit" / "ops" / "tokens.py", ROOT / "masked_dit" / "ops" / "adaln.py",
             ROOT / "masked_dit" / "ops" / "mlp.py"]
# Extension ops with no Python op of their own: the cuBLASLt GEMMs that ops.mlp_gelu composes (mlp.py
# calls them as ``_lt_ops().<name>(...)``).
BUILDING_BLOCKS = ("linear_gelu_aux", "dgelu_bgrad")
_CALL = r"(?:torch\.ops\.masked_dit_C|_lt_ops\(\))\.(\w+)"


def _cpp_defs() -> dict[str, torch._C.FunctionSchema]:
    """op name -> parsed schema of every ``m.def("...")`` in the bindings (adjacent literals joined)."""
    defs = {}
    for path in sorted(BINDINGS.glob("*.cpp")):
        text = path.read_text()
        for call in re.findall(r'm\.def\(((?:\s*"[^"]*"\s*)+)\)', text):
            schema = "".join(re.findall(r'"([^"]*)"', call))
            parsed = torch._C.parse_schema("masked_dit_C::" + schema)
            assert parsed.name.split("::")[1] not in defs, f"{parsed.name} defined twice"
            defs[parsed.name.split("::")[1]] = parsed
    return defs


def _cpp_impls() -> set[str]:
    names = set()
    for path in sorted(BINDINGS.glob("*.cpp")):
        text = path.read_text()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(masked_dit_C,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", text, re.S):
            names.update(re.findall(r'm\.impl\("(\w+)"', block))
    return names


def _signature(schema: torch._C.FunctionSchema):
    args = [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments]
    return args, [str(r.type) for r in schema.returns]


def test_bindings_define_and_implement_the_same_ops():
    defs = _cpp_defs()
    assert len(defs) == 14, sorted(defs)
    assert _cpp_impls() == set(defs)


def test_every_extension_op_the_python_fronts_call_is_defined():
    called = set()
    for path in PY_FRONTS:
        called.update(re.findall(_CALL, path.read_text()))
    # tokens.py registers its cuda backend from a tuple of op names: each must be bound
    loop = re.search(r"for _name in \((.*?)\):", PY_FRONTS[0].read_text(), re.S)
    called.update(re.findall(r'"(\w+)"', loop.group(1)))
    assert len(called) == 14, sorted(called)
    assert called <= set(_cpp_defs()), called - set(_cpp_defs())


# Trailing optional arguments of a Python op that its cuda wrapper handles itself (the kernels store h
# in the activation dtype; another out_dtype goes to the Triton kernel or a cast; dshift in a shift dtype
# wider than the modulation's: fp32 modulation and a cast): not in the binding.
PYTHON_ONLY_ARGS = {"adaln_modulate": ("out_dtype",), "gated_residual_adaln": ("out_dtype",),
                    "adaln_modulate_backward": ("shift_dtype",), "gated_residual_adaln_backward": ("shift_dtype",)}


@pytest.mark.parametrize("name", sorted(set(_cpp_defs()) - set(BUILDING_BLOCKS)))
def test_binding_schema_matches_python_op(name):
    """Same argument names, order, types (SymInt == int), no mutation, same returns."""
    cpp = _cpp_defs()[name]
    py = getattr(torch.ops.masked_dit, name).default._schema
    (py_args, py_returns), extra = _signature(py), PYTHON_ONLY_ARGS.get(name, ())
    if extra:
        tail = py.arguments[-len(extra):]
        assert [a.name for a in tail] == list(extra) and all(a.default_value is None for a in tail), py
        py_args = py_args[:-len(extra)]
    assert _signature(cpp) == (py_args, py_returns), f"\nC++:    {cpp}\nPython: {py}"
    assert not any(w for _, _, w in _signature(cpp)[0]), f"{name} must not mutate its inputs"


@pytest.mark.parametrize("name", BUILDING_BLOCKS)
def test_building_block_calls_match_their_schemas(name):
    """mlp.py passes the arguments the binding declares, in its order (tensors only, nothing mutated)."""
    cpp = _cpp_defs()[name]
    (call,) = re.findall(rf"_lt_ops\(\)\.{name}\((.*)\)\s*$", (ROOT / "masked_dit" / "ops" / "mlp.py").read_text(), re.M)
    # the last argument is the heuristic candidate, read by lt_algo()
    assert [a.strip() for a in call.split(",")] == [a.name for a in cpp.arguments[:-1]] + ["lt_algo()"], cpp
    assert [str(a.type) for a in cpp.arguments] == ["Tensor"] * 3 + ["int"], cpp
    assert all(a.alias_info is None for a in cpp.arguments), cpp
    assert [str(r.type) for r in cpp.returns] == ["Tensor", "Tensor"], cpp


def test_built_extension_registers_the_parsed_ops_with_cuda_kernels():
    """Where ``masked_dit._C`` is built (it loads without a GPU: checked with torch 2.11+cu130), the
    dispatcher holds exactly the parsed schemas, each with a CUDA kernel."""
    from masked_dit import _ext

    if not _ext.loaded():
        pytest.skip("masked_dit._C is not built here (setup.py build_ext needs a CUDA build of torch)")
    defs = _cpp_defs()
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("masked_dit_C::")}
    assert registered == set(defs)
    for name, cpp in defs.items():
        live = getattr(torch.ops.masked_dit_C, name).default._schema
        assert _signature(live) == _signature(cpp), f"\nbuilt:  {live}\nsource: {cpp}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"masked_dit_C::{name}", "CUDA"), name


def test_cpu_stand_in_schemas_match_bindings():
    """test_adaln's CPU stand-in registers the extension's schemas by hand: keep them in sync."""
    from tests.ops.test_adaln import _EXT_SCHEMAS

    defs = _cpp_defs()
    for name, schema in _EXT_SCHEMAS.items():
        assert _signature(torch._C.parse_schema("masked_dit_C::" + name + schema)) == _signature(defs[name]), name


# -----------------------------------------------------------------------------
# the adaLN cuda wrappers keep inputs the kernels do not take away from the extension
# -----------------------------------------------------------------------------


@pytest.fixture
def strict_extension_stand_in():
    """CPU impls of the four adaLN extension ops with the bindings' dtype/width checks; they count calls."""
    from masked_dit import _ext

    if _ext.loaded():
        pytest.skip("the real extension is loaded; the GPU tests cover it")
    calls = []
    lib = torch.library.Library("masked_dit_C", "FRAGMENT")
    defs = _cpp_defs()
    names = ("adaln_modulate", "adaln_modulate_backward", "gated_residual_adaln", "gated_residual_adaln_backward")
    refs = (adaln_mod._adaln_modulate_torch, adaln_mod._adaln_modulate_backward_torch,
            adaln_mod._gated_residual_adaln_torch, adaln_mod._gated_residual_adaln_backward_torch)
    for name, ref in zip(names, refs):
        lib.define(str(defs[name]).split("::", 1)[1])

        def impl(*args, _ref=ref, _name=name):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            assert all(t.dtype != torch.float64 for t in tensors), f"{_name}: fp64 reached the extension"
            assert tensors[0].shape[-1] <= 16384, f"{_name}: D > kMaxD reached the extension"
            calls.append(_name)
            return _ref(*args)

        lib.impl(name, impl, "CPU")
    yield calls
    lib._destroy()


def test_cuda_wrappers_cast_fp64_modulation(strict_extension_stand_in):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, generator=gen)
    shift, scale = torch.randn(2, 16, generator=gen, dtype=torch.float64), torch.randn(2, 16, generator=gen, dtype=torch.float64)
    h, mean, rstd = adaln_mod._adaln_modulate_cuda(x, shift, scale, 1e-6)
    torch.testing.assert_close(h, adaln_mod._adaln_modulate_torch(x, shift, scale, 1e-6)[0])
    dh = torch.randn(2, 3, 16, generator=gen)
    dx, dshift, dscale = adaln_mod._adaln_modulate_backward_cuda(dh, x, scale, mean, rstd)
    ref = adaln_mod._adaln_modulate_backward_torch(dh, x, scale, mean, rstd)
    assert (dshift.dtype, dscale.dtype) == (torch.float64, torch.float64)
    torch.testing.assert_close((dx, dshift, dscale), ref)
    assert strict_extension_stand_in == ["adaln_modulate", "adaln_modulate_backward"]


def test_cuda_wrappers_route_wide_rows_to_reference(strict_extension_stand_in):
    x = torch.randn(1, 2, 16385)
    mod = torch.randn(1, 16385)
    r, h, mean, rstd = adaln_mod._gated_residual_adaln_cuda(x, x, mod, mod, mod, 1e-6)
    adaln_mod._gated_residual_adaln_backward_cuda(x, x, r, x, mod, mod, mean, rstd)
    h, mean, rstd = adaln_mod._adaln_modulate_cuda(x, mod, mod, 1e-6)
    adaln_mod._adaln_modulate_backward_cuda(x, x, mod, mean, rstd)
    assert strict_extension_stand_in == []


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs the Triton interpreter")
def test_cuda_backward_wrappers_route_lossy_gradients_to_triton(strict_extension_stand_in):
    """bf16 activations with fp32 gradients (h or r stored in fp32): the kernels would read the
    gradients rounded to bf16, so the Triton kernel (any gradient dtype) runs instead; an fp32
    activation takes any gradient exactly, so it stays on the extension."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, generator=gen).bfloat16()
    mod = torch.randn(2, 16, generator=gen).bfloat16()
    _, mean, rstd = adaln_mod._adaln_modulate_torch(x, mod, mod, 1e-6)
    dh = torch.randn(2, 3, 16, generator=gen)
    got = adaln_mod._adaln_modulate_backward_cuda(dh, x, mod, mean, rstd)
    torch.testing.assert_close(got, adaln_mod._adaln_modulate_backward_triton(dh, x, mod, mean, rstd), rtol=0, atol=0)
    got = adaln_mod._gated_residual_adaln_backward_cuda(dh, dh.bfloat16(), x, x, mod, mod, mean, rstd)
    want = adaln_mod._gated_residual_adaln_backward_triton(dh, dh.bfloat16(), x, x, mod, mod, mean, rstd)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert strict_extension_stand_in == []
    adaln_mod._adaln_modulate_backward_cuda(dh.bfloat16(), x.float(), mod, mean, rstd)
    assert strict_extension_stand_in == ["adaln_modulate_backward"]


# -----------------------------------------------------------------------------
# the extension counts as loaded only on GPUs its build covers
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0,9.0+PTX", (8, 0), True),
    ("8.0,9.0+PTX", (8, 9), True),     # sm_80 machine code runs on later 8.x
    ("8.0,9.0+PTX", (9, 0), True),
    ("8.0,9.0+PTX", (12, 0), True),    # PTX: the driver compiles it for newer GPUs
    ("8.0,9.0+PTX", (7, 5), False),
    ("8.0;9.0", (10, 0), False),       # no PTX: nothing for Blackwell
    ("9.0a", (9, 0), True),
    ("9.0a", (10, 0), False),          # arch-specific code runs on exactly that GPU
    ("7.0 7.5", (7, 5), True),
    ("Ampere;Hopper", (7, 0), True),   # named arches: cannot tell, assume it runs
    ("", (7, 0), True),
])
def test_arch_runs_on(archs, capability, runs):
    from masked_dit import _ext

    assert _ext.arch_runs_on(archs, capability) is runs


def test_unsupported_gpu_names_the_device(monkeypatch):
    from masked_dit import _ext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (7, 5)][i])
    assert _ext._unsupported_gpu("8.0,9.0+PTX") == (
        "built for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX, which does not cover cuda:1 (sm_75); "
        "rebuild with that arch in TORCH_CUDA_ARCH_LIST")
    assert _ext._unsupported_gpu("7.5,8.0,9.0+PTX") == ""
    assert _ext._unsupported_gpu("") == ""  # built without setup.py: unknown


# -----------------------------------------------------------------------------
# the adaLN kernels' launch configuration covers every feature width the binding accepts
# -----------------------------------------------------------------------------

# threads_for in csrc/kernels/adaln.cu, mirrored below (the test fails if the C++ changes)
_THREADS_FOR = ("return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, "
                "(per_row + 31) / 32 * 32)));")


def test_adaln_items_and_threads_cover_every_width():
    """with_items / threads_for (parsed from adaln.cu): for every D in [1, kMaxD] a block of whole
    warps (block_sum shuffles with a full mask), at most kMaxThreads (the __launch_bounds__ and the
    kWarps shared-memory slots), holding the whole row (threads * ITEMS >= D); and the Python
    wrappers' _CUDA_MAX_D is the kernels' kMaxD."""
    src = (ROOT / "csrc" / "kernels" / "adaln.cu").read_text()
    header = (ROOT / "csrc" / "kernels" / "adaln.h").read_text()
    max_threads = int(re.search(r"constexpr int kMaxThreads = (\d+);", src).group(1))
    max_d = int(re.search(r"constexpr int64_t kMaxD = (\d+);", header).group(1))
    assert adaln_mod._CUDA_MAX_D == max_d
    with_items = re.search(r"cudaError_t with_items\(.*?\n\}", src, re.S).group(0)
    bounded = [(int(m), int(i)) for m, i in re.findall(
        r"if \(D <= (\d+) \* kMaxThreads\) return launch\(std::integral_constant<int, (\d+)>\{\}\);", with_items)]
    fallback = re.findall(r"\n  return launch\(std::integral_constant<int, (\d+)>\{\}\);", with_items)
    assert bounded and len(fallback) == 1, with_items
    threads_for = re.search(r"inline int threads_for\(.*?\n\}", src, re.S).group(0)
    assert _THREADS_FOR in " ".join(threads_for.split()), threads_for

    def launch(D):
        items = next((i for m, i in bounded if D <= m * max_threads), int(fallback[0]))
        per_row = -(-D // items)
        return items, min(max_threads, max(32, -(-per_row // 32) * 32))

    for D in range(1, max_d + 1):
        items, threads = launch(D)
        assert threads % 32 == 0 and 32 <= threads <= max_threads, (D, items, threads)
        assert threads * items >= D, (D, items, threads)
    assert launch(1152) == (4, 288)  # DiT-XL: 9 warps, 4 values per thread
