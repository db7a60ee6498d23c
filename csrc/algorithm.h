// What an algorithm declares, once, by name (csrc/algorithms/<name>.h): its op name, hyperparameters, boolean
// options, state buffers, per-param scalar state and per-element rule. Everything else is derived from that
// declaration: the op schema and its registration (csrc/algorithm_op.h), the CPU and CUDA kernels built for
// every combination of its options, the slot layout the kernels read, and the spec the Python classes read
// (`fusedopt._C.algorithm_spec`). Nothing positional is written twice: rules read their hyperparameters,
// options and buffers through the lookups below, which fail to compile on a name the declaration lacks.
//
// A declaration is a struct with:
//   kOp       the op name (torch.ops.fusedopt.<kOp>), also the Python class's `_op_name`
//   kHyper    hyperparameter names, "lr" first (the kernels may read the lr from a tensor instead)
//   kOptions  boolean option names; each combination is a separate kernel (Rule's kFlags bit mask)
//   kStates   state buffers (torch.optim's state keys), each with the option that enables it ("" = always)
//   kScalars  per-param scalar state kept as 1-element float32 tensors on the param's device (torch's `step`,
//             NAdam's `mu_product`, ...): read by every chunk of a launch and advanced once, after all reads
//   kMomentum the hyperparameter a cycling schedule (OneCycleLR, CyclicLR) drives on the device, or ""
//   kTensorSums (optional) names of per-tensor sums the update needs before it starts (LAMB's trust ratio
//             needs ||param||^2 and ||update||^2 of each tensor): the kernels first evaluate the rule's
//             tensor_terms(param, grad, state copy, terms) on every element, without storing anything, sum
//             each term per tensor (in double, in a fixed order), wait for every tensor's sums (a grid
//             barrier on CUDA), then run the update with the sums in RuleInputs::tensor_sums
//   advance(hyper, lr, before, after)   the scalar state after this step (absent without scalars)
//   Rule<T, kFlags>                     the per-element update, in math type T (update_rules.h has the helpers)
//   FUSEDOPT_ALGORITHM(Name)            at the end of the header: names the declaration for the build
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cstdint>
#include <string_view>

#include "update_rules.h"

namespace fusedopt {

// Upper bounds the table's fixed-size records are built for. Each algorithm's header static_asserts that it
// fits (raise a bound there, and the table grows for every algorithm).
constexpr int kMaxHyper = 7;
constexpr int kMaxStates = 3;
constexpr int kMaxScalars = 3;
constexpr int kMaxTensorSums = 2;

template <size_t N>
using Names = std::array<std::string_view, N>;

// A state buffer and the option that enables it ("" when every configuration uses it).
struct StateDecl {
  std::string_view name;
  std::string_view enabled_by;
};

// Position of `name` in `names`. consteval: every lookup happens at compile time, and a name that is not there
// is a compile error (a throw cannot be evaluated in a constant expression).
template <size_t N>
consteval int index_of(const Names<N>& names, std::string_view name) {
  for (size_t i = 0; i < N; ++i) {
    if (names[i] == name) return int(i);
  }
  throw "fusedopt: no such name in the algorithm's declaration";
}

// kTensorSums is optional: the number of names declared, or 0.
template <class A>
consteval int tensor_sum_count() {
  if constexpr (requires { A::kTensorSums; }) {
    return int(A::kTensorSums.size());
  } else {
    return 0;
  }
}

// The compile-time lookups a rule uses, for declaration A.
template <class A>
struct Declared {
  // Slot of a hyperparameter in the group's hyper array.
  static consteval int hyper(std::string_view name) { return index_of(A::kHyper, name); }
  // Slot of a per-param scalar.
  static consteval int scalar(std::string_view name) { return index_of(A::kScalars, name); }
  // Whether option `name` is set in the flag mask.
  static consteval bool option(uint32_t flags, std::string_view name) {
    return (flags >> index_of(A::kOptions, name)) & 1u;
  }
  // Whether state buffer k is used under `flags`.
  static consteval bool state_enabled(uint32_t flags, size_t k) {
    return A::kStates[k].enabled_by.empty() || option(flags, A::kStates[k].enabled_by);
  }
  // The buffers used under `flags`, in declaration order: the kernels pass only those to the rule.
  static consteval int num_states(uint32_t flags) {
    int n = 0;
    for (size_t k = 0; k < A::kStates.size(); ++k) n += state_enabled(flags, k) ? 1 : 0;
    return n;
  }
  // Where buffer `name` sits among the used ones (the rule's state[] index); -1 when `flags` do not use it.
  static consteval int state(uint32_t flags, std::string_view name) {
    int slot = 0;
    for (size_t k = 0; k < A::kStates.size(); ++k) {
      if (A::kStates[k].name == name) return state_enabled(flags, k) ? slot : -1;
      slot += state_enabled(flags, k) ? 1 : 0;
    }
    throw "fusedopt: no such state buffer in the algorithm's declaration";
  }
  static consteval int momentum_slot() { return A::kMomentum.empty() ? -1 : hyper(A::kMomentum); }
  // How many per-tensor sums the update needs first (0 for a purely element-wise algorithm), and the index of one.
  static consteval int num_tensor_sums() { return tensor_sum_count<A>(); }
  static consteval int tensor_sum(std::string_view name) { return index_of(A::kTensorSums, name); }

  static_assert(A::kHyper.size() >= 1 && A::kHyper[0] == "lr", "slot 0 is the learning rate");
  static_assert(A::kHyper.size() <= kMaxHyper, "raise kMaxHyper in csrc/algorithm.h");
  static_assert(A::kStates.size() <= kMaxStates, "raise kMaxStates in csrc/algorithm.h");
  static_assert(A::kScalars.size() <= kMaxScalars, "raise kMaxScalars in csrc/algorithm.h");
  static_assert(A::kOptions.size() <= 8, "each option doubles the kernels compiled");
  static_assert(tensor_sum_count<A>() <= kMaxTensorSums, "raise kMaxTensorSums in csrc/algorithm.h");
};

// What a rule is built from, once per (tensor, launch): its group's hyperparameters (by Declared::hyper slot),
// the learning rate, the param's scalar state before and after this step (torch increments `step` before it
// uses it: a rule reads the new step from `next`), whether its buffers are created by this step, and the
// tensor's sums (kTensorSums) when the algorithm declares some: nullptr while they are being accumulated.
struct RuleInputs {
  const double* hyper;
  double lr;
  const float* scalars;
  const float* next;
  bool fresh;
  const double* tensor_sums = nullptr;
};

// The usual advance: only `step`, incremented.
template <class A>
C10_HOST_DEVICE inline void advance_step(const float* before, float* after) {
  constexpr int kStep = Declared<A>::scalar("step");
  for (size_t k = 0; k < A::kScalars.size(); ++k) after[k] = before[k];
  after[kStep] = before[kStep] + 1.0f;
}

}  // namespace fusedopt

// At the end of an algorithm's header: the build compiles one set of translation units per header (setup.py),
// each including exactly one, which reads the declaration through this alias.
#define FUSEDOPT_ALGORITHM(Name) \
  namespace fusedopt {           \
  using ThisAlgorithm = Name;    \
  }
