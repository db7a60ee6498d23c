// The CPU update kernels, explicitly vectorized with at::vec::Vectorized (the abstraction of torch's own fused
// CPU kernels). setup.py compiles this file once per algorithm and instruction set (a generated translation unit
// that includes the algorithm's header, then this one), each time with CPU_CAPABILITY set to the variant's name
// (DEFAULT, AVX2, AVX512), the matching CPU_CAPABILITY_<name> macro and compiler flags, exactly as ATen builds
// its kernels; csrc/cpu_dispatch.cpp picks the variant at run time.
//
// Everything this file defines lives in the inline namespace fusedopt::cpu::<CPU_CAPABILITY>, and the only
// functions it instantiates take at::vec::<CPU_CAPABILITY>::Vectorized arguments or are defined in that
// namespace, so no inline function compiled here with AVX-512 flags can stand in, at link time, for the baseline
// copy of the same function (setup.py's comment says how that is checked). Keep the includes minimal: no
// at::Tensor, no ATen operators.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "cpu/int_lanes.h"
#include "cpu_kernels.h"

#if !defined(CPU_CAPABILITY)
#error "compile this file through setup.py, which sets CPU_CAPABILITY per variant"
#endif

namespace fusedopt::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
constexpr Variant kThisVariant = kAvx512;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr Variant kThisVariant = kAvx2;
#else
constexpr Variant kThisVariant = kDefault;
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// A whole fp16 register's worth as fp32 lanes and back, half a register at a time straight from and to memory:
// the same conversions as convert_to_float / convert_from_float (vcvtph2ps, and vcvtps2ph rounding to nearest
// even), but a conversion reading memory needs no shuffle port, where a 512-bit load converted in registers
// takes an extract and a shuffle-port half of each conversion, and a store no insert. The stochastic fp16 kernel,
// whose rounding keeps that port busy, gained most.
C10_ALWAYS_INLINE Vectorized<float> half_lanes_to_float(const c10::Half* from) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
#else
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
#endif
}

C10_ALWAYS_INLINE void store_float_as_half_lanes(c10::Half* to, const Vectorized<float>& v) {
  IntLanes::store_halves(to, IntLanes::half_nearest(v));
}
#endif

// How elements of a storage dtype become the vectors a rule computes on. fp32 and fp64: one register of the
// same type. bf16 and fp16: one register of storage, converted in registers to two fp32 vectors and back with
// round-to-nearest-even (torch's convert_to_float / convert_from_float).
template <typename scalar_t, typename = void>
struct Lanes {
  using Math = Vectorized<scalar_t>;
  static constexpr int kParts = 1;
  static constexpr int64_t kWidth = Math::size();
  template <bool kFull>
  static void load(const scalar_t* from, int64_t count, Math (&out)[kParts]) {
    out[0] = kFull ? Math::loadu(from) : Math::loadu(from, count);
  }
  template <bool kFull>
  static void store(scalar_t* to, int64_t count, const Math (&in)[kParts]) {
    if constexpr (kFull) {
      in[0].store(to);
    } else {
      in[0].store(to, count);
    }
  }
};

template <typename scalar_t>
struct Lanes<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using Math = Vectorized<float>;
  using Stored = Vectorized<scalar_t>;
  static constexpr int kParts = 2;
  static constexpr int64_t kWidth = Stored::size();
  static_assert(kWidth == kParts * Math::size(), "a reduced-precision register holds two fp32 registers");
  template <bool kFull>
  static void load(const scalar_t* from, int64_t count, Math (&out)[kParts]) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (kFull && std::is_same_v<scalar_t, c10::Half>) {
      for (int part = 0; part < kParts; ++part) out[part] = half_lanes_to_float(from + part * Math::size());
      return;
    }
#endif
    const Stored v = kFull ? Stored::loadu(from) : Stored::loadu(from, count);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(v);
  }
  template <bool kFull>
  static void store(scalar_t* to, int64_t count, const Math (&in)[kParts]) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (kFull && std::is_same_v<scalar_t, c10::Half>) {
      for (int part = 0; part < kParts; ++part) store_float_as_half_lanes(to + part * Math::size(), in[part]);
      return;
    }
#endif
    const Stored v = at::vec::convert_from_float<scalar_t>(in[0], in[1]);
    if constexpr (kFull) {
      v.store(to);
    } else {
      v.store(to, count);
    }
  }
};

// Software prefetch, kPrefetchBytes ahead of a kernel's position in each buffer it streams through (several
// arrays at once: param, grad, each state, a master copy or compensation), which the hardware prefetchers did not
// keep ahead of. Measured on a 2-core Intel Xeon (AVX-512), one thread, bf16 AdamW over 10 x 2^20 elements: 12.7
// ms a step without it (22.1 ms with stochastic rounding, whose longer loop body leaves the out-of-order window
// fewer loads to start early), 7.2 ms (10.0 ms) with it; 1, 2 and 4 KB ahead measured alike. A prefetch never
// faults, so the last ones may point past a buffer's end (computed as integers, not as pointers past the array).
// `written`: the buffer is stored to as well (a write prefetch where the instruction set has one).
constexpr int64_t kPrefetchBytes = 2048;

C10_ALWAYS_INLINE void prefetch_ahead(const void* base, int64_t byte_offset, bool written) {
#if defined(__GNUC__) || defined(__clang__)
  const auto* at = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base) + uintptr_t(byte_offset) +
                                                 uintptr_t(kPrefetchBytes));
  if (written) {
    __builtin_prefetch(at, 1, 3);
  } else {
    __builtin_prefetch(at, 0, 3);
  }
#else
  (void)base, (void)byte_offset, (void)written;
#endif
}

// prefetch_ahead for every buffer of a plain entry (one dtype: the same byte offset in each) at element i.
template <typename scalar_t, int kStates>
C10_ALWAYS_INLINE void prefetch_entry(const TensorEntry& entry, int64_t i, bool written) {
  const int64_t offset = i * int64_t(sizeof(scalar_t));
  prefetch_ahead(entry.param, offset, written);
  prefetch_ahead(entry.grad, offset, false);
  for (int k = 0; k < kStates; ++k) prefetch_ahead(entry.state[k], offset, written);
}

// Whether update_range walks whole registers of scalar_t in element pairs: bf16, where integer lanes exist.
template <typename scalar_t>
#if defined(FUSEDOPT_INT_LANES)
constexpr bool kBf16Pairs = std::is_same_v<scalar_t, c10::BFloat16>;
#else
constexpr bool kBf16Pairs = false;
#endif

#if defined(FUSEDOPT_INT_LANES)
// Elements [i, i + 2 * lanes) of a bf16 buffer as even and odd registers, rounded to nearest even.
C10_ALWAYS_INLINE void store_nearest_pairs(void* base, int64_t i, const Vectorized<float> (&value)[2]) {
  RoundedBits rounded;
  round_pairs(value, nullptr, rounded);
  store_pairs(base, i, rounded);
}
#endif

// The kernel: whole registers, then one partial register (masked load and store) for the tail, so the rule is
// only ever evaluated on vectors and the scalar instantiations stay the baseline's. Each whole step moves one
// register of every buffer (at most a cache line): one prefetch per buffer.
template <typename scalar_t, typename Rule>
void update_range(const TensorEntry& entry, const Rule& rule, typename Rule::opmath_t grad_factor, int64_t begin,
                  int64_t end) {
  using L = Lanes<scalar_t>;
  using Math = typename L::Math;
  constexpr int kStates = Rule::kNumStates;
  constexpr int kParts = L::kParts;
  scalar_t* const param = static_cast<scalar_t*>(entry.param);
  const scalar_t* const grad = static_cast<const scalar_t*>(entry.grad);
  scalar_t* state[kStates > 0 ? kStates : 1];
  for (int k = 0; k < kStates; ++k) state[k] = static_cast<scalar_t*>(entry.state[k]);
  const Math factor(grad_factor);

  auto apply = [&](int64_t i, int64_t count, auto full) {
    constexpr bool kFull = decltype(full)::value;
    Math p[kParts], g[kParts], s[kStates > 0 ? kStates : 1][kParts];
    if constexpr (kFull && kBf16Pairs<scalar_t>) {  // even and odd elements (int_lanes.h): no shuffles
      load_pairs(param, i, p);
      load_pairs(grad, i, g);
      for (int k = 0; k < kStates; ++k) load_pairs(state[k], i, s[k]);
    } else {
      L::template load<kFull>(param + i, count, p);
      L::template load<kFull>(grad + i, count, g);
      for (int k = 0; k < kStates; ++k) L::template load<kFull>(state[k] + i, count, s[k]);
    }
    for (int part = 0; part < kParts; ++part) {
      Math st[kStates > 0 ? kStates : 1];
      for (int k = 0; k < kStates; ++k) st[k] = s[k][part];
      rule(p[part], g[part] * factor, st);
      for (int k = 0; k < kStates; ++k) s[k][part] = st[k];
    }
    if constexpr (kFull && kBf16Pairs<scalar_t>) {
      store_nearest_pairs(param, i, p);
      for (int k = 0; k < kStates; ++k) store_nearest_pairs(state[k], i, s[k]);
    } else {
      L::template store<kFull>(param + i, count, p);
      for (int k = 0; k < kStates; ++k) L::template store<kFull>(state[k] + i, count, s[k]);
    }
  };
  int64_t i = begin;
  for (; i + L::kWidth <= end; i += L::kWidth) {
    prefetch_entry<scalar_t, kStates>(entry, i, true);
    apply(i, L::kWidth, std::true_type{});
  }
  if (i < end) apply(i, end - i, std::false_type{});
}

// The per-tensor sums pass (an algorithm with kTensorSums): the rule's tensor terms on whole registers and one
// partial register (the lanes past its count are left out: padding may give NaN terms), element i of the range
// added into double accumulator i % kSumLanes, then the accumulators in order. kSumLanes is a multiple of every
// variant's register width, so each variant adds the same values in the same order (bit-identical sums).
// Nothing is stored: the state the rule advances is a copy.
constexpr int kSumLanes = 16;

// Adds the lanes of a whole register, widened to double (squared first when kSquare), into accumulators
// lanes[first ..], lane by lane: the same additions, in the same order per accumulator, as a scalar loop over
// the lanes, as vector instructions. (gcc left that scalar loop scalar: three instructions per lane.) The
// widening is exact, and so is the square of a float in double.
template <bool kSquare, typename T>
C10_ALWAYS_INLINE void add_lanes_in_double(const Vectorized<T>& v, double* lanes) {
  using D = Vectorized<double>;
  if constexpr (std::is_same_v<T, double>) {
    const D x = kSquare ? v * v : v;
    (D::loadu(lanes) + x).store(lanes);
  } else {
    constexpr int kHalf = D::size();
    static_assert(Vectorized<float>::size() == 2 * kHalf, "a float register widens into two double registers");
    D halves[2];
#if defined(CPU_CAPABILITY_AVX512)
    halves[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    halves[1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
    halves[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    halves[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
#else
    float values[2 * kHalf];
    double widened[2 * kHalf];
    v.store(values);
    for (int j = 0; j < 2 * kHalf; ++j) widened[j] = double(values[j]);
    halves[0] = D::loadu(widened);
    halves[1] = D::loadu(widened + kHalf);
#endif
    for (int h = 0; h < 2; ++h) {
      const D x = kSquare ? halves[h] * halves[h] : halves[h];
      (D::loadu(lanes + h * kHalf) + x).store(lanes + h * kHalf);
    }
  }
}

// The same for the first `valid` lanes of a partial register (the rest are padding, not the tensor's values),
// one lane at a time. Returns whether any of them is inf or NaN.
template <bool kSquare, typename T>
C10_ALWAYS_INLINE bool add_valid_lanes_in_double(const Vectorized<T>& v, int64_t valid, double* lanes) {
  T values[Vectorized<T>::size()];
  v.store(values);
  bool nonfinite = false;
  for (int64_t j = 0; j < valid; ++j) {
    nonfinite = nonfinite || is_nonfinite(values[j]);
    lanes[j] += kSquare ? double(values[j]) * double(values[j]) : double(values[j]);
  }
  return nonfinite;
}

// The sums pass over [begin, end), whatever fills the registers: load(i, count, full, p, g, s) loads kParts
// fp32 registers of the param, the grad and each state buffer (the plain kernel from its storage dtype's
// Lanes, the stored path by storage type), kWidth elements a step.
template <int kParts, int64_t kWidth, typename Rule, typename Load>
void accumulate_tensor_terms(const Rule& rule, typename Rule::opmath_t grad_factor, int64_t begin, int64_t end,
                             double* sums, const Load& load) {
  using T = typename Rule::opmath_t;
  using Math = Vectorized<T>;
  constexpr int kStates = Rule::kNumStates;
  constexpr int kSums = Declared<typename Rule::Algorithm>::num_tensor_sums();
  constexpr int kLanes = Math::size();
  static_assert(kSumLanes % kLanes == 0, "a register's lanes map onto consecutive accumulators");
  const Math factor(grad_factor);
  double lanes[kSums][kSumLanes] = {};

  auto accumulate = [&](int64_t i, int64_t count, auto full) {
    Math p[kParts], g[kParts], s[kStates > 0 ? kStates : 1][kParts];
    load(i, count, full, p, g, s);
    for (int part = 0; part < kParts; ++part) {
      Math st[kStates > 0 ? kStates : 1], terms[kSums];
      for (int k = 0; k < kStates; ++k) st[k] = s[k][part];
      rule.tensor_terms(p[part], g[part] * factor, st, terms);
      const int64_t first = (i - begin + part * kLanes) % kSumLanes;
      for (int k = 0; k < kSums; ++k) {
        if constexpr (decltype(full)::value) {
          add_lanes_in_double<false>(terms[k], lanes[k] + first);
        } else {
          const int64_t valid = std::min<int64_t>(kLanes, count - part * kLanes);
          add_valid_lanes_in_double<false>(terms[k], valid, lanes[k] + first);
        }
      }
    }
  };
  int64_t i = begin;
  for (; i + kWidth <= end; i += kWidth) accumulate(i, kWidth, std::true_type{});
  if (i < end) accumulate(i, end - i, std::false_type{});
  for (int k = 0; k < kSums; ++k) {
    for (int j = 0; j < kSumLanes; ++j) sums[k] += lanes[k][j];
  }
}

template <typename scalar_t, typename Rule>
void tensor_sums_range(const TensorEntry& entry, const Rule& rule, typename Rule::opmath_t grad_factor,
                       int64_t begin, int64_t end, double* sums) {
  using L = Lanes<scalar_t>;
  constexpr int kStates = Rule::kNumStates;
  const scalar_t* const param = static_cast<const scalar_t*>(entry.param);
  const scalar_t* const grad = static_cast<const scalar_t*>(entry.grad);
  accumulate_tensor_terms<L::kParts, L::kWidth>(
      rule, grad_factor, begin, end, sums, [&](int64_t i, int64_t count, auto full, auto& p, auto& g, auto& s) {
        constexpr bool kFull = decltype(full)::value;
        if constexpr (kFull) prefetch_entry<scalar_t, kStates>(entry, i, false);
        L::template load<kFull>(param + i, count, p);
        L::template load<kFull>(grad + i, count, g);
        for (int k = 0; k < kStates; ++k) {
          L::template load<kFull>(static_cast<const scalar_t*>(entry.state[k]) + i, count, s[k]);
        }
      });
}

// The grad-statistics pass (GradScaler's non-finite check, global-norm clipping): the sum of squares of grad
// elements [begin, end) of one tensor and whether any is inf or NaN. A square of a float is exact in double;
// element i of the range goes into double accumulator i % kSumLanes, then the accumulators are added in order, as
// in the sums pass above, so every variant gives the same bits. (The scalar loop this replaces took as long as the
// whole update: 9.5 ms more for a clipped fp32 AdamW step over 10 x 2^20 elements on one AMD EPYC core.)
template <typename scalar_t>
void grad_stats_range(const TensorEntry& entry, int64_t begin, int64_t end, double& sum_sq, bool& nonfinite) {
  using L = Lanes<scalar_t>;
  using Math = typename L::Math;
  using T = typename Math::value_type;
  constexpr int kLanes = Math::size();
  static_assert(kSumLanes % kLanes == 0, "a register's lanes map onto consecutive accumulators");
  const scalar_t* const grad = static_cast<const scalar_t*>(entry.grad);
  double lanes[kSumLanes] = {};
  Math check(T(0));  // g - g is 0 for every finite g, NaN for inf and NaN: any non-finite lane leaves NaN here
  auto accumulate = [&](int64_t i, int64_t count, auto full) {
    constexpr bool kFull = decltype(full)::value;
    Math g[L::kParts];
    L::template load<kFull>(grad + i, count, g);
    for (int part = 0; part < L::kParts; ++part) {
      const int64_t first = (i - begin + part * kLanes) % kSumLanes;
      if constexpr (kFull) {
        check = check + (g[part] - g[part]);
        add_lanes_in_double<true>(g[part], lanes + first);
      } else {
        const int64_t valid = std::min<int64_t>(kLanes, count - part * kLanes);
        nonfinite = add_valid_lanes_in_double<true>(g[part], valid, lanes + first) || nonfinite;
      }
    }
  };
  nonfinite = false;
  int64_t i = begin;
  for (; i + L::kWidth <= end; i += L::kWidth) {
    prefetch_ahead(grad, i * int64_t(sizeof(scalar_t)), false);
    accumulate(i, L::kWidth, std::true_type{});
  }
  if (i < end) accumulate(i, end - i, std::false_type{});
  T checked[kLanes];
  check.store(checked);
  for (int j = 0; j < kLanes; ++j) nonfinite = nonfinite || checked[j] != T(0);
  double sum = 0.0;
  for (int j = 0; j < kSumLanes; ++j) sum += lanes[j];
  sum_sq = sum;
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu

#include "cpu/stored_update.h"

namespace fusedopt::cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t, typename Rule>
void register_one() {
  UpdateKernels<scalar_t, Rule>::by_variant[kThisVariant] = &update_range<scalar_t, Rule>;
  if constexpr (Declared<typename Rule::Algorithm>::num_tensor_sums() > 0) {
    TensorSumKernels<scalar_t, Rule>::by_variant[kThisVariant] = &tensor_sums_range<scalar_t, Rule>;
  }
}

// The stored path's kernels: per fp32 rule, the general one (whatever the storage dtypes) and one per fixed layout.
template <typename Rule, int... kLayouts>
void register_stored_layouts(std::integer_sequence<int, kLayouts...>) {
  StoredUpdateFn<Rule>* slots = StoredUpdateKernels<Rule>::by_variant[kThisVariant];
  slots[0] = &stored_update_range<Rule, StoragePolicy>;
  ((slots[1 + kLayouts] = &stored_update_range<Rule, FixedPolicy<kLayouts>>), ...);
}

template <typename Rule>
void register_stored() {
  register_stored_layouts<Rule>(std::make_integer_sequence<int, kStoredSlots - 1>{});
  if constexpr (Declared<typename Rule::Algorithm>::num_tensor_sums() > 0) {
    StoredSumKernels<Rule>::by_variant[kThisVariant] = &stored_tensor_sums_range<Rule>;
  }
}

// One option combination, for every storage dtype.
template <class A, uint32_t kMask>
void register_dtypes() {
  register_stored<typename A::template Rule<float, kMask>>();
  register_one<float, typename A::template Rule<float, kMask>>();
  register_one<double, typename A::template Rule<double, kMask>>();
  register_one<c10::BFloat16, typename A::template Rule<float, kMask>>();
  register_one<c10::Half, typename A::template Rule<float, kMask>>();
}

template <class A, uint32_t... kMasks>
void register_masks(std::integer_sequence<uint32_t, kMasks...>) {
  (register_dtypes<A, kMasks>(), ...);
}

// The grad-statistics kernels depend on the storage dtype only: every algorithm's object registers the same.
inline void register_grad_stats() {
  GradStatsKernels<float>::by_variant[kThisVariant] = &grad_stats_range<float>;
  GradStatsKernels<double>::by_variant[kThisVariant] = &grad_stats_range<double>;
  GradStatsKernels<c10::BFloat16>::by_variant[kThisVariant] = &grad_stats_range<c10::BFloat16>;
  GradStatsKernels<c10::Half>::by_variant[kThisVariant] = &grad_stats_range<c10::Half>;
}

// Every kernel of algorithm A in this variant. csrc/cpu_dispatch.cpp calls it (through the registrar
// csrc/algorithm_op.h adds) only on a CPU with this variant's instruction set.
template <class A>
void register_update_kernels() {
  register_masks<A>(std::make_integer_sequence<uint32_t, (1u << A::kOptions.size())>{});
  register_grad_stats();
}

// The one instantiation this translation unit exists for.
template void register_update_kernels<ThisAlgorithm>();

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu
