// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolation of
// momentum and gradient, with decoupled weight decay. Reference: fusedopt.references.Lion.
#pragma once

#include "algorithm.h"

namespace fusedopt {

struct Lion {
  static constexpr std::string_view kOp = "lion_";
  static constexpr Names<4> kHyper{"lr", "beta1", "beta2", "weight_decay"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 1> kStates{{{"exp_avg", ""}}};
  // Counted as torch.optim counts it (checkpoints and schedules see the usual layout); the update ignores it.
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "beta1";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Lion>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Lion;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T one_minus_beta1, one_minus_beta2, decay_factor, neg_lr;
    bool decays;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in) {
      const double wd = in.hyper[D::hyper("weight_decay")];
      one_minus_beta1 = T(1 - in.hyper[D::hyper("beta1")]);
      one_minus_beta2 = T(1 - in.hyper[D::hyper("beta2")]);
      decay_factor = T(1 - in.lr * wd);
      neg_lr = T(-in.lr);
      decays = wd != 0;  // the reference skips the multiply, which matters for an inf/nan param
    }

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = kMaximize ? -grad : grad;
      V& exp_avg = state[D::state(kFlags, "exp_avg")];
      if (decays) param = param * V(decay_factor);
      param = param + V(neg_lr) * sign_of(lerp(exp_avg, g, one_minus_beta1));
      exp_avg = lerp(exp_avg, g, one_minus_beta2);
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Lion)
