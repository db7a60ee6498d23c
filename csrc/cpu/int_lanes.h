// The CPU kernels' 32-bit integer lanes (IntLanes: AVX2 and AVX-512 spellings of the same operations) and the bf16
// element pairs they load and store. Both the plain kernels (update_kernels.h's update_range) and the stored
// path (stored_update.h) use them; included by update_kernels.h in each variant's namespace, compiled once per
// instruction set. The baseline variant has no integer lanes (FUSEDOPT_INT_LANES undefined) and uses none of this.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fusedopt::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// A constant every lane holds, read from memory: GCC turns set(immediate) into a move to a general register and a
// broadcast on the vector shuffle port at every use inside a loop, which the fp16 rounding and the hash, short of
// other ports' work, paid for; a variable it cannot fold is a broadcast load (a load port, or an operand of the
// instruction that uses it). Mutable for that reason alone: nothing writes it.
template <uint32_t kValue>
struct Splat {
  static inline uint32_t value = kValue;
};

// bf16 and fp16 rounding with the instruction set's integer lanes (shifts, 32-bit multiplies, lane masks):
// storage.h's random_bits16, stochastic_bfloat16, stochastic_half (stored_update.h's stochastic_half_lanes) and
// c10's round-to-nearest-even on every lane, bit for bit. A rounded bf16 value is kept as fp32 bits whose low half
// is dropped when stored: a truncating store, exact, and cheaper than converting again. NaN becomes c10's quiet
// NaN (0x7fc0), as the scalar conversion makes it.
#if defined(CPU_CAPABILITY_AVX512)
struct IntLanes {
  using R = __m512i;
  static R set(uint32_t v) { return _mm512_set1_epi32(int32_t(v)); }
  template <uint32_t kValue>
  static R constant() { return _mm512_set1_epi32(int32_t(Splat<kValue>::value)); }
  static R iota() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
  template <int kShift>
  static R xorshift(R x) { return _mm512_xor_si512(x, _mm512_srli_epi32(x, kShift)); }
  static R high_half_parity(R x) { return _mm512_and_si512(_mm512_srli_epi32(x, 16), set(1)); }
  static R mul(R a, R b) { return _mm512_mullo_epi32(a, b); }
  static R add(R a, R b) { return _mm512_add_epi32(a, b); }
  static R xor_lanes(R a, R b) { return _mm512_xor_si512(a, b); }
  static R and_lanes(R a, R b) { return _mm512_and_si512(a, b); }
  static R or_lanes(R a, R b) { return _mm512_or_si512(a, b); }
  static R xor_and(R a, R b, R mask) { return _mm512_ternarylogic_epi32(a, b, mask, 0x28); }  // (a ^ b) & mask
  static R bits(const Vectorized<float>& v) { return _mm512_castps_si512(v); }
  static Vectorized<float> floats(R x) { return _mm512_castsi512_ps(x); }
  template <int kShift>
  static R shift_right(R x) { return _mm512_srli_epi32(x, kShift); }
  template <int kShift>
  static R shift_left(R x) { return _mm512_slli_epi32(x, kShift); }
  static R and_not(R a, R b) { return _mm512_andnot_si512(a, b); }  // ~a & b
  // Lane masks (signed comparisons) and the lanes they pick.
  using M = __mmask16;
  static M less(R a, R b) { return _mm512_cmplt_epi32_mask(a, b); }
  static bool any(M m) { return m != 0; }
  static R pick(M m, R if_set, R if_clear) { return _mm512_mask_blend_epi32(m, if_clear, if_set); }
  static R select_bits(R mask, R if_set, R if_clear) { return _mm512_ternarylogic_epi32(mask, if_set, if_clear, 0xca); }
  static R copy_sign(R magnitude, R from) { return select_bits(constant<0x80000000u>(), from, magnitude); }
  static Vectorized<float> add_where(M m, const Vectorized<float>& x, R addend) {
    return _mm512_mask_add_ps(x, m, x, floats(addend));
  }
  // fp16 bits, one per fp32 lane (half a register): converted truncating or to nearest even; lanes of 16 bits.
  using H = __m256i;
  static H half_toward_zero(const Vectorized<float>& v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  }
  static H half_nearest(const Vectorized<float>& v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  template <uint16_t kValue>  // h - kValue in the 16-bit lanes where m is set
  static H half_sub_where(M m, H h) {
    return _mm256_mask_sub_epi16(h, m, h, _mm256_set1_epi32(int32_t(Splat<kValue * 0x10001u>::value)));
  }
  static H half_pick(M m, H if_set, H if_clear) { return _mm256_mask_blend_epi16(m, if_clear, if_set); }
  static void store_halves(void* to, H h) { _mm256_storeu_si256(static_cast<__m256i*>(to), h); }
  static R load(const void* from) { return _mm512_loadu_si512(from); }
  static void store(void* to, R x) { _mm512_storeu_si512(to, x); }
  // bits(value) + increment, or c10's quiet NaN where value is NaN (whose payload must not carry into the
  // sign, nor truncate to inf).
  static R add_or_quiet_nan(const Vectorized<float>& value, R increment) {
    const __mmask16 number = _mm512_cmp_ps_mask(value, value, _CMP_ORD_Q);
    return _mm512_mask_add_epi32(set(0x7fc00000u), number, bits(value), increment);
  }
  // The 16-bit words of x, zero-extended: words 0 .. kLanes - 1 into out[0], the rest into out[1].
  static void widen_words(R x, R (&out)[2]) {
    out[0] = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(x));
    out[1] = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1));
  }
  // The high halves of a's then b's lanes, in order, as one bf16 register.
  static Vectorized<c10::BFloat16> high_halves(R a, R b) {
    const R packed = _mm512_packus_epi32(_mm512_srli_epi32(a, 16), _mm512_srli_epi32(b, 16));  // per 128-bit lane
    return _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), packed);
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct IntLanes {
  using R = __m256i;
  static R set(uint32_t v) { return _mm256_set1_epi32(int32_t(v)); }
  template <uint32_t kValue>
  static R constant() { return _mm256_set1_epi32(int32_t(Splat<kValue>::value)); }
  static R iota() { return _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0); }
  template <int kShift>
  static R xorshift(R x) { return _mm256_xor_si256(x, _mm256_srli_epi32(x, kShift)); }
  static R high_half_parity(R x) { return _mm256_and_si256(_mm256_srli_epi32(x, 16), set(1)); }
  static R mul(R a, R b) { return _mm256_mullo_epi32(a, b); }
  static R add(R a, R b) { return _mm256_add_epi32(a, b); }
  static R xor_lanes(R a, R b) { return _mm256_xor_si256(a, b); }
  static R and_lanes(R a, R b) { return _mm256_and_si256(a, b); }
  static R or_lanes(R a, R b) { return _mm256_or_si256(a, b); }
  static R xor_and(R a, R b, R mask) { return and_lanes(xor_lanes(a, b), mask); }
  static R bits(const Vectorized<float>& v) { return _mm256_castps_si256(v); }
  static Vectorized<float> floats(R x) { return _mm256_castsi256_ps(x); }
  template <int kShift>
  static R shift_right(R x) { return _mm256_srli_epi32(x, kShift); }
  template <int kShift>
  static R shift_left(R x) { return _mm256_slli_epi32(x, kShift); }
  static R and_not(R a, R b) { return _mm256_andnot_si256(a, b); }
  using M = __m256i;  // all ones in a set lane
  static M less(R a, R b) { return _mm256_cmpgt_epi32(b, a); }
  static bool any(M m) { return !_mm256_testz_si256(m, m); }
  static R pick(M m, R if_set, R if_clear) { return _mm256_blendv_epi8(if_clear, if_set, m); }
  static R select_bits(R mask, R if_set, R if_clear) {  // byte-wise: the masks used have whole bytes
    return _mm256_blendv_epi8(if_clear, if_set, mask);
  }
  static R copy_sign(R magnitude, R from) { return or_lanes(and_lanes(from, constant<0x80000000u>()), magnitude); }
  static Vectorized<float> add_where(M m, const Vectorized<float>& x, R addend) {
    return _mm256_add_ps(x, floats(and_lanes(m, addend)));
  }
  using H = __m128i;
  static H half_toward_zero(const Vectorized<float>& v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_ZERO); }
  static H half_nearest(const Vectorized<float>& v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  static H half_mask(M m) {  // the lane mask in 16-bit lanes (all ones saturate to all ones)
    return _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  }
  template <uint16_t kValue>
  static H half_sub_where(M m, H h) {
    return _mm_sub_epi16(h, _mm_and_si128(half_mask(m), _mm_set1_epi32(int32_t(Splat<kValue * 0x10001u>::value))));
  }
  static H half_pick(M m, H if_set, H if_clear) { return _mm_blendv_epi8(if_clear, if_set, half_mask(m)); }
  static void store_halves(void* to, H h) { _mm_storeu_si128(static_cast<__m128i*>(to), h); }
  static R load(const void* from) { return _mm256_loadu_si256(static_cast<const __m256i*>(from)); }
  static void store(void* to, R x) { _mm256_storeu_si256(static_cast<__m256i*>(to), x); }
  static R add_or_quiet_nan(const Vectorized<float>& value, R increment) {
    const __m256 nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
    const __m256 sum = _mm256_castsi256_ps(_mm256_add_epi32(bits(value), increment));
    return _mm256_castps_si256(_mm256_blendv_ps(sum, _mm256_castsi256_ps(set(0x7fc00000u)), nan));
  }
  static void widen_words(R x, R (&out)[2]) {
    out[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(x));
    out[1] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1));
  }
  static Vectorized<c10::BFloat16> high_halves(R a, R b) {
    const R packed = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));  // per 128-bit lane
    return _mm256_permute4x64_epi64(packed, 0xd8);
  }
};
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define FUSEDOPT_INT_LANES 1
static_assert(sizeof(IntLanes::R) == sizeof(Vectorized<float>), "one int32 lane per fp32 lane");
using RoundedBits = IntLanes::R[2];  // the bits of a bf16 register's worth of fp32 values (two registers)

// ---- bf16 in element pairs ----
// A bf16 buffer loaded as 32-bit lanes holds elements 2j and 2j + 1 in lane j: shifted left 16 bits a lane is
// element 2j in fp32, its high half alone element 2j + 1. Two fp32 registers then hold the even and the odd
// elements rather than the first and the second half, which elementwise rules do not mind, and the conversions
// need no shuffle: in order they take an extract and two zero-extensions per load and a pack and a permute per
// store, all on the one shuffle port (which AdamW's divisions and square roots also use). Only for elementwise
// work: the per-tensor sums add lanes in element order.
C10_ALWAYS_INLINE void load_pairs(const void* base, int64_t i, Vectorized<float> (&out)[2]) {
  using V = IntLanes;
  const V::R x = V::load(static_cast<const c10::BFloat16*>(base) + i);
  out[0] = V::floats(V::shift_left<16>(x));
  out[1] = V::floats(V::and_lanes(x, V::constant<0xffff0000u>()));
}

// Even and odd elements rounded (fp32 bits whose low half is dropped), stored as the pairs they came from.
C10_ALWAYS_INLINE void store_pairs(void* base, int64_t i, const RoundedBits& bits) {
  using V = IntLanes;
  V::store(static_cast<c10::BFloat16*>(base) + i,
           V::select_bits(V::constant<0xffff0000u>(), bits[1], V::shift_right<16>(bits[0])));
}

// c10's round-to-nearest-even (bias 0x7fff plus the kept part's lowest bit), or the stochastic rounding with a
// step's draws (`draws`, nullptr: nearest), on the even and odd registers. The draws are mix32 short of its last
// xorshift (stored_update.h's random_lanes_unfinished): the finished draw's high word is the unfinished one's
// (x >> 16 is untouched by x ^ x >> 16), its low word (x ^ x >> 16) & 0xffff, one bitwise operation.
C10_ALWAYS_INLINE void round_pairs(const Vectorized<float> (&value)[2], const IntLanes::R* draws, RoundedBits& out) {
  using V = IntLanes;
  if (draws != nullptr) {
    const V::R high = V::shift_right<16>(*draws);
    out[0] = V::add_or_quiet_nan(value[0], V::xor_and(*draws, high, V::constant<0xffffu>()));
    out[1] = V::add_or_quiet_nan(value[1], high);
    return;
  }
  for (int part = 0; part < 2; ++part) {
    out[part] = V::add_or_quiet_nan(value[part], V::add(V::high_half_parity(V::bits(value[part])),
                                                        V::constant<0x7fffu>()));
  }
}

#endif

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu
