"""What the Triton kernels compile to for sm_90 (no GPU needed: ahead-of-time compile to PTX).

* Contiguous bf16 rows move as vectors (16 bytes, ``ld.global.v4.b32``; 8 in the adaLN backward,
  which holds 4 values per thread) when the launcher's
  specialisation applies (unit D stride, pointers and other strides divisible by 16), after
  the int64 index changes: a silent fall back to 2-byte accesses would cost bandwidth on H100.
* The Adan step moves fp32 state in 16-byte vectors and divides / takes square roots IEEE-rounded
  (``div.rn``, ``sqrt.rn``: the foreach reference's arithmetic, not Triton's approximate default).
* No kernel spills for register pressure (cubin stack frame <= 8 bytes, no local memory) at the widths
  of the zoo (adaLN rows to 4096, BLOCK_D 1024 / 2048 / 4096), nor the token and Adan kernels.
* The kernels compile with 64-bit strides and sizes (how Triton passes values >= 2^31, i.e.
  tensors with more than 2^31 elements) and for B > 65535 (the adaLN backward grid is 1-D).
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

_SCRIPT = r'''
import os
import re
import subprocess
import tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from masked_dit.ops.triton_kernels import adaln as ka, adan as kd, tokens as kt

def compile_ptx(fn, types, constexprs, int_type="i32", divisible=True, num_warps=4):
    """types: arg name -> '*dtype' for pointers, 'fp32' for floats; other non-constexpr args are ints."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, int_type)
        if divisible and sig[name] != "fp32":
            attrs[(i,)] = [["tt.divisibility", 16]]
    ce = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubins.append(out.asm["cubin"])
    return out.asm["ptx"]

cubins = []
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def no_spill(what):
    """The last compiled kernel's registers from its cubin (triton's bundled cuobjdump). Register pressure
    shows as a stack frame of hundreds of bytes (the backward at BLOCK_D 8192: 136 B, 16384: 448 B). At
    most 8 bytes are allowed: ptxas 13 under triton's options saves one 64-bit value outside the row
    loop of the adaLN backward at BLOCK_D 512 / 1024 while using 40 of its registers."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubins[-1])
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    reg, stack, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", dump).groups())
    assert stack <= 8 and local == 0, (what, "spills", dict(registers=reg, stack=stack, local=local))
    print(what, reg, "registers")

def accesses(ptx):
    return sorted(set(re.findall(r"(?:ld|st)\.global[\.\w]*", ptx)))

unit = {}
acts = {"adaln_fwd": (ka._adaln_fwd_kernel, "X SHIFT SCALE H", "MEAN RSTD"),
        "adaln_bwd": (ka._adaln_bwd_kernel, "DH X SCALE DX", "MEAN RSTD DSHIFT_P DSCALE_P"),
        "gated_fwd": (ka._gated_fwd_kernel, "X BR GATE SHIFT SCALE R H", "MEAN RSTD"),
        "gated_bwd": (ka._gated_bwd_kernel, "DR DH R BR GATE SCALE DX DBR", "MEAN RSTD DGATE_P DSHIFT_P DSCALE_P")}
for key, (fn, act, stats) in acts.items():
    types = {n: "*bf16" for n in act.split()}
    types.update({n: "*fp32" for n in stats.split()})
    types["eps"] = "fp32"
    ce = {"BLOCK_D": 2048, "ACC_F64": False}
    ce.update({n: 1 for n in fn.arg_names if n.startswith("s") and n.endswith("_d")})
    warps = ka._num_warps(2048, 8 if "fwd" in key else 4)
    for block_d in (1024, 4096):  # widths to 4096 (the zoo's: DiT-XL/2 is 1152) keep every value in registers
        compile_ptx(fn, types, {**ce, "BLOCK_D": block_d}, num_warps=ka._num_warps(block_d, 8 if "fwd" in key else 4))
        no_spill(f"{key} BLOCK_D={block_d}")
    ptx = compile_ptx(fn, types, ce, num_warps=warps)
    no_spill(f"{key} BLOCK_D=2048")
    # forward: 8 bf16 per thread -> 16-byte loads; backward: 4 per thread (register budget) -> 8-byte
    assert ("ld.global.v4.b32" if "fwd" in key else "ld.global.v2.b32") in ptx, (key, accesses(ptx))
    assert "ld.global.b16" not in ptx, (key, accesses(ptx))
    # large tensors: every size and stride 64-bit, B > 65535 programs
    compile_ptx(fn, types, {"BLOCK_D": 2048, "ACC_F64": False}, int_type="i64", divisible=False, num_warps=warps)
    print(key, "ok")

tok = {"_gather_rows_kernel": (dict(x_ptr="*bf16", ids_ptr="*i64", batch_ptr="*i64", out_ptr="*bf16"),
                               dict(VARLEN=False, BLOCK_R=16, BLOCK_D=256, sx_d=1)),
       "_scatter_rows_kernel": (dict(keep_ptr="*bf16", inv_ptr="*i32", fill_ptr="*bf16", out_ptr="*bf16"),
                                dict(VARLEN=False, FILL_ZERO=False, BLOCK_R=16, BLOCK_D=256, sk_d=1, sf_d=1)),
       "_scatter_backward_fill_kernel": (dict(grad_ptr="*bf16", inv_ptr="*i32", gfill_ptr="*fp32"),
                                         dict(FILL_DENSE=False, ROWS_PER_PROG=256, BLOCK_R=16, BLOCK_D=256, sg_d=1))}
for name, (types, ce) in tok.items():
    fn = getattr(kt, name)
    ptx = compile_ptx(fn, types, ce)
    no_spill(name)
    assert "ld.global.v4.b32" in ptx, (name, accesses(ptx))
    ce64 = {k: v for k, v in ce.items() if not k.endswith("_d")}
    compile_ptx(fn, types, ce64, int_type="i64", divisible=False)
    print(name, "ok")

# Adan step (multi-tensor: pointers loaded from a table): fp32 state in 16-byte vectors where the
# launcher declares the addresses aligned, IEEE division / sqrt (as the foreach reference)
fn = kd._adan_kernel
types = dict(ADDR="*i64", NUMEL="*i64", CHUNK_TENSOR="*i32", CHUNK_START="*i64")
types.update({n: "fp32" for n in fn.arg_names[fn.arg_names.index("lr"):fn.arg_names.index("wd_div") + 1]})
for no_prox in (False, True):
    ce = {"NO_PROX": no_prox, "ALIGNED": True, "BLOCK": kd.BLOCK}
    ptx = compile_ptx(fn, types, ce, num_warps=kd.NUM_WARPS)
    no_spill(f"adan no_prox={no_prox}")
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, ("adan", accesses(ptx))
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, "adan: approximate division or sqrt"
    assert not re.search(r"(div|sqrt)\.(full|approx)", ptx), "adan: approximate division or sqrt"
    compile_ptx(fn, types, {**ce, "ALIGNED": False}, int_type="i64", divisible=False, num_warps=kd.NUM_WARPS)
    print("adan", no_prox, "ok")
print("compiled")
'''


@pytest.mark.slow
def test_triton_kernels_vectorise_and_compile_with_64bit_sizes():
    from tests.ops.triton_aot import require_aot_api

    require_aot_api()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
