// Adamax (torch.optim.Adamax).
#pragma once

#include <cmath>

#include "algorithm.h"

namespace fusedopt {

struct Adamax {
  static constexpr std::string_view kOp = "adamax_";
  static constexpr Names<5> kHyper{"lr", "beta1", "beta2", "eps", "weight_decay"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 2> kStates{{{"exp_avg", ""}, {"exp_inf", ""}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "beta1";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Adamax>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Adamax;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T one_minus_beta1, beta2, eps, weight_decay, neg_clr;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in)
        : one_minus_beta1(T(1 - in.hyper[D::hyper("beta1")])), beta2(T(in.hyper[D::hyper("beta2")])),
          eps(T(in.hyper[D::hyper("eps")])), weight_decay(T(in.hyper[D::hyper("weight_decay")])),
          neg_clr(T(-(in.lr / (1 - ::pow(in.hyper[D::hyper("beta1")], double(in.next[D::scalar("step")])))))) {}

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
      V& exp_avg = state[D::state(kFlags, "exp_avg")];
      V& exp_inf = state[D::state(kFlags, "exp_inf")];
      exp_avg = lerp(exp_avg, g, one_minus_beta1);
      exp_inf = nan_propagating_max(exp_inf * V(beta2), abs_of(g) + V(eps));
      param = addcdiv(param, neg_clr, exp_avg, exp_inf);
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Adamax)
