// The CPU kernels of the stored path (csrc/storage.h): params or states in another dtype than the rule's math,
// rounded stochastically, Kahan-compensated, or updated through an fp32 master copy. The update walks its range
// one bf16 register's worth (two fp32 registers) at a time, as the plain kernel walks bf16: every buffer is
// loaded and converted in registers by its storage type (a table field: one well-predicted branch per
// register), the rule runs on fp32 registers, and each buffer is stored back with its rounding. So a mode moves
// only its own extra bytes: the master copy or the compensation buffer, or other state bytes.
// The per-tensor sums of LAMB's stored path load the same registers and add the rule's tensor terms
// (accumulate_tensor_terms, shared with the plain kernel).
//
// Included by csrc/cpu/update_kernels.h after update_range and tensor_sums_range: the same per-variant
// namespace, compiled once per instruction set.
#pragma once

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

// The random bits and the bf16 rounding of one fp32 register, with the instruction set's integer lanes (shifts by
// an immediate, 32-bit multiplies): storage.h's random_bits and stochastic_bfloat16 on every lane, bit for bit.
#if defined(CPU_CAPABILITY_AVX512)
struct IntLanes {
  using R = __m512i;
  static R set(uint32_t v) { return _mm512_set1_epi32(int32_t(v)); }
  static R iota() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
  template <int kShift>
  static R xorshift(R x) { return _mm512_xor_si512(x, _mm512_srli_epi32(x, kShift)); }
  static R high_half_parity(R x) { return _mm512_and_si512(_mm512_srli_epi32(x, 16), set(1)); }
  static R mul(R a, R b) { return _mm512_mullo_epi32(a, b); }
  static R add(R a, R b) { return _mm512_add_epi32(a, b); }
  static R xor_lanes(R a, R b) { return _mm512_xor_si512(a, b); }
  static R and_lanes(R a, R b) { return _mm512_and_si512(a, b); }
  static R bits(const Vectorized<float>& v) { return _mm512_castps_si512(v); }
  static Vectorized<float> round_or_nan(const Vectorized<float>& value, R rounded) {
    const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), nan, value);
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct IntLanes {
  using R = __m256i;
  static R set(uint32_t v) { return _mm256_set1_epi32(int32_t(v)); }
  static R iota() { return _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0); }
  template <int kShift>
  static R xorshift(R x) { return _mm256_xor_si256(x, _mm256_srli_epi32(x, kShift)); }
  static R high_half_parity(R x) { return _mm256_and_si256(_mm256_srli_epi32(x, 16), set(1)); }
  static R mul(R a, R b) { return _mm256_mullo_epi32(a, b); }
  static R add(R a, R b) { return _mm256_add_epi32(a, b); }
  static R xor_lanes(R a, R b) { return _mm256_xor_si256(a, b); }
  static R and_lanes(R a, R b) { return _mm256_and_si256(a, b); }
  static R bits(const Vectorized<float>& v) { return _mm256_castps_si256(v); }
  static Vectorized<float> round_or_nan(const Vectorized<float>& value, R rounded) {
    const __m256 nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), value, nan);
  }
};
#endif

// The fp32 values rounded stochastically to bf16, still as fp32 (low 16 bits zero, so the nearest conversion
// that stores them is exact): storage.h's stochastic_bfloat16(value, random_bits(key, first + lane)) per lane.
C10_ALWAYS_INLINE Vectorized<float> stochastic_bfloat16_lanes(const Vectorized<float>& value, const RandomKey& key,
                                                              int64_t first) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = IntLanes;
  static_assert(sizeof(V::R) == sizeof(Vectorized<float>), "one int32 lane per fp32 lane");
  if (((first + kLanes) >> 32) == 0) {  // past 2^32 the random bits mix in the index's high word: per lane below
    auto mix32 = [](V::R x) {  // storage.h's mix32
      x = V::mul(V::xorshift<16>(x), V::set(0x85ebca6bu));
      x = V::mul(V::xorshift<13>(x), V::set(0xc2b2ae35u));
      return V::xorshift<16>(x);
    };
    const V::R index = V::add(V::set(uint32_t(first)), V::iota());
    const V::R random = mix32(V::xor_lanes(index, V::set(key.folded)));
    const V::R sum = V::add(V::bits(value), V::and_lanes(random, V::set(0xffffu)));
    return V::round_or_nan(value, V::and_lanes(sum, V::set(0xffff0000u)));
  }
#endif
  float lanes[kLanes];
  value.store(lanes);
  for (int64_t j = 0; j < kLanes; ++j) lanes[j] = float(stochastic_bfloat16(lanes[j], random_bits(key, first + j)));
  return Vectorized<float>::loadu(lanes);
}

// Kahan's nearest bf16 value of each lane, still as fp32 (false where the instruction set has no integer lanes
// here): c10's round-to-nearest-even (bias 0x7fff plus the kept part's lowest bit, then truncate).
C10_ALWAYS_INLINE bool nearest_bfloat16_lanes(const Vectorized<float>& value, Vectorized<float>& nearest) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = IntLanes;
  const V::R bits = V::bits(value);
  const V::R sum = V::add(bits, V::add(V::high_half_parity(bits), V::set(0x7fffu)));
  nearest = V::round_or_nan(value, V::and_lanes(sum, V::set(0xffff0000u)));
  return true;
#else
  (void)value;
  (void)nearest;
  return false;
#endif
}

// fp16 stochastic rounding goes through both neighbours (its spacing varies): the scalar rule per lane.
C10_ALWAYS_INLINE void store_stochastic_half(c10::Half* to, int64_t count, const Regs& in, const RandomKey& key, int64_t first) {
  float lanes[kStepWidth];
  for (int part = 0; part < kParts; ++part) in[part].store(lanes + part * kLanes);
  for (int64_t j = 0; j < count; ++j) to[j] = stochastic_half(lanes[j], random_bits(key, first + j));
}

// Stores fp32 registers as elements [i, i + count) of a buffer of storage `type`: to nearest, or stochastically
// with the buffer's stream.
template <bool kFull>
C10_ALWAYS_INLINE void store_regs(void* base, int32_t type, int64_t i, int64_t count, const Regs& in, bool stochastic,
                       const RandomKey& key) {
  if (type == kStoredBFloat16) {
    Regs rounded;
    for (int part = 0; part < kParts; ++part) {
      rounded[part] = stochastic ? stochastic_bfloat16_lanes(in[part], key, i + part * kLanes) : in[part];
    }
    Lanes<c10::BFloat16>::template store<kFull>(static_cast<c10::BFloat16*>(base) + i, count, rounded);
  } else if (type == kStoredHalf) {
    if (stochastic) {
      store_stochastic_half(static_cast<c10::Half*>(base) + i, count, in, key, i);
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
template <bool kFull>
C10_ALWAYS_INLINE void load_param_regs(const TensorEntry& e, const StoragePolicy& policy, int64_t i, int64_t count, Regs& out) {
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

// storage.h's store_param on registers: the master copy and the param's rounding of it; the nearest param and
// the rest as compensation (value - stored is exact: the two are within a factor of two); or the param rounded.
template <bool kFull>
C10_ALWAYS_INLINE void store_param_regs(const TensorEntry& e, const ElementStore& store, int64_t i, int64_t count,
                             const Regs& value) {
  const StoragePolicy& policy = store.policy;
  const bool stochastic = policy.rounding == kStochastic;
  if (policy.has_master) store_regs<kFull>(e.extra, kStoredFloat, i, count, value, false, store.param_key);
  if (policy.has_kahan) {
    Regs stored;
    bool in_registers = policy.param_type == kStoredBFloat16;
    for (int part = 0; part < kParts && in_registers; ++part) {
      in_registers = nearest_bfloat16_lanes(value[part], stored[part]);
    }
    // The nearest value, stored (exactly, when computed in registers), and read back where it was not.
    store_regs<kFull>(e.param, policy.param_type, i, count, in_registers ? stored : value, false, store.param_key);
    if (!in_registers) load_regs<kFull>(e.param, policy.param_type, i, count, stored);
    for (int part = 0; part < kParts; ++part) stored[part] = value[part] - stored[part];
    store_regs<kFull>(e.extra, policy.param_type, i, count, stored, false, store.param_key);
    return;
  }
  store_regs<kFull>(e.param, policy.param_type, i, count, value, stochastic, store.param_key);
}

// Everything one step reads: the value the rule updates, the grad and each state buffer, as fp32 registers.
template <bool kFull, int kStates>
C10_ALWAYS_INLINE void load_step(const TensorEntry& entry, const StoragePolicy& policy, int64_t i, int64_t count,
                                 Regs& p, Regs& g, Regs (&s)[kStates > 0 ? kStates : 1]) {
  load_param_regs<kFull>(entry, policy, i, count, p);
  load_regs<kFull>(entry.grad, policy.param_type, i, count, g);
  for (int k = 0; k < kStates; ++k) load_regs<kFull>(entry.state[k], policy.state_type, i, count, s[k]);
}

// One step of the update: kStepWidth elements (count of them valid), loaded, updated and stored in registers.
template <bool kFull, typename Rule>
C10_ALWAYS_INLINE void stored_update_step(const TensorEntry& entry, const ElementStore& store, const Rule& rule,
                                          const Vectorized<float>& factor, int64_t i, int64_t count) {
  constexpr int kStates = Rule::kNumStates;
  const StoragePolicy& policy = store.policy;
  const bool stochastic_states = policy.rounding == kStochastic;
  Regs p, g, s[kStates > 0 ? kStates : 1];
  load_step<kFull, kStates>(entry, policy, i, count, p, g, s);
  for (int part = 0; part < kParts; ++part) {
    Vectorized<float> st[kStates > 0 ? kStates : 1];
    for (int k = 0; k < kStates; ++k) st[k] = s[k][part];
    rule(p[part], g[part] * factor, st);
    for (int k = 0; k < kStates; ++k) s[k][part] = st[k];
  }
  store_param_regs<kFull>(entry, store, i, count, p);
  for (int k = 0; k < kStates; ++k) {
    store_regs<kFull>(entry.state[k], policy.state_type, i, count, s[k], stochastic_states, store.state_keys[k]);
  }
}

template <typename Rule>
void stored_update_range(const TensorEntry& entry, const ElementStore& store, const Rule& rule, float grad_factor,
                         int64_t begin, int64_t end) {
  static_assert(std::is_same_v<typename Rule::opmath_t, float>, "the stored path computes in fp32");
  const Vectorized<float> factor(grad_factor);
  const ElementStore local = store;  // a local copy the loop can keep in registers (no aliasing with the stores)
  int64_t i = begin;
  for (; i + kStepWidth <= end; i += kStepWidth) stored_update_step<true>(entry, local, rule, factor, i, kStepWidth);
  if (i < end) stored_update_step<false>(entry, local, rule, factor, i, end - i);
}

// The per-tensor sums (LAMB): the same loads, nothing stored.
template <typename Rule>
void stored_tensor_sums_range(const TensorEntry& entry, const ElementStore& store, const Rule& rule,
                              float grad_factor, int64_t begin, int64_t end, double* sums) {
  constexpr int kStates = Rule::kNumStates;
  accumulate_tensor_terms<kParts, kStepWidth>(
      rule, grad_factor, begin, end, sums, [&](int64_t i, int64_t count, auto full, auto& p, auto& g, auto& s) {
        load_step<decltype(full)::value, kStates>(entry, store.policy, i, count, p, g, s);
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu
