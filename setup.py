"""Build script for colm-kernels.

The pure-Python package always installs. The CUDA extension ``colm_kernels._C`` (csrc/bindings.cpp
plus every csrc/**/*.cu) is built when

- ``COLM_KERNELS_FORCE_CUDA=1``, or
- torch is importable at build time, ``torch.version.cuda`` is set and nvcc is found,

unless ``COLM_KERNELS_SKIP_CUDA=1``. Otherwise one line says why it is skipped and the ``cuda``
backend reports itself unavailable at run time (``colm_kernels._cuda.unavailable_reason()``).

pip's default build isolation hides the installed torch from this script, so the extension is
only built with ``pip install -e . --no-build-isolation`` (or ``pip install . --no-build-isolation``).

cuBLAS (``chain_linear``): headers and ``libcublas`` come from the toolkit (``$CUDA_HOME/include``,
``lib64``) or, where it has none, from the pip package that CUDA torch depends on (``nvidia-cublas``:
``site-packages/nvidia/cu13/{include,lib}``; ``nvidia/cublas/...`` for CUDA 12). The same search
finds ``cusparse.h`` / ``cusolverDn.h`` for ``ATen/cuda/CUDAContextLight.h`` (torch's cuBLAS handle).

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


# cublas_v2.h is needed by csrc/chain_linear; the others by ATen/cuda/CUDAContextLight.h in
# bindings.cpp, which falls back to a handle of its own without them.
_CUBLAS_HEADER = "cublas_v2.h"
_BINDING_HEADERS = ("cublasLt.h", "cusparse.h", "cusolverDn.h")


def _pip_nvidia_dirs(sub: str, cuda_major: str | None) -> list[str]:
    """``<site-packages>/nvidia/*/<sub>`` folders of the pip CUDA packages, this CUDA major's
    ``cuXY`` folder first, folders of other majors left out."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec else []
    out = []
    for root in roots:
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        majors = [n for n in names if re.fullmatch(r"cu\d+", n)]
        if cuda_major:
            first = [n for n in majors if n == f"cu{cuda_major}"]
        else:
            first = sorted(majors, key=lambda n: int(n[2:]), reverse=True)
        for name in first + [n for n in names if n not in majors]:
            path = os.path.join(root, name, sub)
            if os.path.isdir(path) and path not in out:
                out.append(path)
    return out


def _cublas_flags(cuda_home: str, cuda_major: str | None) -> tuple[dict, str | None]:
    """Extension arguments for cuBLAS, or ({}, why it cannot be found)."""
    toolkit_include = os.path.join(cuda_home, "include")
    pip_include = _pip_nvidia_dirs("include", cuda_major)
    includes = []
    for header in (_CUBLAS_HEADER, *_BINDING_HEADERS):
        if os.path.isfile(os.path.join(toolkit_include, header)):
            continue
        found = next((d for d in pip_include if os.path.isfile(os.path.join(d, header))), None)
        if found is None and header == _CUBLAS_HEADER:
            return {}, (
                f"{header} is neither in {toolkit_include} nor in a pip nvidia package "
                "(pip install nvidia-cublas)"
            )
        if found and found not in includes:
            includes.append(found)
    kwargs: dict = {"libraries": [], "extra_link_args": []}
    for libdir in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")):
        if os.path.isfile(os.path.join(libdir, "libcublas.so")):
            kwargs["libraries"].append("cublas")
            kwargs["extra_link_args"].append(f"-L{libdir}")
            break
    else:
        for libdir in _pip_nvidia_dirs("lib", cuda_major):
            libs = sorted(glob.glob("libcublas.so*", root_dir=libdir), key=len)
            if libs:
                # pip ships only the versioned name (libcublas.so.13): link it by file name
                kwargs["extra_link_args"] += [f"-L{libdir}", f"-l:{libs[0]}", f"-Wl,-rpath,{libdir}"]
                break
        else:
            return {}, f"libcublas is neither in {cuda_home}/lib64 nor in a pip nvidia package"
    # -isystem: searched after the toolkit's own -I, so pip copies of CUDA runtime headers in the
    # same folder never shadow the toolkit's.
    kwargs["cxx"] = [f for d in includes for f in ("-isystem", d)]
    kwargs["nvcc"] = [f for d in includes for f in ("-isystem", d)]
    return kwargs, None


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

    cuda_major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    cublas, missing_cublas = _cublas_flags(cuda_home, cuda_major)
    if missing_cublas:
        if force:
            raise RuntimeError(f"COLM_KERNELS_FORCE_CUDA=1 but cuBLAS is missing: {missing_cublas}")
        _say(f"{missing_cublas}: {SKIP_SUFFIX}")
        return [], {}

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
        extra_compile_args={"cxx": ["-O3", *cublas["cxx"]], "nvcc": nvcc_flags + cublas["nvcc"]},
        libraries=cublas["libraries"],
        extra_link_args=cublas["extra_link_args"],
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
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
        "bench": ["matplotlib", "tqdm"],
        # Pinned: the integrations follow these releases' APIs (transformers 5's `cache` argument,
        # TorchTitan 0.3's Configurable model/trainer API); both install beside torch 2.13.
        # accelerate: transformers' Trainer and device_map; peft: LoRA (integrations/peft.py).
        "hf": ["transformers==5.24.0", "safetensors==0.8.0", "accelerate==1.16.0", "peft==0.22.0"],
        "torchtitan": ["torchtitan==0.3.0"],
    },
    entry_points={"console_scripts": ["colm-bench = colm_kernels.bench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
