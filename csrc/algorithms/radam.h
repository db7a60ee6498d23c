// RAdam (torch.optim.RAdam; Liu et al. 2020): Adam whose adaptive step is rectified by the variance of its
// second moment. While that variance is intractable (rho_t <= 5: the first steps, or always when rho_inf <= 4)
// the update is bias-corrected SGD with momentum. The choice is made per tensor when the rule is built, from the
// step on the device: no host sync.
#pragma once

#include <cmath>

#include "algorithm.h"

namespace fusedopt {

struct RAdam {
  static constexpr std::string_view kOp = "radam_";
  static constexpr Names<5> kHyper{"lr", "beta1", "beta2", "eps", "weight_decay"};
  static constexpr Names<2> kOptions{"maximize", "decoupled_weight_decay"};
  static constexpr std::array<StateDecl, 2> kStates{{{"exp_avg", ""}, {"exp_avg_sq", ""}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "beta1";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<RAdam>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = RAdam;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr bool kDecoupled = D::option(kFlags, "decoupled_weight_decay");
    static constexpr int kNumStates = D::num_states(kFlags);
    T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, lr, bias_correction1;
    T bias_correction2_sqrt, rect;
    bool rectified;  // rho_t > 5: the adaptive, rectified step; else the un-adapted one

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in) {
      const double beta1_ = in.hyper[D::hyper("beta1")], beta2_ = in.hyper[D::hyper("beta2")];
      const double wd = in.hyper[D::hyper("weight_decay")];
      const double step = in.next[D::scalar("step")];
      const double bc2 = 1 - ::pow(beta2_, step);
      // the length of the approximated simple moving average: its limit, and its value at this step
      const double rho_inf = 2 / (1 - beta2_) - 1;
      const double rho_t = rho_inf - 2 * step * ::pow(beta2_, step) / bc2;
      rectified = rho_t > 5.0;
      // computed only when used: with rho_inf <= 4 the formula divides by zero or takes a negative root
      rect = rectified ? T(::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)))
                       : T(1);
      one_minus_beta1 = T(1 - beta1_);
      beta2 = T(beta2_);
      one_minus_beta2 = T(1 - beta2_);
      eps = T(in.hyper[D::hyper("eps")]);
      weight_decay = T(wd);
      decay_factor = T(1 - in.lr * wd);
      lr = T(in.lr);
      bias_correction1 = T(1 - ::pow(beta1_, step));
      bias_correction2_sqrt = T(::sqrt(bc2));
    }

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = adam_gradient<kMaximize, kDecoupled>(param, grad, weight_decay, decay_factor);
      V& exp_avg = state[D::state(kFlags, "exp_avg")];
      V& exp_avg_sq = state[D::state(kFlags, "exp_avg_sq")];
      adam_moments(exp_avg, exp_avg_sq, g, one_minus_beta1, beta2, one_minus_beta2);
      // torch's order: (exp_avg / bc1) * lr [* (sqrt(bc2) / (sqrt(exp_avg_sq) + eps)) * rect]
      V update = exp_avg / V(bias_correction1) * V(lr);
      if (rectified) {
        // torch's `float / tensor` is reciprocal(tensor) * float
        const V adaptive_lr = V(T(1)) / (sqrt_of(exp_avg_sq) + V(eps)) * V(bias_correction2_sqrt);
        update = update * adaptive_lr * V(rect);
      }
      param = param - update;
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(RAdam)
