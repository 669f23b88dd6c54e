"""Build script for colm-kernels.

The pure-Python package always installs. The CUDA extension ``colm_kernels._C`` (csrc/bindings.cpp
plus every csrc/**/*.cu) is built when

- ``COLM_KERNELS_FORCE_CUDA=1``, or
- torch is importable at build time, ``torch.version.cuda`` is set and nvcc is found,

unless ``COLM_KERNELS_SKIP_CUDA=1``. Otherwise one line says why it is skipped and the ``cuda``
backend reports itself unavailable at run time (``colm_kernels._cuda.unavailable_reason()``).

pip's default build isolation hides the installed torch from this script, so the extension is
only built with ``pip install -e . --no-build-isolation`` (or ``pip install . --no-build-isolation``).

Environment:
  COLM_KERNELS_CUDA_ARCHS   ';' / ',' separated, default ``90a`` (H100/H200): each ``XY[a|f]``
                            becomes ``-gencode=arch=compute_XY,code=sm_XY``; ``+PTX`` adds PTX
  CUDA_HOME / CUDA_PATH     CUDA toolkit root (default: from nvcc on PATH, else /usr/local/cuda)
  MAX_JOBS                  parallel compile jobs (torch's BuildExtension, ninja)
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "colm_kernels._C"
DEFAULT_CUDA_ARCHS = "90a"
SKIP_SUFFIX = "skipping the CUDA extension (backend 'cuda' will be unavailable)"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"colm_kernels: {msg}", flush=True)


def _valid_cuda_home(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime_api.h")
    )


def _find_cuda_home() -> str | None:
    """CUDA toolkit root holding bin/nvcc and include/cuda_runtime_api.h, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            return home if _valid_cuda_home(home) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a symlink or a wrapper script (e.g. /usr/local/bin/nvcc)
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if _valid_cuda_home(home):
            return home
    return None


def _gencode_flags(spec: str) -> list[str]:
    flags = []
    for arch in (a for a in re.split(r"[;,\s]+", spec.strip()) if a):
        ptx = arch.upper().endswith("+PTX")
        name = arch[:-4] if ptx else arch
        name = name.replace(".", "").removeprefix("sm_").removeprefix("compute_")
        if not re.fullmatch(r"\d{2,3}[af]?", name):
            raise ValueError(
                f"COLM_KERNELS_CUDA_ARCHS: cannot read architecture {arch!r} in {spec!r} "
                "(expected e.g. '90a', '80;90a', '9.0', '100a+PTX')"
            )
        flags.append(f"-gencode=arch=compute_{name},code=sm_{name}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{name},code=compute_{name}")
    if not flags:
        raise ValueError(f"COLM_KERNELS_CUDA_ARCHS is empty ({spec!r})")
    return flags


def _cuda_sources() -> list[str]:
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), root_dir=ROOT, recursive=True))
    return [os.path.join("csrc", "bindings.cpp")] + cu


def _extension_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass): the CUDA extension, or nothing with one line saying why."""
    if _env_flag("COLM_KERNELS_SKIP_CUDA"):
        _say(f"COLM_KERNELS_SKIP_CUDA=1: {SKIP_SUFFIX}")
        return [], {}
    force = _env_flag("COLM_KERNELS_FORCE_CUDA")
    try:
        import torch
    except Exception as exc:  # build isolation, or torch not installed yet
        if force:
            raise RuntimeError(
                "COLM_KERNELS_FORCE_CUDA=1 but torch is not importable at build time "
                f"({exc}); install torch first and use pip's --no-build-isolation"
            ) from exc
        _say(
            "torch is not importable at build time (pip build isolation? use "
            f"--no-build-isolation): {SKIP_SUFFIX}"
        )
        return [], {}

    cuda_home = _find_cuda_home()
    if not force:
        missing = []
        if not torch.version.cuda:
            missing.append("CPU torch")
        if cuda_home is None:
            missing.append("no nvcc")
        if missing:
            _say(f"{' / '.join(missing)}: {SKIP_SUFFIX}")
            return [], {}
    if cuda_home is None:
        raise RuntimeError(
            "COLM_KERNELS_FORCE_CUDA=1 but no CUDA toolkit was found "
            "(set CUDA_HOME to a directory with bin/nvcc and include/cuda_runtime_api.h)"
        )
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        # CPU torch with COLM_KERNELS_FORCE_CUDA=1: torch does not look for CUDA at all.
        cpp_extension.CUDA_HOME = cuda_home

    archs = os.environ.get("COLM_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    # No --use_fast_math: the norm math must stay IEEE (sqrt, division).
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", *_gencode_flags(archs)]
    sources = _cuda_sources()
    _say(f"building {EXT_NAME} for {archs} with {cuda_home}/bin/nvcc from {len(sources)} sources")
    ext = cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # bindings.cpp gets torch's own -std (C++20 for recent torch); .cu files need no torch.
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


def _long_description() -> str:
    for name in ("README.md", "README.rst"):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    return "Kernels for Chain-of-Model language models (CoLM, CoLM-Air; arXiv 2505.11820)."


ext_modules, cmdclass = _extension_build()

setup(
    name="colm-kernels",
    version="0.1.0",
    description="Kernels for Chain-of-Model language models (CoLM, CoLM-Air; arXiv 2505.11820)",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(where=ROOT, include=["colm_kernels", "colm_kernels.*"]),
    # numpy < 2.3: triton 3.6's interpreter (the CPU test path) breaks on newer numpy.
    install_requires=["torch", "triton>=3.6", "numpy<2.3", "ninja", "pybind11"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["colm-bench = colm_kernels.bench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
