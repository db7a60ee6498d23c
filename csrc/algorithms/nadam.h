// NAdam (torch.optim.NAdam; Dozat 2016): Adam with Nesterov momentum, whose momentum coefficient
// mu_t = beta1 (1 - 0.96^(t psi) / 2) warms up with the step t (psi: momentum_decay). The product of the mu_t so
// far is per-param scalar state, kept and advanced on the device like the step.
#pragma once

#include <cmath>

#include "algorithm.h"

namespace fusedopt {

struct NAdam {
  static constexpr std::string_view kOp = "nadam_";
  static constexpr Names<6> kHyper{"lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay"};
  static constexpr Names<2> kOptions{"maximize", "decoupled_weight_decay"};
  static constexpr std::array<StateDecl, 2> kStates{{{"exp_avg", ""}, {"exp_avg_sq", ""}}};
  static constexpr Names<2> kScalars{"step", "mu_product"};
  static constexpr std::string_view kMomentum = "beta1";

  // mu_t, in double: torch computes it as a Python float from the float32 step.
  C10_HOST_DEVICE static double momentum_at(const double* hyper, double step) {
    using D = Declared<NAdam>;
    return hyper[D::hyper("beta1")] * (1.0 - 0.5 * ::pow(0.96, step * hyper[D::hyper("momentum_decay")]));
  }

  C10_HOST_DEVICE static void advance(const double* hyper, double, const float* before, float* after) {
    using D = Declared<NAdam>;
    advance_step<NAdam>(before, after);
    // torch's `mu_product *= mu` multiplies a float32 tensor by a Python float: in float32.
    after[D::scalar("mu_product")] =
        before[D::scalar("mu_product")] * float(momentum_at(hyper, double(after[D::scalar("step")])));
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = NAdam;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr bool kDecoupled = D::option(kFlags, "decoupled_weight_decay");
    static constexpr int kNumStates = D::num_states(kFlags);
    T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, bias_correction2;
    T grad_step, avg_step;  // the two addcdiv values torch computes in double: for the grad and for exp_avg

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in) {
      const double beta1_ = in.hyper[D::hyper("beta1")], beta2_ = in.hyper[D::hyper("beta2")];
      const double wd = in.hyper[D::hyper("weight_decay")];
      const double step = in.next[D::scalar("step")];
      const double mu = momentum_at(in.hyper, step), mu_next = momentum_at(in.hyper, step + 1);
      const double mu_product = in.next[D::scalar("mu_product")];  // already times mu, as torch's is here
      one_minus_beta1 = T(1 - beta1_);
      beta2 = T(beta2_);
      one_minus_beta2 = T(1 - beta2_);
      eps = T(in.hyper[D::hyper("eps")]);
      weight_decay = T(wd);
      decay_factor = T(1 - in.lr * wd);
      bias_correction2 = T(1 - ::pow(beta2_, step));
      grad_step = T(-in.lr * (1.0 - mu) / (1.0 - mu_product));
      avg_step = T((-in.lr * mu_next) / (1.0 - mu_product * mu_next));
    }

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = adam_gradient<kMaximize, kDecoupled>(param, grad, weight_decay, decay_factor);
      V& exp_avg = state[D::state(kFlags, "exp_avg")];
      V& exp_avg_sq = state[D::state(kFlags, "exp_avg_sq")];
      adam_moments(exp_avg, exp_avg_sq, g, one_minus_beta1, beta2, one_minus_beta2);
      const V denom = sqrt_of(exp_avg_sq / V(bias_correction2)) + V(eps);
      param = addcdiv(param, grad_step, g, denom);
      param = addcdiv(param, avg_step, exp_avg, denom);
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(NAdam)
