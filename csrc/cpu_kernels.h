// The interface between the CPU runner (csrc/cpu_runner.h and csrc/cpu_dispatch.cpp, compiled for the baseline
// CPU) and the CPU update kernels (csrc/cpu/update_kernels.h, compiled once per algorithm and instruction set by
// setup.py). Both sides
// include this header, so it holds no at::Tensor and nothing that would be compiled with AVX-512 flags in one
// object and shared with another: only a table of function pointers, which is data.
#pragma once

#include <cstdint>
#include <string_view>

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

// The storage layouts the stored path has kernels of its own for: the low-precision modes a user names for bf16
// and fp16 params (issue 11), with their dtypes and buffers fixed at compile time. The general kernel reads them
// from the table and branches on them per register: its AVX-512 AdamW loop is 2.5x the instructions and 5x the
// vector stack accesses of the fixed one, and on a 2-core Intel Xeon (bf16, 10 x 2^20 elements, 2 threads) SGD
// momentum with stochastic rounding, which moves no extra byte, took 1.46x round-to-nearest's step time there
// against 1.18x here; Kahan AdamW 1.40x against 1.23x; fp16 master weights with stochastic rounding, AdamW
// 1.69-1.71x against 1.43x. Any other layout (fp32 params with low-precision state, fp16 params with bf16 state,
// ...) runs the general kernel. Named for the tests, which read which kernel ran by these names (_stored_launches).
struct StoredLayout {
  std::string_view name;
  StoragePolicy policy;  // {stored, rounding, param_type, state_type, has_master, has_kahan}
};
inline constexpr StoredLayout kFixedLayouts[] = {
    {"stochastic", {1, kStochastic, kStoredBFloat16, kStoredBFloat16, 0, 0}},
    {"kahan", {1, kKahan, kStoredBFloat16, kStoredBFloat16, 0, 1}},
    {"master", {1, kNearest, kStoredBFloat16, kStoredBFloat16, 1, 0}},
    {"master+stochastic", {1, kStochastic, kStoredBFloat16, kStoredBFloat16, 1, 0}},
    {"fp32-state", {1, kNearest, kStoredBFloat16, kStoredFloat, 0, 0}},
    {"stochastic-fp16", {1, kStochastic, kStoredHalf, kStoredHalf, 0, 0}},
    {"kahan-fp16", {1, kKahan, kStoredHalf, kStoredHalf, 0, 1}},
    {"master-fp16", {1, kNearest, kStoredHalf, kStoredHalf, 1, 0}},
    {"master+stochastic-fp16", {1, kStochastic, kStoredHalf, kStoredHalf, 1, 0}},
    {"fp32-state-fp16", {1, kNearest, kStoredHalf, kStoredFloat, 0, 0}},
};
// Kernel slot 0 is the general kernel, slot 1 + j the kernel of kFixedLayouts[j].
inline constexpr int kStoredSlots = 1 + int(sizeof(kFixedLayouts) / sizeof(kFixedLayouts[0]));
inline constexpr std::string_view kGeneralKernelName = "general";

// The slot of the kernel that serves a launch's storage policy.
constexpr int stored_slot(const StoragePolicy& policy) {
  for (int j = 0; j + 1 < kStoredSlots; ++j) {
    const StoragePolicy& l = kFixedLayouts[j].policy;
    if (policy.stored == l.stored && policy.rounding == l.rounding && policy.param_type == l.param_type &&
        policy.state_type == l.state_type && policy.has_master == l.has_master && policy.has_kahan == l.has_kahan) {
      return 1 + j;
    }
  }
  return 0;
}

template <typename Rule>
struct StoredUpdateKernels {
  static inline StoredUpdateFn<Rule> by_variant[kNumVariants][kStoredSlots] = {};
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

// The stored-path kernel slot a launch of this policy runs: its fixed layout's, or 0 (the general kernel) when it has
// none or a test asked for the general kernel through _set_fixed_layouts, to compare the two. Counted per slot for
// the tests (_stored_launches), so they can tell which kernel ran.
int stored_launch_slot(const StoragePolicy& policy);

}  // namespace fusedopt::cpu
