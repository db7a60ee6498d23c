// The table one fused launch walks: every tensor of every param group, its group's hyperparameters, and the
// chunk map that splits tensors into fixed-size work items. The host writes it (csrc/ops.cpp) only when a
// pointer, size or hyperparameter changes; the CUDA kernel reads a device copy, the CPU kernel the host copy.
//
// Layout, in int64 words:  TableHeader | TensorEntry[num_tensors] | GroupEntry[num_groups]
//                          | first_chunk[num_tensors + 1]   (prefix sums: tensor t owns chunks
//                                                            [first_chunk[t], first_chunk[t + 1]))
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "update_rules.h"

namespace fusedopt {

// Elements per work item: large enough to amortise the per-chunk setup, small enough to spread a few big
// tensors over all SMs (CUDA) or cores (CPU).
constexpr int64_t kChunkSize = 16384;
constexpr int kMaxStates = 3;

struct TableHeader {
  int64_t num_tensors;
  int64_t num_groups;
  int64_t num_chunks;
  int64_t total_numel;
  // CUDA only: blocks that finished this launch. The last block to finish bumps every step counter and
  // resets this to 0, so no block can read a step counter after it has changed.
  int64_t blocks_done;
  int64_t reserved[3];
};

struct TensorEntry {
  void* param;
  const void* grad;
  void* state[kMaxStates];
  float* step;  // nullptr for algorithms without a step counter (SGD)
  int64_t numel;
  int32_t group;
  int32_t fresh_state;  // SGD: the momentum buffer is created by this step (torch clones the gradient)
};

struct GroupEntry {
  double hyper[kMaxHyper];
  const void* lr_tensor;  // when set, the learning rate is read from this 1-element tensor at launch time
  int64_t lr_is_double;
  int64_t reserved;
};

static_assert(sizeof(TableHeader) % 8 == 0 && sizeof(TensorEntry) % 8 == 0 && sizeof(GroupEntry) % 8 == 0,
              "table records must be whole int64 words");

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

  // The rule for one tensor in this launch: its group's hyperparameters and the step number it is making.
  template <typename Rule>
  C10_HOST_DEVICE Rule rule_for(const TensorEntry& entry) const {
    const GroupEntry& group = groups()[entry.group];
    const double step = entry.step ? double(*entry.step) + 1.0 : 0.0;
    return Rule(group.hyper, learning_rate(group), step, entry.fresh_state != 0);
  }
};

// Runtime flags to template parameters, as flash-attention's BOOL_SWITCH, for any number of flags:
// calls fn(std::bool_constant<flag0>{}, std::bool_constant<flag1>{}, ...).
template <typename Fn, bool... Chosen>
void dispatch_flags(Fn&& fn, std::integer_sequence<bool, Chosen...>) {
  fn(std::bool_constant<Chosen>{}...);
}
template <typename Fn, bool... Chosen, typename... Rest>
void dispatch_flags(Fn&& fn, std::integer_sequence<bool, Chosen...>, bool next, Rest... rest) {
  if (next) {
    dispatch_flags(std::forward<Fn>(fn), std::integer_sequence<bool, Chosen..., true>{}, rest...);
  } else {
    dispatch_flags(std::forward<Fn>(fn), std::integer_sequence<bool, Chosen..., false>{}, rest...);
  }
}
template <typename Fn, typename... Flags>
void with_flags(Fn&& fn, Flags... flags) {
  dispatch_flags(std::forward<Fn>(fn), std::integer_sequence<bool>{}, bool(flags)...);
}

}  // namespace fusedopt
