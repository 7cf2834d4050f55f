"""Where the cuBLAS(Lt) headers and library are, for building csrc/kernels/mlp_gemm.cu.

A CUDA toolkit has them in its include/ and lib64/; a pip CUDA install (torch's nvidia-* packages,
the device image) has them under site-packages/nvidia/<cu13|cu12|cublas>/. Those package folders
also hold CUDA runtime headers of another minor version than nvcc's, so the build never puts them
on the include path: it gets a folder with links to the cuBLAS headers alone.

    python tools/cublas_headers.py [--cuda-home DIR] [--download [--nvcc NVCC]]   # the folder to add ('' if none)

``--download`` (CI, which has nvcc but no cuBLAS): when nothing is installed, fetch the
nvidia-cublas wheel of nvcc's CUDA major version with pip and keep only its headers, in a cache.
setup.py imports this file by path (it is not part of the installed package).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import zipfile

HEADER = "cublasLt.h"
_PACKAGE_DIRS = ("cu13", "cu12", "cublas")  # site-packages/nvidia/<dir>/{include,lib}


def _package_roots() -> list[str]:
    roots = []
    for entry in sys.path:
        for sub in _PACKAGE_DIRS:
            root = os.path.join(entry, "nvidia", sub)
            if os.path.isfile(os.path.join(root, "include", HEADER)) and root not in roots:
                roots.append(root)
    return roots


def _link_headers(include: str, out: str) -> str:
    """``out`` with a link to each cuBLAS header of ``include`` (and nothing else: links an earlier build
    left there go first)."""
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "*.h")):
        os.remove(old)
    for src in glob.glob(os.path.join(include, "cublas*.h")):
        dst = os.path.join(out, os.path.basename(src))
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(src, dst)
    return out


def nvcc_cuda_major(nvcc: str = "nvcc") -> int | None:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.", text)
    return int(m.group(1)) if m else None


def _download_headers(major: int, cache: str) -> str:
    """The cuBLAS headers of the nvidia-cublas wheel for CUDA ``major``, extracted into ``cache`` (a folder
    of its own per run, renamed into place: concurrent runs sharing the cache each finish or find it done)."""
    out = os.path.join(cache, f"cublas-cu{major}-include")
    if os.path.isfile(os.path.join(out, HEADER)):
        return out
    package = "nvidia-cublas" if major >= 13 else f"nvidia-cublas-cu{major}"
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
               f"{package}=={major}.*"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise SystemExit(f"cublas_headers: `pip download {package}=={major}.*` failed: {last}")
        part = os.path.join(tmp, "include")
        os.makedirs(part)
        with zipfile.ZipFile(wheels[0]) as whl:
            for name in whl.namelist():
                if re.fullmatch(r"nvidia/[^/]+/include/cublas[^/]*\.h", name):
                    with open(os.path.join(part, os.path.basename(name)), "wb") as f:
                        f.write(whl.read(name))
        if not os.path.isfile(os.path.join(part, HEADER)):
            raise SystemExit(f"cublas_headers: the {package} wheel has no {HEADER}")
        try:
            os.rename(part, out)
        except OSError:  # another run put it there first
            if not os.path.isfile(os.path.join(out, HEADER)):
                raise
    return out


def include_dir(cuda_home: str | None, build_dir: str, download: bool = False, cache: str | None = None,
                nvcc: str = "nvcc") -> str:
    """'' when the toolkit at ``cuda_home`` has the headers, else a folder holding only them.
    Raises SystemExit with one line when they are nowhere to be found."""
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "include", HEADER)):
        return ""
    roots = _package_roots()
    if roots:
        return _link_headers(os.path.join(roots[0], "include"), os.path.join(build_dir, "cublas_include"))
    if download:
        major = nvcc_cuda_major(nvcc)
        if major is None:
            raise SystemExit(f"cublas_headers: no {nvcc} to read the CUDA version from")
        return _download_headers(major, cache or os.path.join(os.path.expanduser("~"), ".cache", "masked-dit"))
    raise SystemExit(f"masked-dit: {HEADER} not found in {cuda_home or 'CUDA_HOME (unset)'}/include nor in a pip "
                     "nvidia-cublas package; install one (pip install nvidia-cublas) or set MASKED_DIT_BUILD_EXT=0")


def link_args(cuda_home: str | None) -> tuple[list[str], list[str]]:
    """(libraries, extra_link_args) that link libcublasLt: the toolkit's, else the pip package's by its
    versioned name (it ships no unversioned .so); none found: nothing (torch's libraries load it)."""
    if cuda_home:
        for lib in ("lib64", "lib"):
            if glob.glob(os.path.join(cuda_home, lib, "libcublasLt.so")):
                return ["cublasLt"], []
    for root in _package_roots():
        found = sorted(glob.glob(os.path.join(root, "lib", "libcublasLt.so.*")), key=len)
        if found:
            return [], [f"-L{os.path.dirname(found[0])}", f"-l:{os.path.basename(found[0])}"]
    return [], []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME"))
    parser.add_argument("--build-dir", default=None, help="where the header links go (default: a temp folder)")
    parser.add_argument("--download", action="store_true", help="fetch the headers when none are installed")
    parser.add_argument("--nvcc", default="nvcc", help="the nvcc whose CUDA version the fetched headers match")
    args = parser.parse_args(argv)
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="masked-dit-cublas-")
    print(include_dir(args.cuda_home, build_dir, download=args.download, nvcc=args.nvcc))


if __name__ == "__main__":
    main()
