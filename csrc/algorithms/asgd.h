// ASGD (torch.optim.ASGD): SGD with a decaying step eta and a running average `ax` of the params.
// eta and mu are per-param scalar state (float32, like torch's): a step reads the values the previous step wrote
// (eta starts at the group's lr, mu at 1, Python side), then `advance` writes the next ones from the new step.
#pragma once

#include <cmath>

#include "algorithm.h"

namespace fusedopt {

struct Asgd {
  static constexpr std::string_view kOp = "asgd_";
  static constexpr Names<5> kHyper{"lr", "lambd", "alpha", "t0", "weight_decay"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 1> kStates{{{"ax", ""}}};
  static constexpr Names<3> kScalars{"step", "eta", "mu"};
  static constexpr std::string_view kMomentum = "";

  // torch computes both in double from the incremented float32 step and the group's lr of this step, then
  // copies them into its float32 tensors.
  C10_HOST_DEVICE static void advance(const double* hyper, double lr, const float* before, float* after) {
    using D = Declared<Asgd>;
    advance_step<Asgd>(before, after);
    const double step = after[D::scalar("step")];
    const double lambd = hyper[D::hyper("lambd")];
    after[D::scalar("eta")] = float(lr / ::pow(1 + lambd * lr * step, hyper[D::hyper("alpha")]));
    const double since_t0 = step - hyper[D::hyper("t0")];
    after[D::scalar("mu")] = float(1 / (since_t0 > 1 ? since_t0 : 1.0));
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Asgd;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T decay, neg_eta, mu, weight_decay;
    bool average;  // torch copies the param into ax while mu is exactly 1 (mu.item() != 1 picks the average)

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in) {
      const double eta = in.scalars[D::scalar("eta")];
      const float mu_ = in.scalars[D::scalar("mu")];
      decay = T(1 - in.hyper[D::hyper("lambd")] * eta);
      neg_eta = T(-eta);
      mu = T(mu_);
      weight_decay = T(in.hyper[D::hyper("weight_decay")]);
      average = mu_ != 1.0f;
    }

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V g = weight_decayed(kMaximize ? -grad : grad, param, weight_decay);
      param = mul_rounded(param, V(decay));  // torch: param.mul_(...), then param.add_(grad, alpha=-eta)
      param = param + V(neg_eta) * g;
      V& ax = state[D::state(kFlags, "ax")];
      ax = average ? ax + (param - ax) * V(mu) : param;
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Asgd)
