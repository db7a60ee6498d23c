// The one check of whether a gradient can update its param, used everywhere a gradient is read: before a launch
// plan creates any state (fusedopt._C.check_grads), before every cached call runs (CachedCall::grads_ready) and
// by the op itself (ops.cpp). One function, so the three can never disagree about what a usable gradient is.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace pybind11 {
class module_;
}

namespace fusedopt {

// fusedopt._C.check_grads(name, params).
void register_grad_check(pybind11::module_& m);

// Whether `grad` can update `param`: defined, dense, same shape, dtype and device. Inline: every step asks it of
// every gradient, and the answer is almost always yes.
inline bool grad_usable(const at::Tensor& param, const at::Tensor& grad) {
  return grad.defined() && grad.layout() == at::kStrided && grad.scalar_type() == param.scalar_type() &&
         grad.device() == param.device() && grad.sizes() == param.sizes();
}

// Empty when `grad` can update `param` (grad_usable); otherwise why not.
std::string grad_problem(const at::Tensor& param, const at::Tensor& grad);

}  // namespace fusedopt
