"""Registers and spills of every kernel ptxas compiled (nvcc -Xptxas -v output), and a gate on spills.

    python tools/ptxas_report.py nvcc_stderr.log [more.log ...]

A kernel that spills registers to local memory still compiles and still passes every CPU test, yet
runs slower on the GPU; this makes that visible in CI, which has nvcc but no GPU. Spills fail the
check except in the instances listed in ALLOWED_SPILLS, each with the reason it is accepted.
Lines that are not ptxas resource reports (compiler warnings) are printed as they are.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

# (regex on the demangled name, why its spills are accepted). The backward kernels keep ITEMS values
# per thread of several row-sized arrays live across a block reduction; at ITEMS >= 16 (rows wider
# than 4096, beyond every model of the zoo: DiT-XL/2 is 1152 wide, ITEMS 4) those exceed the 128
# registers __launch_bounds__(512) leaves. benchmarks/NOTES.md has the measured-later fix (re-read
# the row after the reduction instead of keeping it).
ALLOWED_SPILLS = [
    (r"\b(adaln|gated)_bwd_kernel<[^>]*, (16|32)>", "backward at D > 4096 (ITEMS 16/32), beyond the zoo's widths"),
]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


@dataclass
class Kernel:
    mangled: str
    arch: str
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    registers: int = 0
    name: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse(text: str) -> tuple[list[Kernel], list[str]]:
    """(kernels in order, the other lines) of ptxas -v output mixed with the compiler's."""
    kernels: list[Kernel] = []
    other = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(Kernel(m.group(1), m.group(2)))
        elif (m := _FRAME.search(line)) and kernels:
            kernels[-1].stack, kernels[-1].spill_stores, kernels[-1].spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and kernels:
            kernels[-1].registers = int(m.group(1))
        elif not line.startswith("ptxas info") and line.strip():
            other.append(line)
    return kernels, other


def demangle(kernels: list[Kernel]) -> None:
    """Readable names (c++filt where installed), with the parameter list dropped."""
    names = [k.mangled for k in kernels]
    if shutil.which("c++filt") and names:
        names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    for k, name in zip(kernels, names):
        name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
        k.name = name.split("(")[0] if "(" in name else name


def check(kernels: list[Kernel]) -> list[str]:
    """One line per kernel that spills outside ALLOWED_SPILLS."""
    return [f"{k.name} ({k.arch}) spills {k.spill_stores} B stores / {k.spill_loads} B loads "
            f"({k.registers} registers): keep fewer values live, or list it in ALLOWED_SPILLS with the reason"
            for k in kernels if k.spills and not any(re.search(rx, k.name) for rx, _ in ALLOWED_SPILLS)]


def main(paths: list[str]) -> int:
    kernels, other = [], []
    for path in paths:
        with open(path) as f:
            ks, lines = parse(f.read())
        kernels += ks
        other += lines
    demangle(kernels)
    for line in other:
        print(line)
    spilling = [k for k in kernels if k.spills]
    most = max(kernels, key=lambda k: k.registers, default=None)
    print(f"ptxas: {len(kernels)} kernel instances, {len(spilling)} spill "
          f"(accepted: {len(spilling) - len(check(kernels))}), most registers: "
          f"{most.registers if most else 0} ({most.name if most else '-'})")
    errors = check(kernels)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
