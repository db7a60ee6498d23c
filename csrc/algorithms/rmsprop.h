// RMSprop (torch.optim.RMSprop) with momentum and centered.
#pragma once

#include "algorithm.h"

namespace fusedopt {

struct Rmsprop {
  static constexpr std::string_view kOp = "rmsprop_";
  static constexpr Names<5> kHyper{"lr", "alpha", "eps", "weight_decay", "momentum"};
  // "momentum": momentum > 0.
  static constexpr Names<3> kOptions{"momentum", "centered", "maximize"};
  static constexpr std::array<StateDecl, 3> kStates{
      {{"square_avg", ""}, {"momentum_buffer", "momentum"}, {"grad_avg", "centered"}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "momentum";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Rmsprop>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Rmsprop;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMomentum = D::option(kFlags, "momentum");
    static constexpr bool kCentered = D::option(kFlags, "centered");
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in)
        : neg_lr(T(-in.lr)), alpha(T(in.hyper[D::hyper("alpha")])),
          one_minus_alpha(T(1 - in.hyper[D::hyper("alpha")])), eps(T(in.hyper[D::hyper("eps")])),
          weight_decay(T(in.hyper[D::hyper("weight_decay")])), momentum(T(in.hyper[D::hyper("momentum")])) {}

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
      V& square_avg = state[D::state(kFlags, "square_avg")];
      square_avg = square_avg * V(alpha) + V(one_minus_alpha) * g * g;
      V avg;
      if constexpr (kCentered) {
        V& grad_avg = state[D::state(kFlags, "grad_avg")];
        grad_avg = lerp(grad_avg, g, one_minus_alpha);
        avg = sqrt_of(square_avg - grad_avg * grad_avg);
      } else {
        avg = sqrt_of(square_avg);
      }
      avg = avg + V(eps);
      if constexpr (kMomentum) {
        V& buf = state[D::state(kFlags, "momentum_buffer")];
        buf = buf * V(momentum) + g / avg;
        param = param + V(neg_lr) * buf;
      } else {
        param = addcdiv(param, neg_lr, g, avg);
      }
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Rmsprop)
