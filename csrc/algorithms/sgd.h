// SGD with optional momentum and Nesterov (torch.optim.SGD). No step counter.
#pragma once

#include "algorithm.h"

namespace fusedopt {

struct Sgd {
  static constexpr std::string_view kOp = "sgd_";
  static constexpr Names<4> kHyper{"lr", "momentum", "dampening", "weight_decay"};
  // "momentum": momentum != 0 (torch runs plain SGD for momentum 0 whatever nesterov says).
  static constexpr Names<3> kOptions{"momentum", "nesterov", "maximize"};
  static constexpr std::array<StateDecl, 1> kStates{{{"momentum_buffer", "momentum"}}};
  static constexpr Names<0> kScalars{};
  static constexpr std::string_view kMomentum = "momentum";

  // `fresh` marks a momentum buffer that torch would create by cloning this step's gradient.
  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Sgd;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMomentum = D::option(kFlags, "momentum");
    static constexpr bool kNesterov = D::option(kFlags, "nesterov");
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T neg_lr, momentum, one_minus_dampening, weight_decay;
    bool fresh_state;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in)
        : neg_lr(T(-in.lr)), momentum(T(in.hyper[D::hyper("momentum")])),
          one_minus_dampening(T(1 - in.hyper[D::hyper("dampening")])),
          weight_decay(T(in.hyper[D::hyper("weight_decay")])), fresh_state(in.fresh) {}

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
      if constexpr (kMomentum) {
        V& buf = state[D::state(kFlags, "momentum_buffer")];
        buf = fresh_state ? g : mul_rounded(buf, V(momentum)) + V(one_minus_dampening) * g;
        g = kNesterov ? g + V(momentum) * buf : buf;
      }
      param = param + V(neg_lr) * g;
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Sgd)
