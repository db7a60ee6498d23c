// fusedopt._C.PlanGuard: the per-step check that a cached launch plan still holds exactly the tensors that
// `optimizer.state` and the param groups hold (see plan_guard.cpp).
#pragma once

#include <torch/extension.h>

namespace fusedopt {

void register_plan_guard(py::module& m);

}  // namespace fusedopt
