// The table one fused launch walks: every tensor of every param group, its group's hyperparameters, and the
// chunk map that splits tensors into fixed-size work items. The host writes it (csrc/ops.cpp) only when a
// pointer, size or hyperparameter changes; the CUDA kernel reads a device copy, the CPU kernel the host copy.
// What changes per call (phases, GradScaler tensors, clipping, the schedule to advance) is not in the table:
// it travels as StepArgs, by value.
//
// Layout, in int64 words:  TableHeader | TensorEntry[num_tensors] | GroupEntry[num_groups]
//                          | first_chunk[num_tensors + 1]   (prefix sums: tensor t owns chunks
//                                                            [first_chunk[t], first_chunk[t + 1]))
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "algorithm.h"
#include "storage.h"

namespace fusedopt {

// Elements per work item: large enough to amortise the per-chunk setup, small enough to spread a few big
// tensors over all SMs (CUDA) or cores (CPU).
constexpr int64_t kChunkSize = 16384;

// What a launch does (StepArgs::phases). A step that unscales or clips gradients needs their global
// non-finite flag and sum of squares before any update: one launch does both phases with a grid barrier
// between them; an optimizer with several launches on one device (or params on several devices) reduces in
// each, then updates in each.
enum StepPhase : int64_t {
  kReduceGrads = 1,  // accumulate the grads' sum of squares and non-finite flag into grad_stats
  kUpdate = 2,       // the update itself
  kResetStats = 4,   // the device's last launch of the step: zero grad_stats for the next one
  // Set by the CUDA runner only (never by a caller): accumulate the per-tensor sums of an algorithm that
  // declares kTensorSums into the launch's workspace before its update (kUpdate reads them from there).
  kAccumulateTensorSums = 8,
};

// grad_stats (a float64 tensor the optimizer keeps per device): [sum of squares, non-finite flag].
constexpr int kGradStats = 2;

// What the table describes and no call changes: its sizes and the chunk map's totals. Everything a call may
// change travels beside the table, by value (StepArgs), so that a call never rewrites or uploads the table
// and a table captured in a CUDA graph holds nothing the next call could invalidate.
struct TableHeader {
  int64_t num_tensors;
  int64_t num_groups;
  int64_t num_chunks;  // < 0 while the host rewrites the table (a throw half-way leaves it marked incomplete)
  int64_t total_numel;
  int64_t momentum_slot;  // the hyper slot a group's momentum_value replaces (momentum or beta1)
  // Host bookkeeping, ignored by the kernels: the eager device copy misses a change that was written while
  // a step was being captured (the capture uploaded it to its own snapshot only).
  int64_t device_copy_stale;
  // How params and states are stored and rounded (csrc/storage.h); stored == 0 for the plain kernels.
  StoragePolicy storage;
};

// A device LR schedule advanced after a launch's update (csrc/lr_schedule.h), or groups = 0.
struct ScheduleArgs {
  int64_t groups;
  double* lrs;
  double* momenta;
  const double* program;
  double* state;
  int64_t program_stride;
  int64_t state_stride;
};

// The per-call values of one launch, passed to the kernel by value (and to the CPU runner as is).
struct StepArgs {
  int64_t phases;           // StepPhase bits
  // Gradient scaling and clipping: the kernel multiplies every grad by (1 / *grad_scale) * clip factor.
  const float* grad_scale;  // GradScaler's scale, or nullptr
  const float* skip_if;     // skip the step when this is non-zero (a found_inf computed elsewhere), or nullptr
  float* found_inf;         // set to 1 when the step was skipped for a non-finite grad, else 0; or nullptr
  double* grad_stats;       // kGradStats doubles, or nullptr
  double max_grad_norm;     // > 0: clip the global grad norm to it
  // Stochastic rounding's [seed, counter] (csrc/storage.h), or nullptr; a launch that updates with
  // stochastic rounding advances the counter once, after every block has read it.
  int64_t* rng;
  ScheduleArgs schedule;
};

struct TensorEntry {
  void* param;
  const void* grad;
  void* state[kMaxStates];
  float* scalars[kMaxScalars];  // the param's scalar state (algorithm.h: kScalars), 1-element float32 tensors
  void* extra;  // StoragePolicy: the fp32 master param or the Kahan compensation buffer, else nullptr
  int64_t numel;
  int32_t group;
  int32_t fresh_state;  // the buffers are created by this step (SGD: torch clones the gradient into them)
};

// Group entries change when a float hyperparameter does (a learning rate that changes every step): they lie
// in one contiguous range of the table, which the host uploads alone when nothing else changed.

struct GroupEntry {
  double hyper[kMaxHyper];
  const void* lr_tensor;  // when set, the learning rate is read from this 1-element tensor at launch time
  int64_t lr_is_double;
  const double* momentum_value;  // when set, replaces hyper[momentum_slot] (a schedule cycles it on the device)
};

static_assert(sizeof(TableHeader) % 8 == 0 && sizeof(StepArgs) % 8 == 0 && sizeof(TensorEntry) % 8 == 0 && sizeof(GroupEntry) % 8 == 0,
              "table records must be whole int64 words");

// Where the group entries lie in the table (in words), so that a hyperparameter change uploads only them.
constexpr int64_t group_words_offset(int64_t num_tensors) {
  return int64_t(sizeof(TableHeader) / 8) + num_tensors * int64_t(sizeof(TensorEntry) / 8);
}
constexpr int64_t group_words(int64_t num_groups) { return num_groups * int64_t(sizeof(GroupEntry) / 8); }

constexpr int64_t table_words(int64_t num_tensors, int64_t num_groups) {
  return int64_t(sizeof(TableHeader) / 8) + num_tensors * int64_t(sizeof(TensorEntry) / 8) +
         num_groups * int64_t(sizeof(GroupEntry) / 8) + num_tensors + 1;
}

// Typed views of one table buffer.
struct TableView {
  int64_t* base;
  C10_HOST_DEVICE TableHeader& header() const { return *reinterpret_cast<TableHeader*>(base); }
  C10_HOST_DEVICE TensorEntry* tensors() const {
    return reinterpret_cast<TensorEntry*>(base + sizeof(TableHeader) / 8);
  }
  C10_HOST_DEVICE GroupEntry* groups() const {
    return reinterpret_cast<GroupEntry*>(tensors() + header().num_tensors);
  }
  C10_HOST_DEVICE int64_t* first_chunk() const {
    return reinterpret_cast<int64_t*>(groups() + header().num_groups);
  }

  // The tensor that owns `chunk`: the last t with first_chunk[t] <= chunk (zero-size tensors own no chunk).
  C10_HOST_DEVICE int64_t tensor_of_chunk(int64_t chunk) const {
    const int64_t* starts = first_chunk();
    int64_t lo = 0, hi = header().num_tensors;  // invariant: starts[lo] <= chunk < starts[hi]
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (starts[mid] <= chunk) lo = mid; else hi = mid;
    }
    return lo;
  }

  C10_HOST_DEVICE double learning_rate(const GroupEntry& group) const {
    if (group.lr_tensor == nullptr) return group.hyper[0];
    return group.lr_is_double ? *static_cast<const double*>(group.lr_tensor)
                              : double(*static_cast<const float*>(group.lr_tensor));
  }

  // The hyperparameters a group's rules read: the momentum slot replaced by the schedule's device value when
  // a schedule cycles momentum. Selected per slot (not hyper[slot] = ...) so the copy stays in registers.
  C10_HOST_DEVICE void group_hyper(const GroupEntry& group, double (&hyper)[kMaxHyper]) const {
    const int64_t slot = group.momentum_value == nullptr ? -1 : header().momentum_slot;
    const double momentum = slot < 0 ? 0.0 : *group.momentum_value;
    for (int k = 0; k < kMaxHyper; ++k) hyper[k] = k == slot ? momentum : group.hyper[k];
  }

  // The rule for one tensor in this launch: its group's hyperparameters and its scalar state before and after
  // this step (every chunk computes `after` itself; the last block stores it, see store_scalars), and the
  // tensor's sums for an algorithm that declares kTensorSums (nullptr while they are being accumulated).
  template <typename Rule>
  C10_HOST_DEVICE Rule rule_for(const TensorEntry& entry, const double* tensor_sums = nullptr) const {
    using A = typename Rule::Algorithm;
    const GroupEntry& group = groups()[entry.group];
    double hyper[kMaxHyper];
    group_hyper(group, hyper);
    const double lr = learning_rate(group);
    float before[kMaxScalars > 0 ? kMaxScalars : 1] = {}, after[kMaxScalars > 0 ? kMaxScalars : 1] = {};
    if constexpr (A::kScalars.size() > 0) {
      for (size_t k = 0; k < A::kScalars.size(); ++k) before[k] = *entry.scalars[k];
      A::advance(hyper, lr, before, after);
    }
    return Rule(RuleInputs{hyper, lr, before, after, entry.fresh_state != 0, tensor_sums});
  }

  // Writes tensor t's scalar state after this step. Only once every chunk of the launch has read it.
  template <typename A>
  C10_HOST_DEVICE void store_scalars(int64_t t) const {
    if constexpr (A::kScalars.size() > 0) {
      const TensorEntry& entry = tensors()[t];
      const GroupEntry& group = groups()[entry.group];
      double hyper[kMaxHyper];
      group_hyper(group, hyper);
      float before[A::kScalars.size()], after[A::kScalars.size()];
      for (size_t k = 0; k < A::kScalars.size(); ++k) before[k] = *entry.scalars[k];
      A::advance(hyper, learning_rate(group), before, after);
      for (size_t k = 0; k < A::kScalars.size(); ++k) *entry.scalars[k] = after[k];
    }
  }
};

// Whether the update runs, and the factor every grad is multiplied by: GradScaler's unscaling times the
// clipping factor of torch.nn.utils.clip_grad_norm_ (max_norm / (norm + 1e-6), at most 1), where the norm
// is that of the unscaled grads. `grad_stats` (kGradStats values) covers every launch of the step.
// As in torch, a NaN norm (a NaN grad, clipping without a scaler) gives a NaN factor: min(1, NaN) is NaN
// there (clamp propagates NaN), so every grad, hence every param it updates, becomes NaN. With a scaler the
// step is skipped instead.
struct GradAdjustment {
  bool skip;
  double factor;
};

C10_HOST_DEVICE inline GradAdjustment grad_adjustment(const StepArgs& args, const double* grad_stats) {
  GradAdjustment result{false, 1.0};
  if (args.skip_if != nullptr && *args.skip_if != 0.0f) result.skip = true;
  if (args.grad_scale != nullptr) result.factor = 1.0 / double(*args.grad_scale);
  if (args.found_inf != nullptr && grad_stats[1] != 0.0) result.skip = true;
  if (args.max_grad_norm > 0.0) {
    const double norm = sqrt_of(grad_stats[0]) * result.factor;
    const double clip = args.max_grad_norm / (norm + 1e-6);
    if (!(clip >= 1.0)) result.factor *= clip;  // written so that a NaN clip propagates, as torch's clamp does
  }
  return result;
}

// Non-finite without isfinite: inf - inf and NaN - NaN are NaN, which is the only value unequal to itself.
template <typename T>
C10_HOST_DEVICE inline bool is_nonfinite(T value) {
  const T difference = value - value;
  return difference != difference;
}

}  // namespace fusedopt
