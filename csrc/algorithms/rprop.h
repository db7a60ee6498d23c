// Rprop (torch.optim.Rprop): per-element step sizes grown or shrunk by the sign of grad * prev.
// The group's lr only seeds `step_size` when the state is created (Python side, as torch does); the update never
// reads it, so a schedule that changes the lr afterwards changes nothing, as with torch.
#pragma once

#include "algorithm.h"

namespace fusedopt {

struct Rprop {
  static constexpr std::string_view kOp = "rprop_";
  static constexpr Names<5> kHyper{"lr", "etaminus", "etaplus", "step_size_min", "step_size_max"};
  static constexpr Names<1> kOptions{"maximize"};
  static constexpr std::array<StateDecl, 2> kStates{{{"prev", ""}, {"step_size", ""}}};
  static constexpr Names<1> kScalars{"step"};
  static constexpr std::string_view kMomentum = "";

  C10_HOST_DEVICE static void advance(const double*, double, const float* before, float* after) {
    advance_step<Rprop>(before, after);
  }

  template <typename T, uint32_t kFlags>
  struct Rule {
    using Algorithm = Rprop;
    using D = Declared<Algorithm>;
    using opmath_t = T;
    static constexpr bool kMaximize = D::option(kFlags, "maximize");
    static constexpr int kNumStates = D::num_states(kFlags);
    T etaminus, etaplus, step_size_min, step_size_max;

    C10_HOST_DEVICE explicit Rule(const RuleInputs& in)
        : etaminus(T(in.hyper[D::hyper("etaminus")])), etaplus(T(in.hyper[D::hyper("etaplus")])),
          step_size_min(T(in.hyper[D::hyper("step_size_min")])),
          step_size_max(T(in.hyper[D::hyper("step_size_max")])) {}

    template <typename V>
    C10_HOST_DEVICE void operator()(V& param, V grad, V* state) const {
      V g = kMaximize ? -grad : grad;
      V& prev = state[D::state(kFlags, "prev")];
      V& step_size = state[D::state(kFlags, "step_size")];
      // torch maps sign(grad * prev) to the factor in three in-place passes (> 0, then < 0, then == 0), each
      // seeing the previous one's result; kept in that order so that unvalidated etas (a param group added
      // later) map as torch maps them. sign_of(NaN) is 0: a NaN grad keeps the step size and the param.
      const V zero(0);
      V factor = sign_of(g * prev);
      factor = select(greater(factor, zero), V(etaplus), factor);
      factor = select(less(factor, zero), V(etaminus), factor);
      factor = select(equal(factor, zero), V(1), factor);
      step_size = clamped(step_size * factor);
      // Where the step size shrank, torch forgets the grad: no move now, and no sign change seen next step.
      g = select(equal(factor, V(etaminus)), zero, g);
      param = param - sign_of(g) * step_size;
      prev = g;
    }

    // torch's clamp_(min, max): NaN stays NaN (no comparison holds), and max wins when min > max.
    template <typename V>
    C10_HOST_DEVICE V clamped(const V& x) const {
      const V at_least_min = select(less(x, V(step_size_min)), V(step_size_min), x);
      return select(greater(at_least_min, V(step_size_max)), V(step_size_max), at_least_min);
    }
  };
};

}  // namespace fusedopt

FUSEDOPT_ALGORITHM(Rprop)
