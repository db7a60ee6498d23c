// The element-wise building blocks every algorithm's rule (csrc/algorithms/<name>.h) is written with, shared
// by the CPU and the CUDA kernels. Each rule mirrors the operation order of torch.optim's single-tensor
// implementation, so the result differs from torch only by rounding: torch rounds to the parameter dtype after
// every op, we keep the whole update in `opmath_t` (fp32, or fp64 for fp64 params) and round once when storing.
//
// A rule is built once per (tensor, launch) from its param group's hyperparameters, the learning rate and the
// param's scalar state (csrc/algorithm.h: RuleInputs), then applied to every element. Options that change the
// shape of the computation are template flags.
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>

#include <cmath>

namespace fusedopt {

// Every rule's operator() is a template over the value type V it computes on: the opmath scalar T (the CUDA
// kernel, one element per thread) or at::vec::Vectorized<T> (the CPU kernels, csrc/cpu/update_kernels.cpp, one
// SIMD register of elements). The math is written once, on V; the helpers below are the only places where the
// two differ. Hyperparameters stay scalars of type T and are broadcast (V(x)) where they meet V. Scalar
// conditions (weight_decay != 0, fresh_state, the lerp weight) are evaluated once, never per lane.
template <typename V>
inline constexpr bool kIsScalar = std::is_floating_point_v<V>;

template <typename V, typename T>
C10_HOST_DEVICE inline V weight_decayed(const V& grad, const V& param, T weight_decay) {
  // torch skips the term when weight_decay == 0, which matters when param is inf/nan (0 * inf = nan).
  return weight_decay != T(0) ? grad + V(weight_decay) * param : grad;
}

// The Adam family's gradient: negated for maximize, then weight decay, either coupled (added to the gradient) or
// decoupled (AdamW: the param scaled by decay_factor = 1 - lr * weight_decay first).
template <bool kMaximize, bool kDecoupled, typename V, typename T>
C10_HOST_DEVICE inline V adam_gradient(V& param, const V& grad, T weight_decay, T decay_factor) {
  const V g = kMaximize ? -grad : grad;
  if (weight_decay == T(0)) return g;
  if constexpr (kDecoupled) {
    param = param * V(decay_factor);
    return g;
  } else {
    return g + V(weight_decay) * param;
  }
}

// torch's CPU addcdiv, self + value * t1 / t2, multiplies before it divides; keep its rounding.
template <typename V, typename T>
C10_HOST_DEVICE inline V addcdiv(const V& self, T value, const V& t1, const V& t2) {
  return self + V(value) * t1 / t2;
}

// at::lerp: two formulas, picked by the size of the weight, for accuracy at both ends. The weight is always a
// hyperparameter here, so the choice is made once, not per element.
template <typename V, typename T>
C10_HOST_DEVICE inline V lerp(const V& self, const V& end, T weight) {
  return (weight < T(0.5) && weight > T(-0.5)) ? self + V(weight) * (end - self)
                                               : end - (end - self) * V(T(1) - weight);
}

// Adam's moments, in torch's order: exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2).
template <typename V, typename T>
C10_HOST_DEVICE inline void adam_moments(V& exp_avg, V& exp_avg_sq, const V& g, T one_minus_beta1, T beta2,
                                         T one_minus_beta2) {
  exp_avg = lerp(exp_avg, g, one_minus_beta1);
  exp_avg_sq = exp_avg_sq * V(beta2) + V(one_minus_beta2) * g * g;
}

// torch.maximum propagates NaN; std::max/fmax do not. at::vec::maximum does (found by ADL on Vectorized).
template <typename V>
C10_HOST_DEVICE inline V nan_propagating_max(const V& a, const V& b) {
  if constexpr (kIsScalar<V>) {
    return (a > b || a != a) ? a : b;
  } else {
    return maximum(a, b);
  }
}

// The float overloads: on the host, ::sqrt(float) would go through double; in device code the global ones are
// CUDA's float overloads. Vectorized has its own (correctly rounded, like the scalar ones).
#if defined(__CUDA_ARCH__)
#define FUSEDOPT_MATH_NS
#else
#define FUSEDOPT_MATH_NS std
#endif
template <typename V>
C10_HOST_DEVICE inline V sqrt_of(const V& x) {
  if constexpr (kIsScalar<V>) {
    return FUSEDOPT_MATH_NS::sqrt(x);
  } else {
    return x.sqrt();
  }
}
template <typename V>
C10_HOST_DEVICE inline V abs_of(const V& x) {
  if constexpr (kIsScalar<V>) {
    return FUSEDOPT_MATH_NS::fabs(x);
  } else {
    return x.abs();
  }
}

// Per-element conditions, for rules that branch per element (Rprop's sign test, Lion's sign): a condition is a
// bool for a scalar V and a lane mask (all bits set where true) for a Vectorized V; select() takes either.
template <typename V>
C10_HOST_DEVICE inline auto greater(const V& a, const V& b) {
  return a > b;
}
template <typename V>
C10_HOST_DEVICE inline auto less(const V& a, const V& b) {
  return a < b;
}
template <typename V>
C10_HOST_DEVICE inline auto equal(const V& a, const V& b) {
  return a == b;
}
template <typename V, typename Condition>
C10_HOST_DEVICE inline V select(const Condition& condition, const V& if_true, const V& if_false) {
  if constexpr (kIsScalar<V>) {
    return condition ? if_true : if_false;
  } else {
    return V::blendv(if_false, if_true, condition);
  }
}

// AVX-512 (the CPU kernels' avx512 variant): conditions as the instruction set's mask registers. ATen's
// Vectorized comparisons return a vector of all-ones lanes and its blendv turns that back into a mask, two
// instructions each where one does; Rprop, made of comparisons and selects, ran at half of add_'s bandwidth in
// bf16. Same predicates as ATen's operators (ordered, quiet: false on NaN), so the results are the same bits.
#if defined(CPU_CAPABILITY_AVX512)
}  // namespace fusedopt
#include <ATen/cpu/vec/vec.h>
namespace fusedopt {
#define FUSEDOPT_MASK_CONDITIONS(T, Mask, suffix)                                                               \
  inline Mask greater(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {                     \
    return _mm512_cmp_##suffix##_mask(a, b, _CMP_GT_OQ);                                                       \
  }                                                                                                           \
  inline Mask less(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {                        \
    return _mm512_cmp_##suffix##_mask(a, b, _CMP_LT_OQ);                                                       \
  }                                                                                                           \
  inline Mask equal(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {                       \
    return _mm512_cmp_##suffix##_mask(a, b, _CMP_EQ_OQ);                                                       \
  }                                                                                                           \
  inline at::vec::Vectorized<T> select(Mask condition, const at::vec::Vectorized<T>& if_true,                 \
                                       const at::vec::Vectorized<T>& if_false) {                              \
    return _mm512_mask_blend_##suffix(condition, if_false, if_true);                                           \
  }
FUSEDOPT_MASK_CONDITIONS(float, __mmask16, ps)
FUSEDOPT_MASK_CONDITIONS(double, __mmask8, pd)
#undef FUSEDOPT_MASK_CONDITIONS
#endif

// torch.sign: 1, -1, or 0 for zero and for NaN (torch computes (0 < x) - (x < 0)).
template <typename V>
C10_HOST_DEVICE inline V sign_of(const V& x) {
  const V zero(0);
  return select(greater(x, zero), V(1), select(less(x, zero), V(-1), zero));
}

// a * b rounded on its own, never contracted into an FMA with a following add: where torch runs the product
// and the sum as two kernels (buf.mul_(momentum).add_(grad)), nvcc would otherwise fuse them and the fp32 result
// would drift by an ulp per step. Host compilers do not contract across these expressions (ISO C++ mode, which
// is also why the AVX2/AVX-512 CPU kernels round exactly as the scalar code does).
template <typename V>
C10_HOST_DEVICE inline V mul_rounded(const V& a, const V& b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<V, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

}  // namespace fusedopt
