// The one check of whether a gradient can update its param, used everywhere a gradient is read: before a launch
// plan creates any state (fusedopt._C.check_grads), before every cached call runs (CachedCall::grads_ready) and
// by the op itself (ops.cpp). One function, so the three can never disagree about what a usable gradient is.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>

#include <string>

#include "host_prefetch.h"

namespace pybind11 {
class module_;
}

namespace fusedopt {

// fusedopt._C.check_grads(name, params).
void register_grad_check(pybind11::module_& m);

// Whether two shapes are equal. IntArrayRef's == calls memcmp, a library call per comparison: shapes have a few
// dims, and steps compare one per tensor.
C10_ALWAYS_INLINE bool same_sizes(at::IntArrayRef a, at::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t d = 0; d < a.size(); ++d) {
    if (a[d] != b[d]) return false;
  }
  return true;
}

// Whether `t` can stand beside `param` in a launch: defined, dense, of `dtype`, on the param's device and shaped
// like it. Inline: every step asks it of every grad and state tensor, and the answer is almost always yes.
C10_ALWAYS_INLINE bool like_param(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype) {
  return t.defined() && t.layout() == at::kStrided && t.scalar_type() == dtype && t.device() == param.device() &&
         same_sizes(t.sizes(), param.sizes());
}

// Whether `grad` can update `param`: like_param in the param's dtype.
C10_ALWAYS_INLINE bool grad_usable(const at::Tensor& param, const at::Tensor& grad) {
  return like_param(grad, param, param.scalar_type());
}

// A param's .grad, read from its autograd metadata (torch::autograd::AutogradMeta, the one implementation of
// c10's interface, as torch's own impl::get_autograd_meta assumes). Tensor::grad() also asks whether the tensor is
// a leaf (for its warning about non-leaf tensors), and TensorImpl::grad() is an out-of-line call that makes a
// virtual one: two calls per param per step.
C10_ALWAYS_INLINE const at::Tensor& grad_of(const at::Tensor& param) {
  static const at::Tensor* const kNoGrad = new at::Tensor();
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(param.unsafeGetTensorImpl()->autograd_meta());
  return meta == nullptr ? *kNoGrad : meta->grad_;
}

// A param's grad is three objects away: the param's TensorImpl, its AutogradMeta, the grad's TensorImpl. Stage
// `stage` (0, 1, 2) requests one of them; stage s reads what stage s - 1 requested (csrc/host_prefetch.h).
C10_ALWAYS_INLINE void prefetch_grad_link(const at::Tensor& param, int stage) {
  if (stage == 0) return host::prefetch_metadata(param);
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(param.unsafeGetTensorImpl()->autograd_meta());
  if (meta == nullptr) return;
  if (stage == 1) return host::prefetch_bytes(meta, 128);  // the grad's link lies in its first bytes
  host::prefetch_metadata(meta->grad_);
}

// Empty when `grad` can update `param` (grad_usable); otherwise why not.
std::string grad_problem(const at::Tensor& param, const at::Tensor& grad);

}  // namespace fusedopt
