#include "grad_check.h"

#include <torch/extension.h>

#include <sstream>

namespace fusedopt {

std::string grad_problem(const at::Tensor& param, const at::Tensor& grad) {
  if (grad_usable(param, grad)) return {};
  if (!grad.defined()) return "the gradient is undefined";
  if (grad.layout() != at::kStrided) return "sparse gradients are not supported";
  std::ostringstream out;
  out << "the gradient of a param of shape " << param.sizes() << ", " << param.scalar_type() << " on "
      << param.device() << " is " << grad.sizes() << ", " << grad.scalar_type() << " on " << grad.device();
  return out.str();
}

namespace {

bool supported_param_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16: case at::kComplexFloat:
    case at::kComplexDouble:
      return true;
    default:
      return false;
  }
}

// Every gradient a step would use (params without one are skipped), checked before the step creates any state:
// raises RuntimeError naming the optimizer class, with torch's wording for sparse gradients.
void check_grads(const std::string& name, const std::vector<at::Tensor>& params) {
  for (const at::Tensor& param : params) {
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    TORCH_CHECK(grad.layout() == at::kStrided, name, " does not support sparse gradients");
    const std::string problem = grad_problem(param, grad);
    TORCH_CHECK(problem.empty(), name, ": ", problem);
    TORCH_CHECK(supported_param_dtype(param.scalar_type()), name, " does not support parameters of dtype ",
                param.scalar_type());
  }
}

}  // namespace

void register_grad_check(py::module& m) {
  m.def("check_grads", &check_grads, py::arg("name"), py::arg("params"),
        "Raises RuntimeError for the first gradient of `params` a step could not use");
}

}  // namespace fusedopt
