"""Builds fusedopt._C: CPU kernels always, CUDA kernels whenever nvcc and a CUDA-enabled torch are present.

No GPU is needed to build. FUSEDOPT_CPU_ONLY=1 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST picks the
architectures (default: 8.0 and 9.0, plus compute_90 PTX for newer GPUs). The CPU update kernels are compiled once per instruction set (see
CPU_VARIANTS) and chosen at run time, so the build never depends on the build machine's CPU.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup


def real_cuda_home():
    """The toolkit root. torch derives it from the folder of the `nvcc` on PATH, which is wrong when that
    nvcc is a wrapper script (as on our CI machines), so resolve the wrapper to the compiler it runs."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc path it execs
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    return os.path.dirname(os.path.dirname(token))
        real = os.path.realpath(nvcc)
        if os.path.basename(os.path.dirname(real)) == "bin":
            root = os.path.dirname(os.path.dirname(real))
            if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
                return root
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


cuda_home = None if os.environ.get("FUSEDOPT_CPU_ONLY", "0") == "1" else real_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
# +PTX: GPUs newer than Hopper (Blackwell, 10.x/12.x) JIT-compile the compute_90 PTX instead of failing.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The CPU update kernels (csrc/cpu/update_kernels.cpp), compiled once per instruction set with the flags and
# macros ATen uses for its own kernels; csrc/cpu_step.cpp picks the best one the CPU has at run time. Only
# x86-64 gets the AVX2/AVX-512 variants; elsewhere the DEFAULT one (the compiler's baseline) runs.
CPU_KERNEL_SOURCE = "csrc/cpu/update_kernels.cpp"
CPU_VARIANTS = {"DEFAULT": []}
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
    CPU_VARIANTS["AVX2"] = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]
    CPU_VARIANTS["AVX512"] = CPU_VARIANTS["AVX2"] + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]

with_cuda = cuda_home is not None and torch.version.cuda is not None
cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
sources = sorted(glob.glob("csrc/*.cpp"))
define_macros = [(f"FUSEDOPT_CPU_{name}", "1") for name in CPU_VARIANTS if name != "DEFAULT"]
if with_cuda:
    sources += sorted(glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        "fusedopt._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        define_macros=[("FUSEDOPT_WITH_CUDA", "1")] + define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "fusedopt._C", sources, include_dirs=[os.path.abspath("csrc")], define_macros=define_macros,
        extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"],
    )


def cpu_variant_command(variant, source, obj):
    """The compiler call for one CPU kernel variant: torch's own C++ flags for extensions, plus the variant's.
    -ffp-contract=off keeps every variant's rounding identical (no FMA contraction, whatever the compiler)."""
    from torch.utils.cpp_extension import get_cxx_compiler, include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([get_cxx_compiler(), "-c", source, "-o", obj, "-fPIC", "-std=c++20", "-ffp-contract=off",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DCPU_CAPABILITY={variant}", f"-DCPU_CAPABILITY_{variant}",
             "-I" + os.path.abspath("csrc")] + [f"-I{path}" for path in include_paths()]
            + ["-O3", "-fno-math-errno"] + CPU_VARIANTS[variant])


class BuildWithCpuVariants(BuildExtension):
    """torch's BuildExtension compiles every source with the same flags, but each CPU kernel variant needs its
    own (-mavx2 ..., -mavx512f ...). So those objects are compiled here, one compiler call per variant, and
    handed to the linker as extra objects; the variants' code lives in per-variant namespaces, so the linker
    never has to choose between an AVX-512 and a baseline copy of one function. Objects newer than every
    source and header under csrc/ are reused."""

    def build_extensions(self):
        os.makedirs(self.build_temp, exist_ok=True)
        newest_input = max(os.path.getmtime(path) for path in glob.glob("csrc/**/*", recursive=True)
                           + [__file__] if os.path.isfile(path))
        jobs = []
        for variant in CPU_VARIANTS:
            obj = os.path.join(self.build_temp, f"update_kernels_{variant.lower()}.o")
            if not os.path.exists(obj) or os.path.getmtime(obj) < newest_input:
                jobs.append(cpu_variant_command(variant, CPU_KERNEL_SOURCE, obj))
            for ext in self.extensions:
                if obj not in ext.extra_objects:
                    ext.extra_objects.append(obj)
        workers = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
        with ThreadPoolExecutor(workers) as pool:
            for command in jobs:
                print(" ".join(command[:6]), "...", flush=True)
            for result in pool.map(lambda command: subprocess.run(command), jobs):
                if result.returncode != 0:
                    raise RuntimeError(f"compiling the CPU kernels failed: {' '.join(result.args)}")
        super().build_extensions()


setup(
    name="fusedopt",
    version="0.1.0",
    description="Fused multi-tensor optimizers for PyTorch: one launch per step on CUDA, fused C++ on CPU",
    packages=find_packages(include=["fusedopt", "fusedopt.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithCpuVariants.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "matplotlib", "tqdm"],
    },
)
