"""What `pip install masked-dit` gets: the sdist carries everything setup.py builds from (csrc/ and the
cuBLASLt finder, or a GPU machine installing from it cannot build masked_dit._C), and the wheel built
from that sdist carries every module and the shipped classifier, and runs outside the checkout."""
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MASKED_DIT_BUILD_EXT": "0", "PIP_NO_INDEX": "1", "PYTHONWARNINGS": "ignore"}


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _source_files(folder: str, suffixes: tuple[str, ...]) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
            if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    # egg-info goes to the temporary folder too, so the checkout is left as it was
    _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out), "sdist", "-d", str(out)], ROOT)
    (archive,) = out.glob("masked[-_]dit-*.tar.gz")  # setuptools < 69.3: masked-dit-
    with tarfile.open(archive) as tar:
        # the "data" filter where this Python has it (3.10.12+); the archive is our own either way
        tar.extractall(out / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (tree,) = (out / "unpacked").iterdir()
    return tree


def test_sdist_carries_what_setup_py_builds_the_extension_from(sdist):
    shipped = {p.relative_to(sdist).as_posix() for p in sdist.rglob("*") if p.is_file()}
    needed = _source_files("csrc", (".cu", ".cpp", ".h", ".cuh")) | {"tools/cublas_headers.py", "setup.py",
                                                                       "pyproject.toml", "CMakeLists.txt"}
    assert needed - shipped == set()
    assert not [p for p in shipped if p.endswith((".so", ".o", ".pyc"))]  # no build outputs of this machine


def test_wheel_from_the_sdist_has_every_module_and_runs_outside_the_checkout(sdist, tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(sdist)],
         tmp_path)
    (wheel,) = tmp_path.glob("masked_dit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    modules = _source_files("masked_dit", (".py",)) | {"masked_dit/assets/digits_classifier_v2.pt"}
    assert modules - names == set()
    code = ("import masked_dit, masked_dit.eval.digits as d; "
            "assert masked_dit.__file__.startswith(%r), masked_dit.__file__; "
            "assert d.ASSET.is_file(); d.load_classifier()" % str(tmp_path / "site"))
    run_env = {**ENV, "PYTHONPATH": str(tmp_path / "site"), "MASKED_DIT_CACHE": str(tmp_path / "cache")}
    for args in ([sys.executable, "-c", code], [sys.executable, "-m", "masked_dit", "--help"]):
        done = subprocess.run(args, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # the shipped classifier was used, not retrained
