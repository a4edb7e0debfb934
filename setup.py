"""Build script for dropflat's compiled extension ``dropflat._C``.

Project metadata lives in pyproject.toml; this file only teaches setuptools'
``build_ext`` to run CMake (CMakeLists.txt), which covers ``pip install .``,
``pip install -e .``, ``python setup.py build_ext --inplace`` and wheels built
from the sdist alike.

Environment knobs:

* ``DROPFLAT_CUDA=AUTO|ON|OFF`` (default AUTO): AUTO compiles the CUDA kernels
  when nvcc is found, ON fails the build without nvcc, OFF never compiles them.
  nvcc is looked up as $CUDACXX, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc,
  PATH, then /usr/local/cuda/bin/nvcc.
* ``DROPFLAT_CUDA_ARCHS``: CMake CUDA_ARCHITECTURES syntax, e.g. ``"90"``,
  ``"80-real;90-real;90-virtual"`` or ``"native"``.  Default: machine code for
  those of DEFAULT_CUDA_ARCHS that nvcc supports, plus PTX of the newest so
  later GPUs can JIT it.
* ``CMAKE_GENERATOR``, ``CMAKE_BUILD_PARALLEL_LEVEL`` and ``CMAKE_ARGS`` (extra
  ``-D`` options) are honoured; otherwise Ninja is used when available and all
  cores build in parallel.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Machine code targets: Turing (the oldest nvcc 13 accepts), A100, Ampere
# consumer, Ada, H100/H200, B200, RTX 50xx.  A cubin also runs on later minor
# revisions of its major (sm_80 code runs on sm_87, sm_100 on sm_103), and a
# PTX copy covers majors beyond the newest.
DEFAULT_CUDA_ARCHS = (75, 80, 86, 89, 90, 100, 120)


def find_nvcc():
    candidates = [os.environ.get("CUDACXX")]
    candidates += [
        os.path.join(os.environ[var], "bin", "nvcc")
        for var in ("CUDA_HOME", "CUDA_PATH")
        if os.environ.get(var)
    ]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def cuda_mode():
    mode = os.environ.get("DROPFLAT_CUDA", "AUTO").upper()
    if mode not in ("AUTO", "ON", "OFF"):
        raise RuntimeError(f"DROPFLAT_CUDA must be AUTO, ON or OFF, not {mode!r}")
    return mode


def default_cuda_archs(nvcc):
    """DEFAULT_CUDA_ARCHS filtered to what this nvcc can target."""
    try:
        listed = subprocess.run(
            [nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        # nvcc older than 11.x lacks --list-gpu-arch: keep nvcc's own default.
        print("dropflat: cannot list nvcc's GPU archs; using nvcc's default")
        return None
    supported = {int(a) for a in re.findall(r"compute_(\d+)", listed)}
    archs = [a for a in DEFAULT_CUDA_ARCHS if a in supported]
    if not archs:
        return None
    return ";".join([f"{a}-real" for a in archs] + [f"{archs[-1]}-virtual"])


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir="."):
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("dropflat needs CMake >= 3.18 to build (pip install cmake)")
        # setuptools copies the result from here for --inplace / editable installs.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        pybind11_dir = subprocess.run(
            [sys.executable, "-m", "pybind11", "--cmakedir"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_path.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
        ]
        if "CMAKE_GENERATOR" not in os.environ and shutil.which("ninja"):
            args.append("-GNinja")
        args += self.cuda_args()
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or self.parallel or os.cpu_count()
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)

    @staticmethod
    def cuda_args():
        mode = cuda_mode()
        nvcc = find_nvcc() if mode != "OFF" else None
        if mode == "ON" and nvcc is None:
            raise RuntimeError(
                "DROPFLAT_CUDA=ON but nvcc was not found (set CUDACXX or CUDA_HOME)"
            )
        if nvcc is None:
            print("dropflat: building without CUDA")
            return ["-DDROPFLAT_WITH_CUDA=OFF"]
        archs = os.environ.get("DROPFLAT_CUDA_ARCHS") or default_cuda_archs(nvcc)
        print(f"dropflat: building CUDA kernels with {nvcc} for archs {archs or 'nvcc default'}")
        args = ["-DDROPFLAT_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
        if archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        return args


setup(
    ext_modules=[CMakeExtension("dropflat._C")],
    cmdclass={"build_ext": CMakeBuild},
)
