// How a launch stores what the update rules compute: the storage policy of low-precision training. The rules
// (update_rules.h, algorithms/*.h) always compute in fp32 (fp64 for fp64 params) and never see storage; this
// file says where the fp32 values come from and how they are rounded back, shared by the CPU kernels
// (csrc/cpu/stored_update.h) and the CUDA kernel (csrc/cuda_step.cuh), so both round identically:
//
//   param_rounding "nearest"     round to nearest even (what a plain cast does; the default)
//                  "stochastic"  round up or down with probability proportional to the distance, from a
//                                counter-based random stream (seed, counter, tensor, buffer, element): no state
//                                per element, the same bits on every device and in every CUDA-graph replay
//                  "kahan"       a compensation buffer in the param dtype (TensorEntry::extra) carries what
//                                rounding dropped: the param's value is param + comp, to ~16 significant bits
//   master params                an fp32 copy per param (TensorEntry::extra) is what the rule updates; the
//                                param receives its rounding (nearest or stochastic)
//   state dtype                  the moment buffers' dtype, independent of the param's (fp32 moments for bf16
//                                params, bf16 moments for fp32 params), written with the params' rounding
//                                (nearest, or stochastic when asked)
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <array>
#include <cstdint>
#include <string_view>

namespace fusedopt {

// The element types the stored path converts from and to (a table field, so the same kernel serves all).
enum StoredType : int32_t { kStoredFloat = 0, kStoredBFloat16 = 1, kStoredHalf = 2 };

// The param_rounding values, by the names the op's `param_rounding` argument takes (and Python validates
// against: fusedopt._C.param_rounding_modes()). Index = the Rounding value.
enum Rounding : int32_t { kNearest = 0, kStochastic = 1, kKahan = 2 };
inline constexpr std::array<std::string_view, 3> kRoundingNames{"nearest", "stochastic", "kahan"};

// What the table header says about storage. `stored` is 0 for a launch the plain kernels serve (params and
// states of one dtype, rounded to nearest, no master or compensation buffer): those run exactly as before.
struct StoragePolicy {
  int32_t stored;
  int32_t rounding;     // Rounding
  int32_t param_type;   // StoredType of params and grads
  int32_t state_type;   // StoredType of the state buffers
  int32_t has_master;   // TensorEntry::extra is the fp32 master param
  int32_t has_kahan;    // TensorEntry::extra is the compensation buffer (param dtype)
};

// Where one tensor's elements are written, for one launch: the policy and the random streams of its param (0)
// and state buffers (1 + k). Built once per (tensor, launch) by element_store(); data only, so the baseline
// runner and every CPU kernel variant pass it alike.
struct RandomKey {
  uint32_t low, high;
  uint32_t folded;  // low ^ mix32(high): random_bits' key term for every element below 2^32, computed once
};
struct ElementStore {
  StoragePolicy policy;
  RandomKey param_key;
  RandomKey state_keys[3];
};

}  // namespace fusedopt

// The functions below are compiled into the CPU kernel variants (csrc/cpu/stored_update.h) with each variant's
// instruction set: there they live in the variant's namespace, as everything such an object defines must
// (csrc/cpu/update_kernels.h), so the linker never hands an AVX-512 copy to the baseline CPU.
#if defined(CPU_CAPABILITY)
#define FUSEDOPT_STORAGE_NAMESPACE_BEGIN namespace fusedopt { inline namespace CPU_CAPABILITY {
#define FUSEDOPT_STORAGE_NAMESPACE_END } }
#else
#define FUSEDOPT_STORAGE_NAMESPACE_BEGIN namespace fusedopt {
#define FUSEDOPT_STORAGE_NAMESPACE_END }
#endif

FUSEDOPT_STORAGE_NAMESPACE_BEGIN

// ---- Conversions ----

C10_HOST_DEVICE inline float bits_to_float(uint32_t bits) { return c10::bit_cast<float>(bits); }
C10_HOST_DEVICE inline uint32_t float_to_bits(float value) { return c10::bit_cast<uint32_t>(value); }

C10_HOST_DEVICE inline float load_as_float(const void* base, int64_t i, int32_t type) {
  switch (type) {
    case kStoredBFloat16: return float(static_cast<const c10::BFloat16*>(base)[i]);
    case kStoredHalf: return float(static_cast<const c10::Half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// ---- The random stream ----

// murmur3's 32-bit finalizer: a bijection with full avalanche, so consecutive elements get unrelated bits.
C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// splitmix64's finalizer, for the per-(launch, tensor, buffer) key.
C10_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// The stream of one buffer of one tensor in one launch: buffer 0 is the param, 1 + k state buffer k.
C10_HOST_DEVICE inline RandomKey random_key(int64_t seed, int64_t counter, int64_t tensor, int buffer) {
  uint64_t key = mix64(uint64_t(seed) ^ mix64(uint64_t(counter) * 0x9e3779b97f4a7c15ull + uint64_t(tensor)));
  key = mix64(key + uint64_t(buffer) * 0xd1b54a32d192ed03ull);
  const uint32_t low = uint32_t(key), high = uint32_t(key >> 32);
  return RandomKey{low, high, low ^ mix32(high)};
}

// 32 random bits for element i: one round of mix32 over the index's low word, keyed by the key's low word and a
// mix of its high word with the index's high word. Below 2^32 elements that last term is one constant per
// buffer, so the CPU kernels hoist it and pay a single mix32 per element (a hash is most of stochastic
// rounding's cost on a CPU, where memory is fast next to 2 cores); the stream stays a bijection of the index.
C10_HOST_DEVICE inline uint32_t random_bits(const RandomKey& key, int64_t i) {
  const uint32_t high = uint32_t(uint64_t(i) >> 32);
  return mix32(uint32_t(i) ^ (high == 0 ? key.folded : key.low ^ mix32(key.high ^ high)));
}

// The 16 random bits the stochastic rounding of element i consumes, bf16 and fp16 alike: elements 2j and 2j + 1
// take the low and high halves of draw j: half as many hashes as a draw per element, and read as 16-bit words
// the draws of pairs j, j + 1, ... are the bits of elements 2j, 2j + 1, ... in order, so a vector kernel spreads
// them by zero-extending words. bf16 drops 16 bits of an fp32 and uses all 16; fp16 drops 13 and uses the top 13.
C10_HOST_DEVICE inline uint32_t random_bits16(const RandomKey& key, int64_t i) {
  return (random_bits(key, i >> 1) >> (uint32_t(i & 1) * 16u)) & 0xffffu;
}

// ---- Rounding fp32 to a low-precision type ----

// bf16 keeps the top 16 bits of an fp32: adding the 16 random bits below them and truncating rounds up with
// probability (dropped bits) / 2^16, i.e. proportional to the distance to the lower neighbour (a value above
// bf16's largest finite one may round up to inf, as it would to nearest past the midpoint). inf stays inf, NaN
// converts as to nearest.
C10_HOST_DEVICE inline c10::BFloat16 stochastic_bfloat16(float value, uint32_t word) {
  if (value != value) return c10::BFloat16(value);  // NaN: the payload must not carry into the sign
  const uint32_t bits = float_to_bits(value);  // inf + (< 2^16) truncates back to inf
  const uint32_t rounded = (bits + (word & 0xffffu)) & 0xffff0000u;
  return c10::BFloat16(uint16_t(rounded >> 16), c10::BFloat16::from_bits());
}

// fp16 rounds as bf16 does: the word's top 13 bits are added below the 10 mantissa bits fp16 keeps (the 13 it drops
// in its normal range) and the sum is truncated, which rounds away from zero with probability (dropped bits) / 2^13;
// a carry is the next value up, in whichever binade it lands. Below 2^-14 fp16's spacing stays 2^-24, the spacing
// of [2^-14, 2^-13): the magnitude is shifted into that binade by adding 2^-14 (rounded to nearest at 2^-37, so a
// value below 2^-38 never rounds up), rounded the same way and shifted back (exact). Past 65504 the far neighbour
// is inf, at no finite distance: to nearest (65504 below 65520, then inf), as inf and NaN. The sign is put back
// last, so a negative value that rounds to zero keeps -0.
C10_HOST_DEVICE inline c10::Half stochastic_half(float value, uint32_t word) {
  const uint32_t bits = float_to_bits(value), magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x477fe000u) return c10::Half(value);  // past 65504, inf, NaN
  const float base = magnitude < 0x38800000u ? 6.103515625e-05f : 0.0f;  // 2^-14 below it
  const float shifted = bits_to_float(magnitude) + base;
  const float rounded = bits_to_float((float_to_bits(shifted) + ((word & 0xffffu) >> 3)) & ~0x1fffu) - base;
  return c10::Half(bits_to_float(float_to_bits(rounded) | (bits & 0x80000000u)));  // on fp16's grid: exact
}

// Stores `value` at base[i] as `type`, rounded to nearest or stochastically with `word` (random_bits16).
C10_HOST_DEVICE inline void store_rounded(void* base, int64_t i, int32_t type, float value, bool stochastic,
                                          uint32_t word) {
  switch (type) {
    case kStoredBFloat16:
      static_cast<c10::BFloat16*>(base)[i] = stochastic ? stochastic_bfloat16(value, word) : c10::BFloat16(value);
      return;
    case kStoredHalf:
      static_cast<c10::Half*>(base)[i] = stochastic ? stochastic_half(value, word) : c10::Half(value);
      return;
    default:
      static_cast<float*>(base)[i] = value;
  }
}

// ---- One element's storage, around the rule ----

// `value` rounded to nearest in `type`, as a float.
C10_HOST_DEVICE inline float round_to(int32_t type, float value) {
  switch (type) {
    case kStoredBFloat16: return float(c10::BFloat16(value));
    case kStoredHalf: return float(c10::Half(value));
    default: return value;
  }
}

// The fp32 value the rule updates: the master copy, or the param (plus its compensation).
C10_HOST_DEVICE inline float load_param(const ElementStore& store, const void* param, const void* extra, int64_t i) {
  const StoragePolicy& policy = store.policy;
  if (policy.has_master) return static_cast<const float*>(extra)[i];
  const float value = load_as_float(param, i, policy.param_type);
  return policy.has_kahan ? value + load_as_float(extra, i, policy.param_type) : value;
}

// Writes the updated value: into the master copy and the param's rounding of it; as nearest param plus
// compensation (both rounded to nearest: the compensation keeps most of what the param's rounding drops; the
// subtraction is exact, the two being within a factor of two); or rounded as the launch says.
C10_HOST_DEVICE inline void store_param(const ElementStore& store, void* param, void* extra, int64_t i, float value) {
  const StoragePolicy& policy = store.policy;
  if (policy.has_master) static_cast<float*>(extra)[i] = value;
  if (policy.has_kahan) {
    const float stored = round_to(policy.param_type, value);
    store_rounded(param, i, policy.param_type, stored, false, 0u);
    store_rounded(extra, i, policy.param_type, value - stored, false, 0u);
    return;
  }
  const bool stochastic = policy.rounding == kStochastic;
  store_rounded(param, i, policy.param_type, value, stochastic,
                stochastic ? random_bits16(store.param_key, i) : 0u);
}

C10_HOST_DEVICE inline void store_state(const ElementStore& store, void* state, int k, int64_t i, float value) {
  const StoragePolicy& policy = store.policy;
  const bool stochastic = policy.rounding == kStochastic && policy.state_type != kStoredFloat;
  store_rounded(state, i, policy.state_type, value, stochastic,
                stochastic ? random_bits16(store.state_keys[k], i) : 0u);
}

// The streams of tensor `tensor` in the launch that reads rng = [seed, counter] (nullptr: no stochastic rounding).
C10_HOST_DEVICE inline ElementStore element_store(const StoragePolicy& policy, const int64_t* rng, int64_t tensor) {
  ElementStore store{policy, {}, {}};
  if (policy.rounding == kStochastic && rng != nullptr) {
    store.param_key = random_key(rng[0], rng[1], tensor, 0);
    for (int k = 0; k < 3; ++k) store.state_keys[k] = random_key(rng[0], rng[1], tensor, 1 + k);
  }
  return store;
}

FUSEDOPT_STORAGE_NAMESPACE_END
