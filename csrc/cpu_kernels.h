// The interface between the CPU runner (csrc/cpu_runner.h and csrc/cpu_dispatch.cpp, compiled for the baseline
// CPU) and the CPU update kernels (csrc/cpu/update_kernels.h, compiled once per algorithm and instruction set by
// setup.py). Both sides
// include this header, so it holds no at::Tensor and nothing that would be compiled with AVX-512 flags in one
// object and shared with another: only a table of function pointers, which is data.
#pragma once

#include <cstdint>

#include "step_table.h"

namespace fusedopt::cpu {

// The kernel variants, named as ATEN_CPU_CAPABILITY names torch's own (and in the same order as
// at::CPUCapability on x86).
enum Variant : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kNumVariants = 3 };
inline constexpr const char* kVariantNames[kNumVariants] = {"default", "avx2", "avx512"};

// Applies `rule` to elements [begin, end) of one tensor, each grad multiplied by grad_factor first.
template <typename scalar_t, typename Rule>
using UpdateFn = void (*)(const TensorEntry& entry, const Rule& rule, typename Rule::opmath_t grad_factor,
                          int64_t begin, int64_t end);

// One slot per variant for every (storage dtype, rule) pair. A variant's register_update_kernels() fills its
// slots; the runner calls it only on a CPU that has the variant's instruction set.
template <typename scalar_t, typename Rule>
struct UpdateKernels {
  static inline UpdateFn<scalar_t, Rule> by_variant[kNumVariants] = {};
};

// For an algorithm that declares kTensorSums: adds each of the rule's tensor terms over elements [begin, end) of
// one tensor (grads multiplied by grad_factor, nothing stored) into sums[k], in double.
template <typename scalar_t, typename Rule>
using TensorSumFn = void (*)(const TensorEntry& entry, const Rule& rule, typename Rule::opmath_t grad_factor,
                             int64_t begin, int64_t end, double* sums);

template <typename scalar_t, typename Rule>
struct TensorSumKernels {
  static inline TensorSumFn<scalar_t, Rule> by_variant[kNumVariants] = {};
};

// The grad-statistics pass (StepPhase kReduceGrads): the sum of squares (in double) of grad elements
// [begin, end) of one tensor, and whether any of them is inf or NaN.
template <typename scalar_t>
using GradStatsFn = void (*)(const TensorEntry& entry, int64_t begin, int64_t end, double& sum_sq, bool& nonfinite);

template <typename scalar_t>
struct GradStatsKernels {
  static inline GradStatsFn<scalar_t> by_variant[kNumVariants] = {};
};

// The stored path (csrc/storage.h, csrc/cpu/stored_update.h): the same as UpdateFn / TensorSumFn for a launch
// whose params and states are stored in other dtypes or rounded otherwise than to nearest; `store` says how.
// One kernel per fp32 rule serves every storage dtype.
template <typename Rule>
using StoredUpdateFn = void (*)(const TensorEntry& entry, const ElementStore& store, const Rule& rule,
                                float grad_factor, int64_t begin, int64_t end);
template <typename Rule>
using StoredSumFn = void (*)(const TensorEntry& entry, const ElementStore& store, const Rule& rule, float grad_factor,
                             int64_t begin, int64_t end, double* sums);

template <typename Rule>
struct StoredUpdateKernels {
  static inline StoredUpdateFn<Rule> by_variant[kNumVariants] = {};
};
template <typename Rule>
struct StoredSumKernels {
  static inline StoredSumFn<Rule> by_variant[kNumVariants] = {};
};

// Fills one variant's slots for every kernel of one algorithm (csrc/cpu/update_kernels.h).
using KernelRegistrar = void (*)();

// Called during static initialisation by each algorithm's registration, for each variant compiled; the
// registrars of the variants this CPU has run before the first step.
void add_kernel_registrar(Variant variant, KernelRegistrar registrar);

// The variant every step runs (the best this CPU has, or the one _set_cpu_variant chose).
int active_variant();

}  // namespace fusedopt::cpu
