// Adam and AdamW (torch.optim.Adam / AdamW; AdamW is Adam with decoupled_weight_decay).
#pragma once

#include <cmath>

#include "algorithm.h"

namespace fusedopt {

struct Adam {
  static constexpr std::string_view kOp = "adam_";
  static constexpr Names<5> kHyper{"lr", "beta1", "beta2", "eps", "weight_decay"};
  static constexpr Names<3> kOptions{"amsgrad", "maximize", "decoupled_weight_decay"};
  static constexpr std::array<StateDecl, 3> kStates{
      {{"exp_avg", ""}, {"exp_avg_sq", ""}, {"max_exp_avg_sq", "amsgrad"}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "beta1";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Adam>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Adam;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kAmsgrad = D::option(kFlags, "amsgrad");
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr bool kDecoupled = D::option(kFlags, "decoupled_weight_decay");
    static constexpr int kNumStates = D::num_states(kFlags);
    T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, neg_step_size, bias_correction2_sqrt;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in) {
      const double beta1_ = in.hyper[D::hyper("beta1")], beta2_ = in.hyper[D::hyper("beta2")];
      const double wd = in.hyper[D::hyper("weight_decay")];
      const double step = in.next[D::scalar("step")];
      one_minus_beta1 = T(1 - beta1_);
      beta2 = T(beta2_);
      one_minus_beta2 = T(1 - beta2_);
      eps = T(in.hyper[D::hyper("eps")]);
      weight_decay = T(wd);
      decay_factor = T(1 - in.lr * wd);
      neg_step_size = T(-(in.lr / (1 - ::pow(beta1_, step))));
      bias_correction2_sqrt = T(::sqrt(1 - ::pow(beta2_, step)));
    }

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = adam_gradient<kMaximize, kDecoupled>(param, grad, weight_decay, decay_factor);
      V& exp_avg = state[D::state(kFlags, "exp_avg")];
      V& exp_avg_sq = state[D::state(kFlags, "exp_avg_sq")];
      adam_moments(exp_avg, exp_avg_sq, g, one_minus_beta1, beta2, one_minus_beta2);
      V second_moment = exp_avg_sq;
      if constexpr (kAmsgrad) {
        V& max_exp_avg_sq = state[D::state(kFlags, "max_exp_avg_sq")];
        max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
        second_moment = max_exp_avg_sq;
      }
      const V denom = sqrt_of(second_moment) / V(bias_correction2_sqrt) + V(eps);
      param = addcdiv(param, neg_step_size, exp_avg, denom);
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Adam)
