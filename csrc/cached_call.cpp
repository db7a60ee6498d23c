// The Python module fusedopt._C, and CachedCall: a fused op call whose arguments are converted from Python
// once per launch plan. Converting thousands of tensors through torch.ops costs about a microsecond each per
// step. A cached call walks its tensors once per step (prepare: every check, every table entry, each grad read
// from its param) and then runs the op's kernel for each call of the step with the few arguments that change
// between calls (hyperparameters, GradScaler tensors, phases): the dispatcher would walk every tensor again for
// its dispatch keys, and the op once more for its checks.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include "algorithm_spec.h"
#include "ops.h"

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "grad_check.h"
#include "host_prefetch.h"
#include "plan_guard.h"

namespace fusedopt {
namespace {

std::map<std::pair<std::string, c10::DeviceType>, DirectStep>& direct_steps() {
  static auto* steps = new std::map<std::pair<std::string, c10::DeviceType>, DirectStep>();
  return *steps;
}

}  // namespace

void add_direct_step(std::string_view op, c10::DeviceType device, DirectStep step) {
  direct_steps()[{std::string(op), device}] = step;
}

const DirectStep* find_direct_step(std::string_view op, c10::DeviceType device) {
  const auto found = direct_steps().find({std::string(op), device});
  return found == direct_steps().end() ? nullptr : &found->second;
}

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
    stack_[grads_index_] = c10::List<at::Tensor>();  // filled per step, or read from the params (direct_)
    const c10::List<at::Tensor> params = stack_[argument_index("params")].toTensorList();
    TORCH_CHECK(params.size() == grad_sources_.size(), "fusedopt.CachedCall: one grad source per param");
    for (size_t i = 0; i < params.size(); ++i) direct_ = direct_ && params.get(i).is_same(grad_sources_[i]);
    if (params.empty()) return;
    step_ = find_direct_step(op_name, params.get(0).device().type());
    uint32_t mask = 0;
    key_ = launch_key(step_inputs(mask));
  }

  // Before any call of a step: one pass over every tensor of this call (the op's checks, the table entries),
  // every launch of the step before any runs, so that a bad gradient in one launch cannot leave the params of
  // another half-updated. False when the call no longer fits its tensors (a param without a gradient, a tensor
  // of another dtype, device or shape): the plan is rebuilt, and the rebuild raises where torch would.
  bool prepare() {
    release();
    // No kernel for this device here: the op is called through the dispatcher (dispatch), which says so.
    if (step_ == nullptr) return ready_ = gather_grads();
    if (!direct_ && !gather_grads()) return false;
    uint32_t mask = 0;
    ready_ = prepare_tensors(step_inputs(mask), direct_ ? GradsFrom::kParams : GradsFrom::kList, key_, prepared_);
    if (!ready_) release();
    return ready_;
  }

  // One call of the step prepared last, with `updates` ({argument name: value}) replacing the cached arguments.
  void run(const py::dict& updates) {
    const auto& arguments = op_.schema().arguments();
    for (const auto& [name, value] : updates) {
      const size_t index = update_index(name);
      stack_[index] = torch::jit::toIValue(value, arguments[index].real_type());
    }
    TORCH_CHECK(ready_, "fusedopt.CachedCall.run: prepare() has not succeeded for this step");
    if (step_ == nullptr) return dispatch();
    RECORD_FUNCTION(op_.schema().name().c_str(), std::vector<c10::IValue>());
    uint32_t mask = 0;
    const StepInputs inputs = step_inputs(mask);
    prepare_call(inputs, prepared_);
    py::gil_scoped_release no_gil;
    step_->run(prepared_, mask);
    prepared_.table_changed = false;  // this call wrote it (and uploaded it): the step's next call reuses it
  }

  // After the step's last call: the grads gathered and any dense working copies are let go. Holding them past
  // the step would keep a step's grads alive until the next one (after zero_grad(set_to_none=True), memory the
  // next backward needs).
  void release() {
    ready_ = false;
    prepared_ = PreparedStep{};
    if (!direct_ || step_ == nullptr) stack_[grads_index_] = c10::List<at::Tensor>();
  }

 private:
  size_t argument_index(const char* name) const {
    const auto index = op_.schema().argumentIndexWithName(name);
    TORCH_CHECK(index.has_value(), "fusedopt.CachedCall: ", op_.schema().name(), " has no argument ", name);
    return *index;
  }

  // The schema index of an argument run() replaces. The step passes the same few names at every call (string
  // constants of its code, so the same objects): found by identity, then by value, before the schema's own
  // search by name, which compares strings with every argument before it (~0.1 us per name).
  size_t update_index(py::handle name) {
    for (const auto& [known, index] : update_indices_) {
      if (known.ptr() == name.ptr()) return index;
    }
    for (const auto& [known, index] : update_indices_) {
      if (known.equal(name)) return index;
    }
    const size_t index = argument_index(py::cast<std::string>(name).c_str());
    update_indices_.emplace_back(py::reinterpret_borrow<py::object>(name), index);  // one entry per name
    return index;
  }

  StepInputs step_inputs(uint32_t& mask) { return step_->inputs(op_, stack_, mask); }

  // The grads list of a call whose kernel params are views or local shards of the params (complex params,
  // DTensor), or that runs through the dispatcher: false when a param has no usable gradient.
  bool gather_grads() {
    c10::List<at::Tensor> grads;
    grads.reserve(grad_sources_.size());
    for (size_t i = 0; i < grad_sources_.size(); ++i) {
      prefetch_grads_ahead(grad_sources_, i);
      const at::Tensor& grad = grad_of(grad_sources_[i]);
      if (!grad_usable(grad_sources_[i], grad)) return false;
      at::Tensor local = kernel_grad(grad);
      grads.push_back(local.is_complex() ? at::view_as_real(local) : std::move(local));
    }
    stack_[grads_index_] = std::move(grads);
    return true;
  }

  // The op through the dispatcher, with the grads prepare() gathered.
  void dispatch() {
    torch::jit::Stack stack = stack_;
    py::gil_scoped_release no_gil;
    op_.callBoxed(stack);
  }

  c10::OperatorHandle op_;
  std::vector<at::Tensor> grad_sources_;
  torch::jit::Stack stack_;
  size_t grads_index_;
  std::vector<std::pair<py::object, size_t>> update_indices_;  // run()'s names: their schema index
  bool direct_ = true;  // every kernel param is its own grad source: the pass reads each grad from it
  const DirectStep* step_ = nullptr;
  LaunchKey key_{at::kFloat, at::kCPU, at::kFloat};  // what the plan was built for
  PreparedStep prepared_;  // the step's table pass, valid while ready_
  bool ready_ = false;
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
      .def("prepare", &fusedopt::CachedCall::prepare)
      .def("run", &fusedopt::CachedCall::run)
      .def("release", &fusedopt::CachedCall::release);
  m.def("none_has_grad", &fusedopt::none_has_grad, "True when no tensor in the list has a .grad");
  // Whether any RecordFunction callback (the profiler, an observer) is registered, globally or on this thread.
  // Without one, a record_function range runs nothing: the step's wrapper skips entering it (fusedopt/optimizer.py).
  m.def("record_function_observed", [] { return at::hasCallbacks(); },
        "True when a RecordFunction callback is registered (globally or on this thread)");
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
