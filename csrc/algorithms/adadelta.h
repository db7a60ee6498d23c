// Adadelta (torch.optim.Adadelta).
#pragma once

#include "algorithm.h"

namespace fusedopt {

struct Adadelta {
  static constexpr std::string_view kOp = "adadelta_";
  static constexpr Names<4> kHyper{"lr", "rho", "eps", "weight_decay"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 2> kStates{{{"square_avg", ""}, {"acc_delta", ""}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Adadelta>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Adadelta;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T neg_lr, rho, one_minus_rho, eps, weight_decay;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in)
        : neg_lr(T(-in.lr)), rho(T(in.hyper[D::hyper("rho")])), one_minus_rho(T(1 - in.hyper[D::hyper("rho")])),
          eps(T(in.hyper[D::hyper("eps")])), weight_decay(T(in.hyper[D::hyper("weight_decay")])) {}

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
      V& square_avg = state[D::state(kFlags, "square_avg")];
      V& acc_delta = state[D::state(kFlags, "acc_delta")];
      square_avg = square_avg * V(rho) + V(one_minus_rho) * g * g;
      const V std = sqrt_of(square_avg + V(eps));
      const V delta = sqrt_of(acc_delta + V(eps)) / std * g;
      acc_delta = acc_delta * V(rho) + V(one_minus_rho) * delta * delta;
      param = param + V(neg_lr) * delta;
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Adadelta)
