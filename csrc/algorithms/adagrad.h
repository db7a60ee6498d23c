// Adagrad (torch.optim.Adagrad). initial_accumulator_value only seeds the state (Python side).
#pragma once

#include "algorithm.h"

namespace fusedopt {

struct Adagrad {
  static constexpr std::string_view kOp = "adagrad_";
  static constexpr Names<4> kHyper{"lr", "lr_decay", "weight_decay", "eps"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 1> kStates{{{"sum", ""}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Adagrad>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Adagrad;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T neg_clr, weight_decay, eps;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in)
        : neg_clr(T(-(in.lr / (1 + (double(in.next[D::scalar("step")]) - 1) * in.hyper[D::hyper("lr_decay")])))),
          weight_decay(T(in.hyper[D::hyper("weight_decay")])), eps(T(in.hyper[D::hyper("eps")])) {}

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
      V& sum = state[D::state(kFlags, "sum")];
      sum = sum + g * g;
      param = addcdiv(param, neg_clr, g, sqrt_of(sum) + V(eps));
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Adagrad)
