"""tools/cublas_headers.py: where setup.py and tools/check_csrc.sh find cuBLASLt for csrc/kernels/mlp_gemm.cu."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("cublas_headers", Path(__file__).resolve().parents[1] / "tools" / "cublas_headers.py")
cublas_headers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cublas_headers)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def test_toolkit_headers_need_no_extra_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [])
    _touch(tmp_path / "cuda" / "include" / "cublasLt.h")
    _touch(tmp_path / "cuda" / "lib64" / "libcublasLt.so")
    assert cublas_headers.include_dir(str(tmp_path / "cuda"), str(tmp_path / "build")) == ""
    assert cublas_headers.link_args(str(tmp_path / "cuda")) == (["cublasLt"], [])


def test_pip_package_gives_a_folder_of_the_cublas_headers_alone(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    for name in ("cublasLt.h", "cublas_api.h", "cuda_runtime.h"):  # the package's runtime headers stay out
        _touch(site / "nvidia" / "cu13" / "include" / name)
    lib = _touch(site / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13")
    _touch(site / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13.1.0")
    monkeypatch.setattr(sys, "path", [str(site)])
    build = tmp_path / "build"
    _touch(build / "cublas_include" / "stale.h")  # what an earlier environment left
    folder = cublas_headers.include_dir(str(tmp_path / "no-toolkit"), str(build))
    assert sorted(os.listdir(folder)) == ["cublasLt.h", "cublas_api.h"]
    assert cublas_headers.link_args(None) == ([], [f"-L{lib.parent}", "-l:libcublasLt.so.13"])


def test_nothing_found_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(SystemExit, match=r"cublasLt\.h not found in .* nor in a pip nvidia-cublas package; install one"):
        cublas_headers.include_dir(str(tmp_path), str(tmp_path / "build"))
    assert cublas_headers.link_args(str(tmp_path)) == ([], [])
