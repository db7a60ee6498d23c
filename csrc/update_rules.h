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

template <typename T>
C10_HOST_DEVICE inline T weight_decayed(T grad, T param, T weight_decay) {
  // torch skips the term when weight_decay == 0, which matters when param is inf/nan (0 * inf = nan).
  return weight_decay != T(0) ? grad + weight_decay * param : grad;
}

// torch's CPU addcdiv, self + value * t1 / t2, multiplies before it divides; keep its rounding.
template <typename T>
C10_HOST_DEVICE inline T addcdiv(T self, T value, T t1, T t2) {
  return self + value * t1 / t2;
}

// at::lerp: two formulas, picked by the size of the weight, for accuracy at both ends.
template <typename T>
C10_HOST_DEVICE inline T lerp(T self, T end, T weight) {
  return (weight < T(0.5) && weight > T(-0.5)) ? self + weight * (end - self)
                                               : end - (end - self) * (T(1) - weight);
}

// torch.maximum propagates NaN; std::max/fmax do not. One select, so CPU loops still vectorize.
template <typename T>
C10_HOST_DEVICE inline T nan_propagating_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// The float overloads: on the host, ::sqrt(float) would go through double and vectorize at half width; in
// device code the global ones are CUDA's float overloads.
#if defined(__CUDA_ARCH__)
#define FUSEDOPT_MATH_NS
#else
#define FUSEDOPT_MATH_NS std
#endif
template <typename T>
C10_HOST_DEVICE inline T sqrt_of(T x) { return FUSEDOPT_MATH_NS::sqrt(x); }
template <typename T>
C10_HOST_DEVICE inline T abs_of(T x) { return FUSEDOPT_MATH_NS::fabs(x); }

// a * b rounded on its own, never contracted into an FMA with a following add: where torch runs the product
// and the sum as two kernels (buf.mul_(momentum).add_(grad)), nvcc would otherwise fuse them and the fp32 result
// would drift by an ulp per step. Host compilers do not contract across these expressions (ISO C++ mode).
template <typename T>
C10_HOST_DEVICE inline T mul_rounded(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
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

  C10_HOST_DEVICE void operator()(T& param, T grad, T* state) const {
    T g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    if constexpr (kMomentum) {
      T& buf = state[0];
      buf = fresh_state ? g : mul_rounded(buf, momentum) + one_minus_dampening * g;
      g = kNesterov ? g + momentum * buf : buf;
    }
    param = param + neg_lr * g;
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

  C10_HOST_DEVICE void operator()(T& param, T grad, T* state) const {
    T g = kMaximize ? -grad : grad;
    if (weight_decay != T(0)) {
      if constexpr (kDecoupled) {
        param = param * decay_factor;
      } else {
        g = g + weight_decay * param;
      }
    }
    T& exp_avg = state[0];
    T& exp_avg_sq = state[1];
    exp_avg = lerp(exp_avg, g, one_minus_beta1);
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g;
    T second_moment = exp_avg_sq;
    if constexpr (kAmsgrad) {
      state[2] = nan_propagating_max(state[2], exp_avg_sq);
      second_moment = state[2];
    }
    const T denom = sqrt_of(second_moment) / bias_correction2_sqrt + eps;
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

  C10_HOST_DEVICE void operator()(T& param, T grad, T* state) const {
    const T g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    T& sum = state[0];
    sum = sum + g * g;
    param = addcdiv(param, neg_clr, g, sqrt_of(sum) + eps);
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

  C10_HOST_DEVICE void operator()(T& param, T grad, T* state) const {
    const T g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    T& square_avg = state[0];
    T& acc_delta = state[1];
    square_avg = square_avg * rho + one_minus_rho * g * g;
    const T std = sqrt_of(square_avg + eps);
    const T delta = sqrt_of(acc_delta + eps) / std * g;
    acc_delta = acc_delta * rho + one_minus_rho * delta * delta;
    param = param + neg_lr * delta;
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

  C10_HOST_DEVICE void operator()(T& param, T grad, T* state) const {
    const T g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    T& exp_avg = state[0];
    T& exp_inf = state[1];
    exp_avg = lerp(exp_avg, g, one_minus_beta1);
    exp_inf = nan_propagating_max(exp_inf * beta2, abs_of(g) + eps);
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

  C10_HOST_DEVICE void operator()(T& param, T grad, T* state) const {
    const T g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
    T& square_avg = state[0];
    square_avg = square_avg * alpha + one_minus_alpha * g * g;
    T avg;
    if constexpr (kCentered) {
      T& grad_avg = state[kMomentum ? 2 : 1];
      grad_avg = lerp(grad_avg, g, one_minus_alpha);
      avg = sqrt_of(square_avg - grad_avg * grad_avg);
    } else {
      avg = sqrt_of(square_avg);
    }
    avg = avg + eps;
    if constexpr (kMomentum) {
      T& buf = state[1];
      buf = buf * momentum + g / avg;
      param = param + neg_lr * buf;
    } else {
      param = addcdiv(param, neg_lr, g, avg);
    }
  }
};

}  // namespace fusedopt
