// The CPU kernels of the stored path (csrc/storage.h): params or states in another dtype than the rule's math,
// rounded stochastically, Kahan-compensated, or updated through an fp32 master copy. Each range is walked in
// tiles small enough to stay in L1: the tile's values are converted to fp32 (in registers, vectorized), the
// plain fp32 kernel of the same rule (update_range<float, Rule>, csrc/cpu/update_kernels.h) updates them, and
// they are stored back with the launch's rounding. An fp32 buffer (the master copy, fp32 states or grads) is
// updated where it lies, so each mode moves only its own extra bytes plus an L1-resident copy.
//
// Included by csrc/cpu/update_kernels.h after update_range and tensor_sums_range: the same per-variant
// namespace, compiled once per instruction set.
#pragma once

#include "storage.h"

namespace fusedopt::cpu {
inline namespace CPU_CAPABILITY {

// Elements per tile: a few fp32 rows of 4 KiB. A multiple of kSumLanes and of every register width, so a tile
// boundary never splits a register and the tensor sums add in the same pattern on every variant.
constexpr int64_t kTile = 1024;
static_assert(kTile % kSumLanes == 0, "tiles keep the tensor sums' lane pattern");

// n elements of `type` at from[0..n) to fp32, in registers.
template <typename scalar_t>
void widen(const scalar_t* from, float* to, int64_t n) {
  using L = Lanes<scalar_t>;
  constexpr int64_t kLanes = Vectorized<float>::size();
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth) {
    Vectorized<float> v[L::kParts];
    L::template load<true>(from + j, L::kWidth, v);
    for (int part = 0; part < L::kParts; ++part) v[part].store(to + j + part * kLanes);
  }
  if (j < n) {
    Vectorized<float> v[L::kParts];
    L::template load<false>(from + j, n - j, v);
    for (int part = 0; part < L::kParts; ++part) {
      const int64_t count = std::min<int64_t>(kLanes, n - j - part * kLanes);
      if (count > 0) v[part].store(to + j + part * kLanes, count);
    }
  }
}

// n fp32 values back to `scalar_t`, rounded to nearest even (the plain kernels' conversion).
template <typename scalar_t>
void narrow_nearest(const float* from, scalar_t* to, int64_t n) {
  using L = Lanes<scalar_t>;
  constexpr int64_t kLanes = Vectorized<float>::size();
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth) {
    Vectorized<float> v[L::kParts];
    for (int part = 0; part < L::kParts; ++part) v[part] = Vectorized<float>::loadu(from + j + part * kLanes);
    L::template store<true>(to + j, L::kWidth, v);
  }
  if (j < n) {
    Vectorized<float> v[L::kParts];
    for (int part = 0; part < L::kParts; ++part) {
      const int64_t count = std::min<int64_t>(kLanes, n - j - part * kLanes);
      v[part] = count > 0 ? Vectorized<float>::loadu(from + j + part * kLanes, count) : Vectorized<float>(0.0f);
    }
    L::template store<false>(to + j, n - j, v);
  }
}

inline void widen_stored(const void* from, int32_t type, int64_t offset, float* to, int64_t n) {
  if (type == kStoredBFloat16) {
    widen(static_cast<const c10::BFloat16*>(from) + offset, to, n);
  } else if (type == kStoredHalf) {
    widen(static_cast<const c10::Half*>(from) + offset, to, n);
  } else {
    std::copy_n(static_cast<const float*>(from) + offset, n, to);
  }
}

// Stores n fp32 values at elements [offset, offset + n) of a `type` buffer: rounded to nearest (vectorized), or
// stochastically with the buffer's random stream (the same function per element as the CUDA kernel).
inline void narrow_stored(const float* from, void* to, int32_t type, int64_t offset, int64_t n, bool stochastic,
                          const RandomKey& key) {
  if (type == kStoredFloat) {
    std::copy_n(from, n, static_cast<float*>(to) + offset);
  } else if (!stochastic) {
    if (type == kStoredBFloat16) {
      narrow_nearest(from, static_cast<c10::BFloat16*>(to) + offset, n);
    } else {
      narrow_nearest(from, static_cast<c10::Half*>(to) + offset, n);
    }
  } else if (type == kStoredBFloat16) {
    c10::BFloat16* out = static_cast<c10::BFloat16*>(to) + offset;
    for (int64_t j = 0; j < n; ++j) out[j] = stochastic_bfloat16(from[j], random_bits(key, offset + j));
  } else {
    c10::Half* out = static_cast<c10::Half*>(to) + offset;
    for (int64_t j = 0; j < n; ++j) out[j] = stochastic_half(from[j], random_bits(key, offset + j));
  }
}

// One tile's fp32 view of a tensor: each pointer is the buffer itself where it is fp32 (updated in place),
// else a scratch row the tile's values are widened into.
template <int kStates>
struct Tile {
  alignas(64) float param[kTile];
  alignas(64) float grad[kTile];
  alignas(64) float state[kStates > 0 ? kStates : 1][kTile];
  TensorEntry view{};

  // Widens elements [start, start + n) of `e` and points `view` at the fp32 values.
  void load(const TensorEntry& e, const StoragePolicy& policy, int64_t start, int64_t n) {
    if (policy.has_master) {
      view.param = static_cast<float*>(e.extra) + start;
    } else if (policy.param_type == kStoredFloat) {
      view.param = static_cast<float*>(e.param) + start;
    } else {
      widen_stored(e.param, policy.param_type, start, param, n);
      if (policy.has_kahan) {
        widen_stored(e.extra, policy.param_type, start, grad, n);  // grad's row is free until just below
        for (int64_t j = 0; j < n; ++j) param[j] += grad[j];
      }
      view.param = param;
    }
    if (policy.param_type == kStoredFloat) {
      view.grad = static_cast<const float*>(e.grad) + start;
    } else {
      widen_stored(e.grad, policy.param_type, start, grad, n);
      view.grad = grad;
    }
    for (int k = 0; k < kStates; ++k) {
      if (policy.state_type == kStoredFloat) {
        view.state[k] = static_cast<float*>(e.state[k]) + start;
      } else {
        widen_stored(e.state[k], policy.state_type, start, state[k], n);
        view.state[k] = state[k];
      }
    }
  }

  // Writes the updated tile back: states with the launch's rounding, the param from the fp32 value (the master
  // copy already holds it), a Kahan param as its nearest value plus the compensation for the rest (what
  // storage.h's store_param does per element, here in registers: the grad's row is free by now).
  void store(const TensorEntry& e, const ElementStore& store, int64_t start, int64_t n) {
    const StoragePolicy& policy = store.policy;
    const bool stochastic = policy.rounding == kStochastic;
    for (int k = 0; k < kStates; ++k) {
      if (policy.state_type != kStoredFloat) {
        narrow_stored(state[k], e.state[k], policy.state_type, start, n, stochastic, store.state_keys[k]);
      }
    }
    if (policy.param_type == kStoredFloat) return;  // updated in place
    const float* value = static_cast<const float*>(view.param);
    if (policy.has_kahan) {
      narrow_stored(value, e.param, policy.param_type, start, n, false, store.param_key);
      widen_stored(e.param, policy.param_type, start, grad, n);
      for (int64_t j = 0; j < n; ++j) grad[j] = value[j] - grad[j];  // exact: within a factor of two
      narrow_stored(grad, e.extra, policy.param_type, start, n, false, store.param_key);
    } else {
      narrow_stored(value, e.param, policy.param_type, start, n, stochastic, store.param_key);
    }
  }
};

template <typename Rule>
void stored_update_range(const TensorEntry& entry, const ElementStore& store, const Rule& rule, float grad_factor,
                         int64_t begin, int64_t end) {
  static_assert(std::is_same_v<typename Rule::opmath_t, float>, "the stored path computes in fp32");
  Tile<Rule::kNumStates> tile;
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = std::min(kTile, end - start);
    tile.load(entry, store.policy, start, n);
    update_range<float, Rule>(tile.view, rule, grad_factor, 0, n);
    tile.store(entry, store, start, n);
  }
}

template <typename Rule>
void stored_tensor_sums_range(const TensorEntry& entry, const ElementStore& store, const Rule& rule,
                              float grad_factor, int64_t begin, int64_t end, double* sums) {
  Tile<Rule::kNumStates> tile;
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = std::min(kTile, end - start);
    tile.load(entry, store.policy, start, n);
    tensor_sums_range<float, Rule>(tile.view, rule, grad_factor, 0, n, sums);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu
