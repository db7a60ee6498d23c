// LAMB (You et al. 2019) in NVIDIA's formulation (apex FusedLAMB, adam_w_mode, bias correction, trust ratio on
// every param): the bias-corrected Adam direction plus decoupled weight decay, u, scaled per tensor by the trust
// ratio ||param|| / ||u||. Reference: fusedopt.references.LAMB. The global grad-norm clipping it starts with is
// the kernels' own (max_grad_norm); the per-tensor norms are its kTensorSums, summed before the update.
#pragma once

#include <cmath>

#include "algorithm.h"

namespace fusedopt {

struct Lamb {
  static constexpr std::string_view kOp = "lamb_";
  static constexpr Names<5> kHyper{"lr", "beta1", "beta2", "eps", "weight_decay"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 2> kStates{{{"exp_avg", ""}, {"exp_avg_sq", ""}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "beta1";
  // ||param||^2 (before the update) and ||u||^2 of each tensor: the trust ratio.
  static constexpr Names<2> kTensorSums{"param_sq", "update_sq"};

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Lamb>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Lamb;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    static constexpr int kExpAvg = D::state(kFlags, "exp_avg");
    static constexpr int kExpAvgSq = D::state(kFlags, "exp_avg_sq");
    T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, bias_correction1, bias_correction2;
    T neg_step_size;  // -lr * trust ratio; unused while the sums are accumulated

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in) {
      const double beta1_ = in.hyper[D::hyper("beta1")], beta2_ = in.hyper[D::hyper("beta2")];
      const double step = in.next[D::scalar("step")];
      one_minus_beta1 = T(1 - beta1_);
      beta2 = T(beta2_);
      one_minus_beta2 = T(1 - beta2_);
      eps = T(in.hyper[D::hyper("eps")]);
      weight_decay = T(in.hyper[D::hyper("weight_decay")]);
      bias_correction1 = T(1 - ::pow(beta1_, step));
      bias_correction2 = T(1 - ::pow(beta2_, step));
      neg_step_size = in.tensor_sums == nullptr ? T(0) : T(-in.lr * trust_ratio(in.tensor_sums));
    }

    // ||param|| / ||u||, 1 when either is 0 (a NaN norm gives NaN, as in the reference).
    C10_HOST_DEVICE static double trust_ratio(const double* sums) {
      const double param_sq = sums[D::tensor_sum("param_sq")], update_sq = sums[D::tensor_sum("update_sq")];
      if (param_sq == 0.0 || update_sq == 0.0) return 1.0;
      return sqrt_of(param_sq) / sqrt_of(update_sq);
    }

    // u, advancing the moments it is given (the state itself in the update, copies while summing).
    template <typename V>
    C10_HOST_DEVICE V direction(const V& param, const V& grad, V& exp_avg, V& exp_avg_sq) const {
      const V g = kMaximize ? -grad : grad;
      adam_moments(exp_avg, exp_avg_sq, g, one_minus_beta1, beta2, one_minus_beta2);
      const V denom = sqrt_of(exp_avg_sq / V(bias_correction2)) + V(eps);
      return weight_decayed(exp_avg / V(bias_correction1) / denom, param, weight_decay);
    }

    // The terms kTensorSums adds up; `state` is a copy, discarded.
    template <typename V>
    C10_HOST_DEVICE void tensor_terms(const V& param, const V& grad, V* state, V* terms) const {
      const V u = direction(param, grad, state[kExpAvg], state[kExpAvgSq]);
      terms[D::tensor_sum("param_sq")] = param * param;
      terms[D::tensor_sum("update_sq")] = u * u;
    }

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      const V u = direction(param, grad, state[kExpAvg], state[kExpAvgSq]);
      param = param + V(neg_step_size) * u;
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Lamb)
