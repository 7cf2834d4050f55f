"""Build script: pure-Python install by default, plus the CUDA extension ``masked_dit._C``
when CUDA is usable.

Switches (environment variables):
  MASKED_DIT_BUILD_EXT=0   never build the extension (pure-Python install; ops fall back)
  FORCE_CUDA=1             build the extension even without a visible GPU (needs nvcc)
  TORCH_CUDA_ARCH_LIST     GPU architectures, default "8.0;9.0+PTX" (A100, H100/H200; PTX lets
                           newer GPUs JIT the kernels instead of failing with "no kernel image")
  MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension)
Install with ``pip install --no-build-isolation -e .`` so the build sees your torch.
"""
import glob
import os
import re
import shutil

from setuptools import setup


def _cuda_home_from_nvcc() -> None:
    """torch takes CUDA_HOME as two levels above the first ``nvcc`` on PATH: ``/usr/local`` for a
    ``/usr/local/bin/nvcc`` link or wrapper script, where there are no CUDA headers. Set it, before
    torch's cpp_extension reads it (once, at import), to the first candidate that has the headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in [*candidates, "/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _want_extension() -> bool:
    if os.environ.get("MASKED_DIT_BUILD_EXT", "1") == "0":
        return False
    _cuda_home_from_nvcc()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        print("masked-dit: torch not importable at build time; pure-Python install")
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if CUDA_HOME is None or not torch.cuda.is_available():
        print("masked-dit: no usable CUDA; pure-Python install (FORCE_CUDA=1 to build anyway)")
        return False
    return True


def _cublas(root: str):
    """Include folders, libraries and link args for cuBLASLt (csrc/kernels/mlp_gemm.cu): the toolkit's,
    else the pip nvidia-cublas package's that torch installs (tools/cublas_headers.py)."""
    import importlib.util

    from torch.utils.cpp_extension import CUDA_HOME

    spec = importlib.util.spec_from_file_location("cublas_headers", os.path.join(root, "tools", "cublas_headers.py"))
    finder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finder)
    include = finder.include_dir(CUDA_HOME, os.path.join(root, "build"))
    libraries, link_args = finder.link_args(CUDA_HOME)
    return [include] if include else [], libraries, link_args


def _extensions():
    if not _want_extension():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # recorded in the module (_C.cuda_archs) so masked_dit._ext can skip GPUs the build misses;
    # ',' for ';' keeps the define shell-safe
    archs = re.sub(r"[;\s]+", ",", os.environ["TORCH_CUDA_ARCH_LIST"].strip())
    arch_define = [f"-DMASKED_DIT_CUDA_ARCHS={archs}"] if re.fullmatch(r"[\w.+,]+", archs) else []
    root = os.path.dirname(os.path.abspath(__file__))
    includes, libraries, link_args = _cublas(root)
    sources = sorted(glob.glob(os.path.join("csrc", "bindings", "*.cpp")) + glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    ext = CUDAExtension(
        name="masked_dit._C",
        sources=sources,
        include_dirs=[os.path.join(root, "csrc"), *includes],
        libraries=libraries,
        extra_link_args=link_args,
        extra_compile_args={"cxx": ["-O3", *arch_define], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},  # -std from torch
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
