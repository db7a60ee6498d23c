// The CUDA kernels of one algorithm: setup.py compiles this once per algorithm header, in a generated
// translation unit (#include "algorithms/<name>.h", then this file), so the algorithms compile in parallel.
#pragma once

#include "cuda_step.cuh"

namespace {
// The same kernel for the cached calls of CUDA launches (csrc/cached_call.cpp).
const bool kDirectStepRegistered =
    fusedopt::add_direct_step_for<fusedopt::ThisAlgorithm, fusedopt::CudaRunner>(c10::DeviceType::CUDA);
}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl(fusedopt::ThisAlgorithm::kOp.data(),
         torch::CppFunction::makeFromBoxedFunction<&fusedopt::step_boxed<fusedopt::ThisAlgorithm, fusedopt::CudaRunner>>());
}
