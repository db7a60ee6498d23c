// The Python module fusedopt._C, and CachedCall: a fused op call whose arguments are converted from Python
// once per launch plan. Converting thousands of tensors through torch.ops costs about a microsecond each per
// step; a cached call only refreshes the grads (read from the params here) and the few arguments that change
// between steps (hyperparameters, GradScaler tensors), then runs the same registered op through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include "algorithm_spec.h"
#include "ops.h"

#include <string>
#include <vector>

#include "grad_check.h"
#include "host_prefetch.h"
#include "plan_guard.h"

namespace fusedopt {
namespace {

// What the kernel reads of a gradient: a DTensor's (FSDP2, tensor parallel) local shard, as the optimizer hands
// the kernel its param's local shard (fusedopt/_distributed.py); any other gradient itself. A DTensor is a
// Python tensor subclass, so the check on plain gradients is one dispatch-key test.
at::Tensor kernel_grad(const at::Tensor& grad) {
  if (!grad.key_set().has(c10::DispatchKey::Python)) return grad;
  py::object wrapped = py::reinterpret_steal<py::object>(THPVariable_Wrap(grad));
  if (!py::hasattr(wrapped, "_local_tensor")) return grad;
  return THPVariable_Unpack(wrapped.attr("_local_tensor").ptr());
}

// A param's .grad, read from its autograd metadata: Tensor::grad() also asks whether the tensor is a leaf (for
// its warning about non-leaf tensors), a virtual call per param per step.
C10_ALWAYS_INLINE const at::Tensor& grad_of(const at::Tensor& param) { return param.unsafeGetTensorImpl()->grad(); }

// A param's grad is three objects away: the param's TensorImpl, its AutogradMeta, the grad's TensorImpl. Stage
// `stage` (0, 1, 2) requests one of them; stage s reads what stage s - 1 requested (csrc/host_prefetch.h).
C10_ALWAYS_INLINE void prefetch_grad_link(const at::Tensor& param, int stage) {
  if (stage == 0) return host::prefetch_metadata(param);
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(param.unsafeGetTensorImpl()->autograd_meta());
  if (meta == nullptr) return;
  if (stage == 1) return host::prefetch_bytes(meta, 128);  // the grad's link lies in its first bytes
  host::prefetch_metadata(meta->grad_);
}

// For a loop at params[i]: the links of the grad chains of the params ahead.
C10_ALWAYS_INLINE void prefetch_grads_ahead(const std::vector<at::Tensor>& params, size_t i) {
  host::prefetch_chains_ahead<3>(i, params.size(),
                                 [&](size_t ahead, int stage) { prefetch_grad_link(params[ahead], stage); });
}

class CachedCall {
 public:
  // `args` are the op's arguments by schema name (an argument with a default may be left out); `grad_sources`
  // the params whose .grad fills the op's `grads` argument (complex params through their real view, as the op
  // receives the param itself).
  CachedCall(const std::string& op_name, const py::dict& args, std::vector<at::Tensor> grad_sources)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(("fusedopt::" + op_name).c_str(), "")),
        grad_sources_(std::move(grad_sources)) {
    const auto& arguments = op_.schema().arguments();
    size_t used = 0;
    for (const auto& argument : arguments) {
      const py::str name(argument.name());
      if (args.contains(name)) {
        stack_.push_back(torch::jit::toIValue(args[name], argument.real_type()));
        ++used;
      } else {
        TORCH_CHECK(argument.default_value().has_value(), "fusedopt.CachedCall: ", op_name, " needs argument ",
                    argument.name());
        stack_.push_back(*argument.default_value());
      }
    }
    TORCH_CHECK(used == args.size(), "fusedopt.CachedCall: ", op_name, " got an argument its schema lacks: ",
                py::str(args.attr("keys")()).cast<std::string>());
    grads_index_ = argument_index("grads");
    TORCH_CHECK(stack_[grads_index_].toTensorList().size() == grad_sources_.size(),
                "fusedopt.CachedCall: one grad source per grad");
    stack_[grads_index_] = c10::List<at::Tensor>();  // filled per call (run)
  }

  // Whether every param of this call has a gradient, i.e. the call can run as built; raises when a gradient
  // could not be used. A step checks every launch this way before it runs any, so a bad gradient in one
  // launch cannot leave the params of another half-updated.
  bool grads_ready() const {
    for (size_t i = 0; i < grad_sources_.size(); ++i) {
      prefetch_grads_ahead(grad_sources_, i);
      const at::Tensor& param = grad_sources_[i];
      const at::Tensor& grad = grad_of(param);
      if (!grad.defined()) return false;
      if (!grad_usable(param, grad)) TORCH_CHECK(false, "fusedopt: ", grad_problem(param, grad));
    }
    return true;
  }

  // Runs the op with fresh grads and `updates` ({argument name: value}) replacing the cached arguments. The
  // grads go into a list of this call only: holding them past the call would keep a step's grads alive until
  // the next one (after zero_grad(set_to_none=True), memory the next backward needs), and free them inside it.
  void run(const py::dict& updates) {
    c10::List<at::Tensor> grads;
    grads.reserve(grad_sources_.size());
    for (size_t i = 0; i < grad_sources_.size(); ++i) {
      prefetch_grads_ahead(grad_sources_, i);
      const at::Tensor& grad = grad_of(grad_sources_[i]);
      TORCH_CHECK(grad.defined(), "fusedopt: a param of this step lost its gradient");
      at::Tensor local = kernel_grad(grad);
      grads.push_back(local.is_complex() ? at::view_as_real(local) : std::move(local));
    }
    const auto& arguments = op_.schema().arguments();
    for (const auto& [name, value] : updates) {
      const size_t index = argument_index(py::cast<std::string>(name).c_str());
      stack_[index] = torch::jit::toIValue(value, arguments[index].real_type());
    }
    torch::jit::Stack stack = stack_;
    stack[grads_index_] = std::move(grads);
    py::gil_scoped_release no_gil;
    op_.callBoxed(stack);
  }

 private:
  size_t argument_index(const char* name) const {
    const auto index = op_.schema().argumentIndexWithName(name);
    TORCH_CHECK(index.has_value(), "fusedopt.CachedCall: ", op_.schema().name(), " has no argument ", name);
    return *index;
  }

  c10::OperatorHandle op_;
  std::vector<at::Tensor> grad_sources_;
  torch::jit::Stack stack_;
  size_t grads_index_;
};

bool none_has_grad(const std::vector<at::Tensor>& params) {
  for (const auto& p : params) {
    if (grad_of(p).defined()) return false;
  }
  return true;
}

}  // namespace
}  // namespace fusedopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedopt kernels; importing this module registers the torch.ops.fusedopt ops";
  py::class_<fusedopt::CachedCall>(m, "CachedCall")
      .def(py::init<const std::string&, const py::dict&, std::vector<at::Tensor>>())
      .def("grads_ready", &fusedopt::CachedCall::grads_ready)
      .def("run", &fusedopt::CachedCall::run);
  m.def("none_has_grad", &fusedopt::none_has_grad, "True when no tensor in the list has a .grad");
  m.def(
      "param_rounding_modes",
      [] { return std::vector<std::string>(fusedopt::kRoundingNames.begin(), fusedopt::kRoundingNames.end()); },
      "The values the step ops' param_rounding argument takes (csrc/storage.h)");
  fusedopt::register_plan_guard(m);
  fusedopt::register_grad_check(m);
  fusedopt::register_algorithm_specs(m);
  m.def(
      "_set_cooperative_launch", [](bool enabled) { return fusedopt::cooperative_launch_enabled().exchange(enabled); },
      "CUDA: allow (True) or forbid one cooperative launch for reduce + update; returns the previous setting");
}
