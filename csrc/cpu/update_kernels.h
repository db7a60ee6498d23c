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
    const Stored v = kFull ? Stored::loadu(from) : Stored::loadu(from, count);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(v);
  }
  template <bool kFull>
  static void store(scalar_t* to, int64_t count, const Math (&in)[kParts]) {
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
    L::template load<kFull>(param + i, count, p);
    L::template load<kFull>(grad + i, count, g);
    for (int k = 0; k < kStates; ++k) L::template load<kFull>(state[k] + i, count, s[k]);
    for (int part = 0; part < kParts; ++part) {
      Math st[kStates > 0 ? kStates : 1];
      for (int k = 0; k < kStates; ++k) st[k] = s[k][part];
      rule(p[part], g[part] * factor, st);
      for (int k = 0; k < kStates; ++k) s[k][part] = st[k];
    }
    L::template store<kFull>(param + i, count, p);
    for (int k = 0; k < kStates; ++k) L::template store<kFull>(state[k] + i, count, s[k]);
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
      const int64_t valid = std::min<int64_t>(kLanes, count - part * kLanes);
      const int64_t first = (i - begin + part * kLanes) % kSumLanes;
      for (int k = 0; k < kSums; ++k) {
        T values[kLanes];
        terms[k].store(values);
        for (int64_t j = 0; j < valid; ++j) lanes[k][first + j] += double(values[j]);
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

// The stored path's kernels: one per fp32 rule, whatever the storage dtypes.
template <typename Rule>
void register_stored() {
  StoredUpdateKernels<Rule>::by_variant[kThisVariant] = &stored_update_range<Rule>;
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

// Every kernel of algorithm A in this variant. csrc/cpu_dispatch.cpp calls it (through the registrar
// csrc/algorithm_op.h adds) only on a CPU with this variant's instruction set.
template <class A>
void register_update_kernels() {
  register_masks<A>(std::make_integer_sequence<uint32_t, (1u << A::kOptions.size())>{});
}

// The one instantiation this translation unit exists for.
template void register_update_kernels<ThisAlgorithm>();

}  // namespace CPU_CAPABILITY
}  // namespace fusedopt::cpu
