// The per-element update rule of every algorithm, written once and called by both the CPU and the CUDA
// kernels. Each rule mirrors the operation order of torch.optim's single-tensor implementation, so the
// result differs from torch only by rounding: torch rounds to the parameter dtype after every op, we keep
// the whole update in `opmath_t` (fp32, or fp64 for fp64 params) and round once when storing.
//
// A rule is built once per (tensor, launch) from its param group's hyperparameters, the learning rate and the
// step number this update makes (the step counter already incremented, as torch does before using it), then
// applied to every element. Options that change the shape of the computation are template flags.
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>

#include <cmath>

namespace fusedopt {

// Hyperparameter slots of a param group. The Python classes fill them in this order per algorithm; slot 0 is
// always the learning rate, which the kernel may instead read from a tensor on the device.
constexpr int kMaxHyper = 5;

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

// SGD with optional momentum and Nesterov. State: momentum_buffer (when momentum != 0). No step counter.
// Hyper: lr, momentum, dampening, weight_decay. `fresh_state` marks a momentum buffer that torch would create
// by cloning the gradient on this step.
template <typename T, bool kMomentum, bool kNesterov, bool kMaximize>
struct SgdRule {
  using opmath_t = T;
  static constexpr int kNumStates = kMomentum ? 1 : 0;
  T neg_lr, momentum, one_minus_dampening, weight_decay;
  bool fresh_state;

  C10_HOST_DEVICE SgdRule(const double* hyper, double lr, double /*step*/, bool fresh)
      : neg_lr(T(-lr)), momentum(T(hyper[1])), one_minus_dampening(T(1 - hyper[2])),
        weight_decay(T(hyper[3])), fresh_state(fresh) {}

  template <typename V>
  C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
    V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    if constexpr (kMomentum) {
      V& buf = state[0];
      buf = fresh_state ? g : mul_rounded(buf, V(momentum)) + V(one_minus_dampening) * g;
      g = kNesterov ? g + V(momentum) * buf : buf;
    }
    param = param + V(neg_lr) * g;
  }
};

// Adam and AdamW (kDecoupled). States: exp_avg, exp_avg_sq[, max_exp_avg_sq]. Hyper: lr, beta1, beta2, eps,
// weight_decay.
template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupled>
struct AdamRule {
  using opmath_t = T;
  static constexpr int kNumStates = kAmsgrad ? 3 : 2;
  T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, neg_step_size, bias_correction2_sqrt;

  C10_HOST_DEVICE AdamRule(const double* hyper, double lr, double step, bool /*fresh*/)
      : one_minus_beta1(T(1 - hyper[1])), beta2(T(hyper[2])), one_minus_beta2(T(1 - hyper[2])),
        eps(T(hyper[3])), weight_decay(T(hyper[4])), decay_factor(T(1 - lr * hyper[4])),
        neg_step_size(T(-(lr / (1 - ::pow(hyper[1], step))))),
        bias_correction2_sqrt(T(::sqrt(1 - ::pow(hyper[2], step)))) {}

  template <typename V>
  C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
    V g = kMaximize ? -grad : grad;
    if (weight_decay != T(0)) {
      if constexpr (kDecoupled) {
        param = param * V(decay_factor);
      } else {
        g = g + V(weight_decay) * param;
      }
    }
    V& exp_avg = state[0];
    V& exp_avg_sq = state[1];
    exp_avg = lerp(exp_avg, g, one_minus_beta1);
    exp_avg_sq = exp_avg_sq * V(beta2) + V(one_minus_beta2) * g * g;
    V second_moment = exp_avg_sq;
    if constexpr (kAmsgrad) {
      state[2] = nan_propagating_max(state[2], exp_avg_sq);
      second_moment = state[2];
    }
    const V denom = sqrt_of(second_moment) / V(bias_correction2_sqrt) + V(eps);
    param = addcdiv(param, neg_step_size, exp_avg, denom);
  }
};

// Adagrad. State: sum. Hyper: lr, lr_decay, weight_decay, eps (initial_accumulator_value only seeds the state).
template <typename T, bool kMaximize>
struct AdagradRule {
  using opmath_t = T;
  static constexpr int kNumStates = 1;
  T neg_clr, weight_decay, eps;

  C10_HOST_DEVICE AdagradRule(const double* hyper, double lr, double step, bool /*fresh*/)
      : neg_clr(T(-(lr / (1 + (step - 1) * hyper[1])))), weight_decay(T(hyper[2])), eps(T(hyper[3])) {}

  template <typename V>
  C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
    const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    V& sum = state[0];
    sum = sum + g * g;
    param = addcdiv(param, neg_clr, g, sqrt_of(sum) + V(eps));
  }
};

// Adadelta. States: square_avg, acc_delta. Hyper: lr, rho, eps, weight_decay.
template <typename T, bool kMaximize>
struct AdadeltaRule {
  using opmath_t = T;
  static constexpr int kNumStates = 2;
  T neg_lr, rho, one_minus_rho, eps, weight_decay;

  C10_HOST_DEVICE AdadeltaRule(const double* hyper, double lr, double /*step*/, bool /*fresh*/)
      : neg_lr(T(-lr)), rho(T(hyper[1])), one_minus_rho(T(1 - hyper[1])), eps(T(hyper[2])),
        weight_decay(T(hyper[3])) {}

  template <typename V>
  C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
    const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    V& square_avg = state[0];
    V& acc_delta = state[1];
    square_avg = square_avg * V(rho) + V(one_minus_rho) * g * g;
    const V std = sqrt_of(square_avg + V(eps));
    const V delta = sqrt_of(acc_delta + V(eps)) / std * g;
    acc_delta = acc_delta * V(rho) + V(one_minus_rho) * delta * delta;
    param = param + V(neg_lr) * delta;
  }
};

// Adamax. States: exp_avg, exp_inf. Hyper: lr, beta1, beta2, eps, weight_decay.
template <typename T, bool kMaximize>
struct AdamaxRule {
  using opmath_t = T;
  static constexpr int kNumStates = 2;
  T one_minus_beta1, beta2, eps, weight_decay, neg_clr;

  C10_HOST_DEVICE AdamaxRule(const double* hyper, double lr, double step, bool /*fresh*/)
      : one_minus_beta1(T(1 - hyper[1])), beta2(T(hyper[2])), eps(T(hyper[3])), weight_decay(T(hyper[4])),
        neg_clr(T(-(lr / (1 - ::pow(hyper[1], step))))) {}

  template <typename V>
  C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
    const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    V& exp_avg = state[0];
    V& exp_inf = state[1];
    exp_avg = lerp(exp_avg, g, one_minus_beta1);
    exp_inf = nan_propagating_max(exp_inf * V(beta2), abs_of(g) + V(eps));
    param = addcdiv(param, neg_clr, exp_avg, exp_inf);
  }
};

// RMSprop. States: square_avg[, momentum_buffer][, grad_avg], in that order. Hyper: lr, alpha, eps,
// weight_decay, momentum.
template <typename T, bool kMomentum, bool kCentered, bool kMaximize>
struct RmspropRule {
  using opmath_t = T;
  static constexpr int kNumStates = 1 + (kMomentum ? 1 : 0) + (kCentered ? 1 : 0);
  T neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;

  C10_HOST_DEVICE RmspropRule(const double* hyper, double lr, double /*step*/, bool /*fresh*/)
      : neg_lr(T(-lr)), alpha(T(hyper[1])), one_minus_alpha(T(1 - hyper[1])), eps(T(hyper[2])),
        weight_decay(T(hyper[3])), momentum(T(hyper[4])) {}

  template <typename V>
  C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
    const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    V& square_avg = state[0];
    square_avg = square_avg * V(alpha) + V(one_minus_alpha) * g * g;
    V avg;
    if constexpr (kCentered) {
      V& grad_avg = state[kMomentum ? 2 : 1];
      grad_avg = lerp(grad_avg, g, one_minus_alpha);
      avg = sqrt_of(square_avg - grad_avg * grad_avg);
    } else {
      avg = sqrt_of(square_avg);
    }
    avg = avg + V(eps);
    if constexpr (kMomentum) {
      V& buf = state[1];
      buf = buf * V(momentum) + g / avg;
      param = param + V(neg_lr) * buf;
    } else {
      param = addcdiv(param, neg_lr, g, avg);
    }
  }
};

// Every rule template with its number of option flags. The CPU kernels are compiled ahead of time, once per
// instruction set, for every combination of flags (csrc/cpu/update_kernels.cpp); a rule added above must be
// listed here too (a step with an unlisted rule fails with "no CPU kernel").
template <template <typename, bool...> class Rule, int kFlags>
struct RuleFamily {};

template <typename Fn>
void for_each_rule_family(Fn&& fn) {
  fn(RuleFamily<SgdRule, 3>{});
  fn(RuleFamily<AdamRule, 3>{});
  fn(RuleFamily<AdagradRule, 1>{});
  fn(RuleFamily<AdadeltaRule, 1>{});
  fn(RuleFamily<AdamaxRule, 1>{});
  fn(RuleFamily<RmspropRule, 3>{});
}

}  // namespace fusedopt
