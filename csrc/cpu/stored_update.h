// The CPU kernels of the stored path (csrc/storage.h): params or states in another dtype than the rule's math,
// rounded stochastically, Kahan-compensated, or updated through an fp32 master copy. The update walks its range
// one bf16 register's worth (two fp32 registers) at a time, as the plain kernel walks bf16: every buffer is
// loaded and converted in registers by its storage type, the rule runs on fp32 registers, and each buffer is
// stored back with its rounding. So a mode moves only its own extra bytes: the master copy or the compensation
// buffer, or other state bytes. The storage types are a table field in the general kernel (StoragePolicy: a
// branch per register) and constants in the kernels of the layouts users name (FixedPolicy, cpu_kernels.h's
// kFixedLayouts), where those branches fold away.
// The per-tensor sums of LAMB's stored path load the same registers and add the rule's tensor terms
// (accumulate_tensor_terms, shared with the plain kernel).
//
// Included by csrc/cpu/update_kernels.h after update_range and tensor_sums_range: the same per-variant
// namespace, compiled once per instruction set.
#pragma once

#include <limits>

#include "storage.h"

namespace fusedopt::cpu {
inline namespace CPU_CAPABILITY {

// ---- Registers ----

constexpr int kParts = 2;  // fp32 registers per step: one bf16/fp16 register's worth
constexpr int64_t kLanes = Vectorized<float>::size();
constexpr int64_t kStepWidth = kParts * kLanes;
using Regs = Vectorized<float>[kParts];

// Elements [i, i + count) of a buffer of storage `type`, as fp32 registers (lanes past count are zero).
template <bool kFull>
C10_ALWAYS_INLINE void load_regs(const void* base, int32_t type, int64_t i, int64_t count, Regs& out) {
  if (type == kStoredBFloat16) {
    Lanes<c10::BFloat16>::template load<kFull>(static_cast<const c10::BFloat16*>(base) + i, count, out);
  } else if (type == kStoredHalf) {
    Lanes<c10::Half>::template load<kFull>(static_cast<const c10::Half*>(base) + i, count, out);
  } else {
    const float* from = static_cast<const float*>(base) + i;
    for (int part = 0; part < kParts; ++part) {
      const int64_t lanes = std::clamp<int64_t>(count - part * kLanes, 0, kLanes);
      out[part] = kFull ? Vectorized<float>::loadu(from + part * kLanes)
                        : (lanes > 0 ? Vectorized<float>::loadu(from + part * kLanes, lanes) : Vectorized<float>(0.0f));
    }
  }
}

#if defined(FUSEDOPT_INT_LANES)
static_assert(kParts == 2, "a bf16 register holds two fp32 registers (int_lanes.h's RoundedBits)");

// Stores bf16 values held as fp32 bits (int_lanes.h's RoundedBits) as elements [0, count) of `to`.
template <bool kFull>
C10_ALWAYS_INLINE void store_rounded_bits(c10::BFloat16* to, int64_t count, const RoundedBits& bits) {
  const Vectorized<c10::BFloat16> packed = IntLanes::high_halves(bits[0], bits[1]);
  if constexpr (kFull) {
    packed.store(to);
  } else {
    packed.store(to, count);
  }
}

// storage.h's random_bits(key, index + lane) on every lane but mix32's last xorshift (x ^ x >> 16), for indices
// below 2^32 (past that the draws mix in the index's high word, and the callers take the scalar path). mix32's
// first xorshift is split by linearity: with y the index lanes and k the key's term, (y ^ k) ^ ((y ^ k) >> 16) =
// (y ^ y >> 16) ^ (k ^ k >> 16), so the index's half is the same expression for every buffer of a step (computed
// once) and the key's a per-tensor constant: one xor per buffer where the xorshift took three operations. On the
// bf16 kernels, bound by their vector ports, each operation of the hash costs time (AdamW draws three streams).
C10_ALWAYS_INLINE IntLanes::R random_lanes_unfinished(const RandomKey& key, int64_t index) {
  using V = IntLanes;
  const V::R lanes = V::add(V::set(uint32_t(index)), V::iota());
  V::R x = V::xor_lanes(V::xorshift<16>(lanes), V::set(key.folded ^ (key.folded >> 16)));
  x = V::mul(x, V::constant<0x85ebca6bu>());  // storage.h's mix32 from its first multiply
  return V::mul(V::xorshift<13>(x), V::constant<0xc2b2ae35u>());
}

// storage.h's random_bits(key, index + lane) on every lane (the same bounds).
C10_ALWAYS_INLINE IntLanes::R random_lanes(const RandomKey& key, int64_t index) {
  return IntLanes::xorshift<16>(random_lanes_unfinished(key, index));
}
#endif

// ---- The random words of stochastic rounding ----

// One step's random bits for the bf16 or fp16 elements [first, first + kStepWidth) of one buffer, as 16-bit words
// zero-extended in integer lanes: storage.h's random_bits16(key, element) for each. One hash per two elements:
// the draws of pairs first / 2 + lane, whose 16-bit words are the elements' random bits in order.
struct Words {
#if defined(FUSEDOPT_INT_LANES)
  IntLanes::R part[kParts];
#endif
};

// Whether a step starting at element `first` draws its words in integer lanes: an even first element (pairs line
// up with the words) and pairs below 2^32 (past that the draws mix in the index's high word). Otherwise its
// stochastic stores draw per element (the scalar path).
C10_ALWAYS_INLINE bool lane_draws_at(int64_t first) {
#if defined(FUSEDOPT_INT_LANES)
  return (first & 1) == 0 && (((first >> 1) + kLanes) >> 32) == 0;
#else
  static_cast<void>(first);
  return false;  // the baseline variant has no integer lanes
#endif
}

// The words of `key`'s stream for the step at `first` (lane_draws_at(first) must hold).
C10_ALWAYS_INLINE void draw_words(const RandomKey& key, int64_t first, Words& out) {
#if defined(FUSEDOPT_INT_LANES)
  IntLanes::widen_words(random_lanes(key, first >> 1), out.part);
#endif
}

// Stores one step's registers as bf16 elements [first, first + count), rounded stochastically with `key`'s stream:
// storage.h's stochastic_bfloat16(value, random_bits16(key, element)), with the step's words when it drew them
// (`words`, see stored_update_body), else element by element.
template <bool kFull>
C10_ALWAYS_INLINE void store_stochastic_bfloat16(c10::BFloat16* to, int64_t count, const Regs& in,
                                                 const RandomKey& key, int64_t first, const Words* words) {
#if defined(FUSEDOPT_INT_LANES)
  if (words != nullptr) {
    RoundedBits rounded;
    for (int part = 0; part < kParts; ++part) rounded[part] = IntLanes::add_or_quiet_nan(in[part], words->part[part]);
    store_rounded_bits<kFull>(to, count, rounded);
    return;
  }
#endif
  float lanes[kStepWidth];
  for (int part = 0; part < kParts; ++part) in[part].store(lanes + part * kLanes);
  for (int64_t j = 0; j < count; ++j) to[j] = stochastic_bfloat16(lanes[j], random_bits16(key, first + j));
}

#if defined(FUSEDOPT_INT_LANES)
// What stochastic_half makes of the lanes past 65504 (`b`: their bits, `a`: their magnitude bits): c10's
// conversion to nearest (65504 short of fp16's overflow threshold 65520, then inf), NaN as c10's quiet NaN, which
// the instruction's conversion would not make of a NaN with another payload. Rare: the kernel tests for any first.
C10_ALWAYS_INLINE IntLanes::H half_past_largest(IntLanes::R b, IntLanes::R a) {
  using V = IntLanes;
  const V::M nan = V::less(V::constant<0x7f800000u>(), a);
  return V::half_nearest(V::floats(V::pick(nan, V::copy_sign(V::constant<0x7fc00000u>(), b), b)));
}

// storage.h's stochastic_half(v, word) on every lane, bit for bit, as fp16 bits. Below 2^-14 the value is moved
// by 2^-14 of its own sign into [2^-14, 2^-13) (a rounded add, as the scalar's on the magnitude); there and in
// the rest of fp16's normal range, the word's top 13 bits (word >> 3: the words arrive zero-extended) added to the
// bits and a truncating conversion to fp16 keep what clearing the 13 bits fp16 drops keeps, sign included. The
// move is taken back on the fp16 bits: [2^-14, 2^-13] is encoded linearly from 0x0400, 2^-14, so subtracting
// 0x0400 subtracts 2^-14 exactly. No branch but for values past 65504.
C10_ALWAYS_INLINE IntLanes::H stochastic_half_lanes(const Vectorized<float>& v, IntLanes::R word) {
  using V = IntLanes;
  const V::R b = V::bits(v), a = V::and_lanes(b, V::constant<0x7fffffffu>());
  const V::M small = V::less(a, V::constant<0x38800000u>());
  const Vectorized<float> moved = V::add_where(small, v, V::copy_sign(V::constant<0x38800000u>(), b));
  const V::R carried = V::add(V::bits(moved), V::shift_right<3>(word));
  V::H result = V::half_sub_where<0x0400u>(small, V::half_toward_zero(V::floats(carried)));
  const V::M past = V::less(V::constant<0x477fe000u>(), a);
  if (V::any(past)) result = V::half_pick(past, half_past_largest(b, a), result);
  return result;
}
#endif

// Stores one step's registers as fp16 elements [first, first + count), rounded stochastically with `key`'s
// stream: storage.h's stochastic_half(value, random_bits16(key, element)), with the step's words when it drew them
// (`words`, as for bf16), else element by element.
template <bool kFull>
C10_ALWAYS_INLINE void store_stochastic_half(c10::Half* to, int64_t count, const Regs& in, const RandomKey& key,
                                             int64_t first, const Words* words) {
#if defined(FUSEDOPT_INT_LANES)
  if (words != nullptr) {
    c10::Half partial[kStepWidth];  // a partial step's elements, before the ones it stores are copied out
    c10::Half* out = kFull ? to : partial;
    for (int part = 0; part < kParts; ++part) {
      IntLanes::store_halves(out + part * kLanes, stochastic_half_lanes(in[part], words->part[part]));
    }
    if (!kFull) std::copy_n(partial, count, to);
    return;
  }
#endif
  float lanes[kStepWidth];
  for (int part = 0; part < kParts; ++part) in[part].store(lanes + part * kLanes);
  for (int64_t j = 0; j < count; ++j) to[j] = stochastic_half(lanes[j], random_bits16(key, first + j));
}

// How a store rounds: to nearest (no key), or stochastically with *key's stream, with the step's words when it
// drew them (`words`).
struct StoreRounding {
  const RandomKey* key = nullptr;
  const Words* words = nullptr;
};

// Stores fp32 registers as elements [i, i + count) of a buffer of storage `type`, rounded as `rounding` says.
template <bool kFull>
C10_ALWAYS_INLINE void store_regs(void* base, int32_t type, int64_t i, int64_t count, const Regs& in,
                                  const StoreRounding& rounding = {}) {
  if (type == kStoredBFloat16) {
    if (rounding.key != nullptr) {
      store_stochastic_bfloat16<kFull>(static_cast<c10::BFloat16*>(base) + i, count, in, *rounding.key, i,
                                       rounding.words);
    } else {
      Lanes<c10::BFloat16>::template store<kFull>(static_cast<c10::BFloat16*>(base) + i, count, in);
    }
  } else if (type == kStoredHalf) {
    if (rounding.key != nullptr) {
      store_stochastic_half<kFull>(static_cast<c10::Half*>(base) + i, count, in, *rounding.key, i, rounding.words);
    } else {
      Lanes<c10::Half>::template store<kFull>(static_cast<c10::Half*>(base) + i, count, in);
    }
  } else {
    float* to = static_cast<float*>(base) + i;
    for (int part = 0; part < kParts; ++part) {
      const int64_t lanes = std::clamp<int64_t>(count - part * kLanes, 0, kLanes);
      if (kFull) {
        in[part].store(to + part * kLanes);
      } else if (lanes > 0) {
        in[part].store(to + part * kLanes, lanes);
      }
    }
  }
}

// The value the rule updates: the master copy, or the param (plus its compensation).
template <bool kFull, typename Policy>
C10_ALWAYS_INLINE void load_param_regs(const TensorEntry& e, const Policy& policy, int64_t i, int64_t count,
                                       Regs& out) {
  if (policy.has_master) {
    load_regs<kFull>(e.extra, kStoredFloat, i, count, out);
    return;
  }
  load_regs<kFull>(e.param, policy.param_type, i, count, out);
  if (policy.has_kahan) {
    Regs comp;
    load_regs<kFull>(e.extra, policy.param_type, i, count, comp);
    for (int part = 0; part < kParts; ++part) out[part] = out[part] + comp[part];
  }
}

// Kahan's param: the value rounded to nearest, stored, and as fp32 registers in `stored`. For bf16 c10's
// round-to-nearest-even in integer lanes (bias 0x7fff plus the kept part's lowest bit), stored by truncation;
// otherwise converted on the store and read back.
template <bool kFull, typename Policy>
C10_ALWAYS_INLINE void store_nearest_param(const TensorEntry& e, const Policy& policy, int64_t i, int64_t count,
                                           const Regs& value, Regs& stored) {
#if defined(FUSEDOPT_INT_LANES)
  if (policy.param_type == kStoredBFloat16) {
    using V = IntLanes;
    RoundedBits nearest;
    for (int part = 0; part < kParts; ++part) {
      const V::R bias = V::add(V::high_half_parity(V::bits(value[part])), V::set(0x7fffu));
      nearest[part] = V::and_lanes(V::add_or_quiet_nan(value[part], bias), V::set(0xffff0000u));
      stored[part] = V::floats(nearest[part]);
    }
    store_rounded_bits<kFull>(static_cast<c10::BFloat16*>(e.param) + i, count, nearest);
    return;
  }
#endif
  store_regs<kFull>(e.param, policy.param_type, i, count, value);
  load_regs<kFull>(e.param, policy.param_type, i, count, stored);
}

// storage.h's store_param on registers: the master copy and the param's rounding of it (`rounding`); the nearest
// param and the rest as compensation (value - stored is exact: the two are within a factor of two); or the param
// rounded.
template <bool kFull, typename Policy>
C10_ALWAYS_INLINE void store_param_regs(const TensorEntry& e, const Policy& policy, const StoreRounding& rounding,
                                        int64_t i, int64_t count, const Regs& value) {
  if (policy.has_master) store_regs<kFull>(e.extra, kStoredFloat, i, count, value);
  if (policy.has_kahan) {
    Regs stored;
    store_nearest_param<kFull>(e, policy, i, count, value, stored);
    for (int part = 0; part < kParts; ++part) stored[part] = value[part] - stored[part];
    store_regs<kFull>(e.extra, policy.param_type, i, count, stored);
    return;
  }
  store_regs<kFull>(e.param, policy.param_type, i, count, value, rounding);
}

// Everything one step reads: the value the rule updates, the grad and each state buffer, as fp32 registers.
template <bool kFull, int kStates, typename Policy>
C10_ALWAYS_INLINE void load_step(const TensorEntry& entry, const Policy& policy, int64_t i, int64_t count,
                                 Regs& p, Regs& g, Regs (&s)[kStates > 0 ? kStates : 1]) {
  load_param_regs<kFull>(entry, policy, i, count, p);
  load_regs<kFull>(entry.grad, policy.param_type, i, count, g);
  for (int k = 0; k < kStates; ++k) load_regs<kFull>(entry.state[k], policy.state_type, i, count, s[k]);
}

// The rule on each of a step's fp32 registers.
template <typename Rule, int kSlots>
C10_ALWAYS_INLINE void apply_rule(const Rule& rule, const Vectorized<float>& factor, Regs& p, const Regs& g,
                                  Regs (&s)[kSlots]) {
  constexpr int kStates = Rule::kNumStates;
  for (int part = 0; part < kParts; ++part) {
    Vectorized<float> st[kStates > 0 ? kStates : 1];
    for (int k = 0; k < kStates; ++k) st[k] = s[k][part];
    rule(p[part], g[part] * factor, st);
    for (int k = 0; k < kStates; ++k) s[k][part] = st[k];
  }
}

#if defined(FUSEDOPT_INT_LANES)
// ---- Steps whose every buffer is bf16, in pairs ----
// Such a step (bf16 params, grads and states, and Kahan's compensation; not a master copy or fp32 state) loads and
// stores every buffer in element pairs (int_lanes.h), and its random words fall out of the draws the same way:
// draw j's low half is element 2j's, its high half element 2j + 1's, so the words need no shuffle either.
template <typename Policy>
constexpr bool all_bf16(const Policy& policy) {
  return policy.param_type == kStoredBFloat16 && policy.state_type == kStoredBFloat16 && !policy.has_master;
}

// One whole step of an all-bf16 layout at an even element i (the draws' pairs start there): storage.h's
// load_param / store_param / store_state per element, as stored_update_body does.
template <typename Policy, typename Rule>
C10_ALWAYS_INLINE void paired_bf16_step(const TensorEntry& entry, const Policy& policy, const ElementStore& store,
                                        const Rule& rule, const Vectorized<float>& factor, int64_t i) {
  using V = IntLanes;
  constexpr int kStates = Rule::kNumStates;
  const bool stochastic = policy.rounding == kStochastic;
  V::R draws[1 + kStates];
  if (stochastic) {  // before the loads and the math, as stored_update_body draws its words
    if (!policy.has_kahan) draws[0] = random_lanes_unfinished(store.param_key, i >> 1);
    for (int k = 0; k < kStates; ++k) draws[1 + k] = random_lanes_unfinished(store.state_keys[k], i >> 1);
  }
  Regs p, g, s[kStates > 0 ? kStates : 1];
  load_pairs(entry.param, i, p);
  if (policy.has_kahan) {
    Regs comp;
    load_pairs(entry.extra, i, comp);
    for (int part = 0; part < kParts; ++part) p[part] = p[part] + comp[part];
  }
  load_pairs(entry.grad, i, g);
  for (int k = 0; k < kStates; ++k) load_pairs(entry.state[k], i, s[k]);
  apply_rule(rule, factor, p, g, s);
  RoundedBits rounded;
  round_pairs(p, stochastic && !policy.has_kahan ? &draws[0] : nullptr, rounded);
  store_pairs(entry.param, i, rounded);
  if (policy.has_kahan) {  // the rest, exact (within a factor of two of the value), rounded to nearest
    Regs rest;
    for (int part = 0; part < kParts; ++part) {
      rest[part] = p[part] - V::floats(V::and_lanes(rounded[part], V::constant<0xffff0000u>()));
    }
    round_pairs(rest, nullptr, rounded);
    store_pairs(entry.extra, i, rounded);
  }
  for (int k = 0; k < kStates; ++k) {
    round_pairs(s[k], stochastic ? &draws[1 + k] : nullptr, rounded);
    store_pairs(entry.state[k], i, rounded);
  }
}
#endif

// One step of the update: kStepWidth elements (count of them valid), loaded, updated and stored in registers.
// kLaneDraws: the step draws its stochastic bf16/fp16 words in integer lanes (lane_draws_at), before its loads and
// math: they depend on the index and the keys alone, and drawn at the stores they came after the rule's divide
// and square-root chains, which left the out-of-order window no room to overlap them (bf16 AdamW, one thread of a
// 2-core Intel Xeon: 1.47x round-to-nearest's step time, 1.30x so). A template flag, not a per-store test, so a
// fixed layout's kernel (FixedPolicy) has no branch on it between the draws and the stores.
template <bool kFull, bool kLaneDraws, typename Policy, typename Rule>
C10_ALWAYS_INLINE void stored_update_body(const TensorEntry& entry, const Policy& policy, const ElementStore& store,
                                          const Rule& rule, const Vectorized<float>& factor, int64_t i,
                                          int64_t count) {
  constexpr int kStates = Rule::kNumStates;
  StoreRounding param_rounding, state_rounding[kStates > 0 ? kStates : 1];
  Words words[1 + kStates];
  if (policy.rounding == kStochastic) {
    if (!policy.has_kahan) {
      const bool drawn = kLaneDraws && policy.param_type != kStoredFloat;
      if (drawn) draw_words(store.param_key, i, words[0]);
      param_rounding = {&store.param_key, drawn ? &words[0] : nullptr};
    }
    const bool drawn = kLaneDraws && policy.state_type != kStoredFloat;
    for (int k = 0; k < kStates; ++k) {
      if (drawn) draw_words(store.state_keys[k], i, words[1 + k]);
      state_rounding[k] = {&store.state_keys[k], drawn ? &words[1 + k] : nullptr};
    }
  }
  Regs p, g, s[kStates > 0 ? kStates : 1];
  load_step<kFull, kStates>(entry, policy, i, count, p, g, s);
  apply_rule(rule, factor, p, g, s);
  store_param_regs<kFull>(entry, policy, param_rounding, i, count, p);
  for (int k = 0; k < kStates; ++k) {
    store_regs<kFull>(entry.state[k], policy.state_type, i, count, s[k], state_rounding[k]);
  }
}

template <bool kFull, typename Policy, typename Rule>
C10_ALWAYS_INLINE void stored_update_step(const TensorEntry& entry, const Policy& policy, const ElementStore& store,
                                          const Rule& rule, const Vectorized<float>& factor, int64_t i,
                                          int64_t count) {
#if defined(FUSEDOPT_INT_LANES)
  if (kFull && all_bf16(policy) && (policy.rounding != kStochastic || lane_draws_at(i))) {
    paired_bf16_step(entry, policy, store, rule, factor, i);
    return;
  }
#endif
  if (policy.rounding == kStochastic && lane_draws_at(i)) {
    stored_update_body<kFull, true>(entry, policy, store, rule, factor, i, count);
  } else {
    stored_update_body<kFull, false>(entry, policy, store, rule, factor, i, count);
  }
}

// update_kernels.h's prefetch_ahead for one buffer of storage `type` at step i: kStepWidth elements are 64 bytes
// of a 2-byte buffer, 128 (two lines) of an fp32 one. (Functions, not lambdas: always inlined, as a call here
// would spill every vector register of the step around it.)
C10_ALWAYS_INLINE void prefetch_buffer(const void* base, int32_t type, int64_t i, bool written) {
  const int64_t bytes = type == kStoredFloat ? 4 : 2;
  prefetch_ahead(base, i * bytes, written);
  if (bytes * kStepWidth > 64) prefetch_ahead(base, i * bytes + 64, written);
}

template <typename Policy>
C10_ALWAYS_INLINE void prefetch_step(const TensorEntry& entry, const Policy& policy, int k_states, int64_t i) {
  prefetch_buffer(entry.param, policy.param_type, i, true);
  prefetch_buffer(entry.grad, policy.param_type, i, false);
  if (policy.has_master || policy.has_kahan) {  // the buffers TensorEntry::extra holds
    prefetch_buffer(entry.extra, policy.has_master ? kStoredFloat : policy.param_type, i, true);
  }
  for (int k = 0; k < k_states; ++k) prefetch_buffer(entry.state[k], policy.state_type, i, true);
}

// A storage layout fixed at compile time (cpu_kernels.h's kFixedLayouts[kLayout]): the same fields as
// StoragePolicy, read the same way by the functions above, but constants, so each branch on them folds away.
template <int kLayout>
struct FixedPolicy {
  static constexpr StoragePolicy kFixed = kFixedLayouts[kLayout].policy;
  static constexpr int32_t rounding = kFixed.rounding, param_type = kFixed.param_type,
                           state_type = kFixed.state_type, has_master = kFixed.has_master,
                           has_kahan = kFixed.has_kahan;
};

// The update of elements [begin, end) of one tensor, its storage read from `store` (Policy = StoragePolicy: the
// general kernel) or fixed (Policy = FixedPolicy<j>, for a launch whose policy is that layout).
template <typename Rule, typename Policy>
void stored_update_range(const TensorEntry& entry, const ElementStore& store, const Rule& rule, float grad_factor,
                         int64_t begin, int64_t end) {
  static_assert(std::is_same_v<typename Rule::opmath_t, float>, "the stored path computes in fp32");
  const Vectorized<float> factor(grad_factor);
  const ElementStore local = store;  // a local copy the loop can keep in registers (no aliasing with the stores)
  Policy policy{};
  if constexpr (std::is_same_v<Policy, StoragePolicy>) policy = local.policy;
  int64_t i = begin;
  for (; i + kStepWidth <= end; i += kStepWidth) {
    prefetch_step(entry, policy, Rule::kNumStates, i);
    stored_update_step<true>(entry, policy, local, rule, factor, i, kStepWidth);
  }
  if (i < end) stored_update_step<false>(entry, policy, local, rule, factor, i, end - i);
}

// The per-tensor sums (LAMB): the same loads, nothing stored.
template <typename Rule>
void stored_tensor_sums_range(const TensorEntry& entry, const ElementStore& store, const Rule& rule,
                              float grad_factor, int64_t begin, int64_t end, double* sums) {
  constexpr int kStates = Rule::kNumStates;
  accumulate_tensor_terms<kParts, kStepWidth>(
      rule, grad_factor, begin, end, sums, [&](int64_t i, int64_t count, auto full, auto& p, auto& g, auto& s) {
        if constexpr (decltype(full)::value) prefetch_step(entry, store.policy, kStates, i);
        load_step<decltype(full)::value, kStates>(entry, store.policy, i, count, p, g, s);
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu
