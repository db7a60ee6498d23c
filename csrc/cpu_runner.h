// The CPU runner: one parallel region over the same (tensor, chunk) work items the CUDA grid walks, calling the
// explicitly vectorized update kernel (csrc/cpu/update_kernels.h) of the best instruction set this CPU has
// (csrc/cpu_dispatch.cpp). Instantiated by each algorithm's registration (csrc/algorithm_op.h), for the
// baseline CPU.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "host_prefetch.h"
#include "lr_schedule.h"
#include "ops.h"

namespace fusedopt::cpu {

// A kernel found in one of the kernel tables (cpu_kernels.h): every variant registers all of them, so a hole is a
// build error.
template <typename Fn>
Fn registered(Fn fn) {
  TORCH_CHECK(fn != nullptr, "fusedopt: no CPU kernel of this variant for this update rule");
  return fn;
}

// The active variant's kernel from UpdateKernels, TensorSumKernels, StoredSumKernels or GradStatsKernels.
template <typename Kernels>
auto active_kernel() {
  return registered(Kernels::by_variant[active_variant()]);
}

// The active variant's stored-path kernel for a launch's storage policy: its fixed layout's, or the general one.
template <typename Rule>
StoredUpdateFn<Rule> stored_kernel(const StoragePolicy& policy) {
  return registered(StoredUpdateKernels<Rule>::by_variant[active_variant()][stored_launch_slot(policy)]);
}

// A rule is a pure function of its tensor's group, scalar state (`step`, ...) and fresh flag (RuleInputs), and
// consecutive tensors usually share all three: reuse the last rule built instead of paying its pow() calls for
// every small tensor. Scalars are compared bit for bit, so a NaN step still matches itself. A rule built from its
// tensor's own sums (kTensorSums) is never reused.
template <typename Rule>
class RuleCache {
 public:
  explicit RuleCache(const TableView& table) : table_(table) {}

  const Rule& operator()(const TensorEntry& entry, const double* tensor_sums = nullptr) {
    if (tensor_sums != nullptr) {
      rule_.emplace(table_.rule_for<Rule>(entry, tensor_sums));
      group_ = -1;
    } else if (!rule_.has_value() || !same_inputs(entry)) {
      rule_.emplace(table_.rule_for<Rule>(entry));
      group_ = entry.group;
      fresh_ = entry.fresh_state;
      for (size_t k = 0; k < kScalars; ++k) std::memcpy(&scalars_[k], entry.scalars[k], sizeof(float));
    }
    return *rule_;
  }

 private:
  static constexpr size_t kScalars = Rule::Algorithm::kScalars.size();

  bool same_inputs(const TensorEntry& entry) const {
    if (entry.group != group_ || entry.fresh_state != fresh_) return false;
    for (size_t k = 0; k < kScalars; ++k) {
      if (std::memcmp(&scalars_[k], entry.scalars[k], sizeof(float)) != 0) return false;
    }
    return true;
  }

  TableView table_;
  std::optional<Rule> rule_;
  int32_t group_ = -1;
  int32_t fresh_ = 0;
  float scalars_[kScalars > 0 ? kScalars : 1] = {};
};

// The first line of every buffer of tensor t (when there is one), requested while the walk is kAhead tensors
// before it: small tensors are separate allocations, which the kernels' own prefetch (ahead within one
// tensor) does not reach, and a step after backward finds them out of cache (csrc/host_prefetch.h).
inline void prefetch_tensor_data(const TableView& table, int64_t t) {
  if (t >= table.header().num_tensors) return;
  const TensorEntry& e = table.tensors()[t];
  __builtin_prefetch(e.param, 1, 3);
  __builtin_prefetch(e.grad, 0, 3);
  for (void* state : e.state) {
    if (state != nullptr) __builtin_prefetch(state, 1, 3);
  }
  for (float* scalar : e.scalars) {
    if (scalar != nullptr) __builtin_prefetch(scalar, 1, 3);
  }
  if (e.extra != nullptr) __builtin_prefetch(e.extra, 1, 3);
}

// Below this many elements a single thread is faster than waking the pool.
constexpr int64_t kSerialBelow = 1 << 16;

// Whether this launch runs the stored path (csrc/storage.h): only fp32 rules have one (fp64 params are never
// stored otherwise than plainly; ops.cpp rejects the combinations that would need it).
template <typename Rule>
bool stored_path(const TableHeader& header) {
  const bool stored = header.storage.stored != 0;
  constexpr bool kFloatRule = std::is_same_v<typename Rule::opmath_t, float>;
  TORCH_INTERNAL_ASSERT(!stored || kFloatRule, "fusedopt: stored fp64 launch");
  return stored;
}

// Every tensor's sums (kTensorSums of them per tensor, tensor-major) before any update, for an algorithm that
// declares some; empty otherwise. Per-chunk partials are added in chunk order: the result does not depend on
// the thread count.
template <typename scalar_t, typename Rule, typename ForEachChunk>
std::vector<double> tensor_sums(const TableView& table, typename Rule::opmath_t grad_factor,
                                const ForEachChunk& for_each_chunk) {
  constexpr int kSums = Declared<typename Rule::Algorithm>::num_tensor_sums();
  if constexpr (kSums == 0) {
    return {};
  } else {
    const TableHeader& header = table.header();
    std::vector<double> partials(header.num_chunks * kSums, 0.0);
    if (stored_path<Rule>(header)) {
      if constexpr (std::is_same_v<typename Rule::opmath_t, float>) {
        const StoredSumFn<Rule> accumulate = active_kernel<StoredSumKernels<Rule>>();
        for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t chunk, RuleCache<Rule>& rules) {
          const ElementStore store = element_store(header.storage, nullptr, 0);  // sums read only: no rounding
          accumulate(entry, store, rules(entry), grad_factor, start, stop, partials.data() + chunk * kSums);
        });
      }
    } else {
      const TensorSumFn<scalar_t, Rule> accumulate = active_kernel<TensorSumKernels<scalar_t, Rule>>();
      for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t chunk, RuleCache<Rule>& rules) {
        accumulate(entry, rules(entry), grad_factor, start, stop, partials.data() + chunk * kSums);
      });
    }
    std::vector<double> sums(header.num_tensors * kSums, 0.0);
    for (int64_t t = 0; t < header.num_tensors; ++t) {
      for (int64_t chunk = table.first_chunk()[t]; chunk < table.first_chunk()[t + 1]; ++chunk) {
        for (int k = 0; k < kSums; ++k) sums[t * kSums + k] += partials[chunk * kSums + k];
      }
    }
    return sums;
  }
}

struct CpuRunner {
  template <typename scalar_t, typename Rule>
  static void run(PreparedStep& prepared) {
    using T = typename Rule::opmath_t;
    const TableView table = prepared.host;
    const TableHeader& header = table.header();
    const StepArgs& args = prepared.args;  // the per-call values (phases, scaler, clipping, schedule)
    const int64_t num_chunks = header.num_chunks;
    // body(entry, start, stop, chunk, rules) for every chunk, in parallel where it pays off; `rules` is the
    // calling thread's RuleCache.
    auto for_each_chunk = [&](auto&& body) {
      auto work = [&](int64_t begin, int64_t end) {
        if (begin >= end) return;
        RuleCache<Rule> rules(table);
        int64_t t = table.tensor_of_chunk(begin);
        for (int64_t ahead = t; ahead < t + host::kAhead; ++ahead) prefetch_tensor_data(table, ahead);
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          while (table.first_chunk()[t + 1] <= chunk) prefetch_tensor_data(table, ++t + host::kAhead);
          const TensorEntry& entry = table.tensors()[t];
          const int64_t start = (chunk - table.first_chunk()[t]) * kChunkSize;
          body(entry, start, std::min(start + kChunkSize, entry.numel), chunk, rules);
        }
      };
      if (header.total_numel < kSerialBelow) {
        work(0, num_chunks);
      } else {
        at::parallel_for(0, num_chunks, 1, work);
      }
    };

    if (args.phases & kReduceGrads) {
      // Per-chunk partial sums added in chunk order: the result does not depend on the thread count.
      std::vector<double> sums(num_chunks);
      std::vector<char> nonfinite(num_chunks);
      const GradStatsFn<scalar_t> grad_stats = active_kernel<GradStatsKernels<scalar_t>>();
      for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t chunk, RuleCache<Rule>&) {
        bool bad = false;
        grad_stats(entry, start, stop, sums[chunk], bad);
        nonfinite[chunk] = bad;
      });
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        args.grad_stats[0] += sums[chunk];
        if (nonfinite[chunk]) args.grad_stats[1] += 1.0;
      }
    }
    if (!(args.phases & kUpdate)) return;

    const double no_stats[kGradStats] = {0.0, 0.0};
    const GradAdjustment adjust = grad_adjustment(args, args.grad_stats ? args.grad_stats : no_stats);
    if (!adjust.skip) {
      const T grad_factor = T(adjust.factor);
      const std::vector<double> sums = tensor_sums<scalar_t, Rule>(table, grad_factor, for_each_chunk);
      constexpr int kSums = Declared<typename Rule::Algorithm>::num_tensor_sums();
      auto sums_of = [&](const TensorEntry& entry) {
        return kSums > 0 ? sums.data() + (&entry - table.tensors()) * kSums : nullptr;
      };
      if (stored_path<Rule>(header)) {
        if constexpr (std::is_same_v<typename Rule::opmath_t, float>) {
          const StoredUpdateFn<Rule> update = stored_kernel<Rule>(header.storage);
          for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t, RuleCache<Rule>& rules) {
            const ElementStore store = element_store(header.storage, args.rng, &entry - table.tensors());
            update(entry, store, rules(entry, sums_of(entry)), grad_factor, start, stop);
          });
        }
        if (args.rng != nullptr && header.storage.rounding == kStochastic) args.rng[1] += 1;  // after every read
      } else {
        const UpdateFn<scalar_t, Rule> update = active_kernel<UpdateKernels<scalar_t, Rule>>();
        for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t, RuleCache<Rule>& rules) {
          update(entry, rules(entry, sums_of(entry)), grad_factor, start, stop);
        });
      }
      // Only after every chunk has read the scalar state and lr, and before the schedule changes the lr.
      for (int64_t t = 0; t < header.num_tensors; ++t) table.store_scalars<typename Rule::Algorithm>(t);
      const ScheduleArgs& schedule = args.schedule;
      for (int64_t g = 0; g < schedule.groups; ++g) {
        advance_schedule(schedule.program + g * schedule.program_stride, schedule.state + g * schedule.state_stride,
                         schedule.lrs + g, schedule.momenta ? schedule.momenta + g : nullptr, nullptr);
      }
    }
    if (args.found_inf != nullptr) *args.found_inf = adjust.skip ? 1.0f : 0.0f;
    if (args.phases & kResetStats) std::fill_n(args.grad_stats, kGradStats, 0.0);
  }
};

}  // namespace fusedopt::cpu
