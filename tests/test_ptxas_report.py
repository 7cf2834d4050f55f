"""tools/ptxas_report.py: parses nvcc -Xptxas -v output and fails on spills outside its allow-list."""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("ptxas_report",
                                              Path(__file__).resolve().parents[1] / "tools" / "ptxas_report.py")
ptxas_report = sys.modules["ptxas_report"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(ptxas_report)

# ptxas's own wording (CUDA 13), for two instances of one template, the wide one spilling
LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN10masked_dit5adaln12_GLOBAL__N_116adaln_bwd_kernelIffLi32EEEvPKT_' for 'sm_90'
ptxas info    : Function properties for _ZN10masked_dit5adaln12_GLOBAL__N_116adaln_bwd_kernelIffLi32EEEvPKT_
    560 bytes stack frame, 1192 bytes spill stores, 936 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compiling entry function '_ZN10masked_dit5adaln12_GLOBAL__N_116adaln_bwd_kernelIffLi4EEEvPKT_' for 'sm_90'
ptxas info    : Function properties for _ZN10masked_dit5adaln12_GLOBAL__N_116adaln_bwd_kernelIffLi4EEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem
csrc/kernels/adaln.cu(12): warning #177-D: variable "x" was declared but never referenced
"""


def test_parse_reads_each_instance_and_keeps_other_lines():
    kernels, other = ptxas_report.parse(LOG)
    assert [(k.arch, k.registers, k.stack, k.spill_stores, k.spill_loads) for k in kernels] == [
        ("sm_90", 128, 560, 1192, 936), ("sm_90", 40, 0, 0, 0)]
    assert other == ['csrc/kernels/adaln.cu(12): warning #177-D: variable "x" was declared but never referenced']


def test_spills_fail_outside_the_allow_list(tmp_path, capsys):
    kernels, _ = ptxas_report.parse(LOG)
    ptxas_report.demangle(kernels)
    assert kernels[0].name.endswith("adaln_bwd_kernel<float, float, 32>")  # c++filt, parameters dropped
    assert ptxas_report.check(kernels) == []  # the wide backward is accepted
    kernels[1].spill_stores = 8  # a production-width instance that spills
    (error,) = ptxas_report.check(kernels)
    assert error.startswith("masked_dit::adaln::adaln_bwd_kernel<float, float, 4> (sm_90) spills 8 B stores")
    log = tmp_path / "k.log"
    log.write_text(LOG.replace("    0 bytes stack frame, 0 bytes spill stores", "    8 bytes stack frame, 8 bytes spill stores"))
    assert ptxas_report.main([str(log)]) == 1
    out = capsys.readouterr()
    assert "ptxas: 2 kernel instances, 2 spill (accepted: 1)" in out.out and "error: " in out.err
