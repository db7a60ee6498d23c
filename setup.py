"""Builds fusedopt._C: CPU kernels always, CUDA kernels whenever nvcc and a CUDA-enabled torch are present.

No GPU is needed to build. FUSEDOPT_CPU_ONLY=1 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST picks the
architectures (default: 8.0 and 9.0).
"""
import glob
import os
import shutil

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
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = cuda_home is not None and torch.version.cuda is not None
cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
sources = sorted(glob.glob("csrc/*.cpp"))
if with_cuda:
    sources += sorted(glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        "fusedopt._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        define_macros=[("FUSEDOPT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "fusedopt._C", sources, include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"],
    )

setup(
    name="fusedopt",
    version="0.1.0",
    description="Fused multi-tensor optimizers for PyTorch: one launch per step on CUDA, fused C++ on CPU",
    packages=find_packages(include=["fusedopt", "fusedopt.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "matplotlib", "tqdm"],
    },
)
