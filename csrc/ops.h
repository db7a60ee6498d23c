// Host side of every fused op, shared by the CPU (ops.cpp) and CUDA (step_cuda.cu) registrations: input
// validation, the table cache, and one templated implementation per algorithm that turns runtime options into
// template flags and hands the prepared step to a device Runner.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <utility>
#include <vector>

#include "step_table.h"

namespace fusedopt {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;
using OptionalTensor = std::optional<at::Tensor>;

// A tensor-list argument read in place from the boxed call's stack. The ops are registered as boxed kernels
// so that a step reads its thousands of tensors where the caller put them: the unboxed wrapper would copy
// every list into a std::vector<at::Tensor> (a reference count up and down per tensor) on every call.
class TensorSpan {
 public:
  TensorSpan() = default;
  explicit TensorSpan(c10::ArrayRef<c10::IValue> items) : items_(items) {}
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const at::Tensor& operator[](size_t i) const { return items_[i].toTensor(); }

 private:
  c10::ArrayRef<c10::IValue> items_;
};

// The arguments every step op takes after its options (the schema tail in ops.cpp): a device-read momentum
// per group (in the table), gradient unscaling / skipping / clipping and a per-step LR schedule to advance
// (per-call values: StepArgs, never in the table).
struct StepExtras {
  OptionalTensorList momenta;
  OptionalTensor grad_scale;
  OptionalTensor skip_if;
  OptionalTensor found_inf;
  OptionalTensor grad_stats;
  double max_grad_norm;
  int64_t phases;
  OptionalTensor schedule_lrs;
  OptionalTensor schedule_momenta;
  OptionalTensor schedule_state;
  OptionalTensor schedule_program;
};

struct StepInputs {
  const char* op_name;
  TensorSpan params;
  TensorSpan grads;
  std::vector<TensorSpan> states;  // the state lists this configuration uses, in rule slot order
  bool uses_step;
  TensorSpan steps;
  std::vector<int64_t> fresh_state;  // empty, or one 0/1 per tensor (SGD)
  std::vector<int64_t> group_ends;
  std::vector<double> hyper;
  OptionalTensorList lrs;
  at::Tensor host_table;
  at::Tensor device_table;
  int64_t momentum_slot;  // the hyper slot `momenta` replaces, or -1 when the algorithm has no momentum
  StepExtras extras;
};

// A step op's arguments on the boxed stack, read by their schema names.
class BoxedArgs {
 public:
  BoxedArgs(const c10::OperatorHandle& op, torch::jit::Stack& stack)
      : schema_(op.schema()), stack_(stack), first_(stack.size() - schema_.arguments().size()) {}

  const c10::IValue& operator[](const char* name) const {
    const auto index = schema_.argumentIndexWithName(name);
    TORCH_INTERNAL_ASSERT(index.has_value(), schema_.name(), " has no argument ", name);
    return stack_[first_ + *index];
  }
  TensorSpan tensors(const char* name) const { return TensorSpan((*this)[name].toListRef()); }
  bool flag(const char* name) const { return (*this)[name].toBool(); }
  OptionalTensor optional(const char* name) const { return (*this)[name].toOptional<at::Tensor>(); }

  // Everything but the state lists, which the algorithm picks from its options.
  StepInputs inputs(const char* op_name, std::vector<TensorSpan> states, bool uses_step, int64_t momentum_slot) const {
    const BoxedArgs& a = *this;
    return StepInputs{op_name, a.tensors("params"), a.tensors("grads"), std::move(states), uses_step,
                      uses_step ? a.tensors("state_steps") : TensorSpan{},
                      uses_step ? std::vector<int64_t>{} : a["fresh_state"].toIntVector(),
                      a["group_ends"].toIntVector(), a["hyper"].toDoubleVector(),
                      a["lrs"].to<OptionalTensorList>(), a["host_table"].toTensor(), a["device_table"].toTensor(),
                      momentum_slot,
                      StepExtras{a["momenta"].to<OptionalTensorList>(), a.optional("grad_scale"), a.optional("skip_if"),
                                 a.optional("found_inf"), a.optional("grad_stats"), a["max_grad_norm"].toDouble(),
                                 a["phases"].toInt(), a.optional("schedule_lrs"), a.optional("schedule_momenta"),
                                 a.optional("schedule_state"), a.optional("schedule_program")}};
  }

  // The op returns nothing: pop its arguments.
  void done() const { torch::jit::drop(stack_, schema_.arguments().size()); }

 private:
  const c10::FunctionSchema& schema_;
  torch::jit::Stack& stack_;
  size_t first_;
};

struct PreparedStep {
  bool empty = true;          // no tensors: nothing to launch
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  at::Tensor host_table;      // the table as written by the host (pinned for CUDA params)
  TableView host{nullptr};    // typed view of host_table
  at::Tensor device_table;    // the device copy (undefined for CPU params)
  StepArgs args{};            // this call's per-call values, passed to the kernel by value
  bool table_changed = false; // the device copy must be refreshed before the launch
  bool groups_changed = false;  // only the group entries changed (a hyperparameter): refresh just those
  // Tensors the kernel cannot update in place (a layout it cannot walk linearly) are updated through a dense
  // working copy: (original, copy) pairs to copy back after the launch, and read-only copies to keep alive.
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  std::vector<at::Tensor> keep_alive;
};

// CUDA: whether a step that reduces and updates may use one cooperative launch (else: two launches). Tests
// switch it off to run the fallback that serves devices without cooperative launch; on by default.
std::atomic<bool>& cooperative_launch_enabled();

// Validates every input (nothing is modified before all checks pass) and refreshes the host table when a
// pointer, size or hyperparameter differs from what it holds.
PreparedStep prepare_step(const StepInputs& inputs);
// Copies the dense working copies back into their originals.
void finish_step(PreparedStep& prepared);

template <typename T>
struct TypeTag {
  using type = T;
};

// Runner::run<scalar_t, Rule<opmath_t>> for the params' dtype; rule_for maps TypeTag<opmath_t> to TypeTag<Rule>.
template <class Runner, typename RuleFor>
void run_for_dtype(PreparedStep& prepared, RuleFor rule_for) {
  auto run = [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using rule_t = typename decltype(rule_for(TypeTag<at::opmath_type<scalar_t>>{}))::type;
    Runner::template run<scalar_t, rule_t>(prepared);
  };
  switch (prepared.dtype) {
    case at::kFloat: run(TypeTag<float>{}); break;
    case at::kDouble: run(TypeTag<double>{}); break;
    case at::kHalf: run(TypeTag<c10::Half>{}); break;
    case at::kBFloat16: run(TypeTag<c10::BFloat16>{}); break;
    default: TORCH_CHECK(false, "fusedopt: unsupported parameter dtype ", prepared.dtype);
  }
}

#define FUSEDOPT_FLAG(f) decltype(f)::value

// Runs one prepared step: the flags pick the rule, the dtype picks the storage type.
template <class Runner, typename RuleFor, typename... Flags>
void launch(const StepInputs& inputs, RuleFor rule_for, Flags... flags) {
  PreparedStep prepared = prepare_step(inputs);
  if (prepared.empty) return;
  with_flags([&](auto... chosen) { run_for_dtype<Runner>(prepared, rule_for(chosen...)); }, flags...);
  finish_step(prepared);
}

// ---- One implementation per algorithm, registered for each device with its Runner (boxed: see TensorSpan). ----

template <class Runner>
void sgd_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const BoxedArgs a(op, *stack);
  // torch's SGD runs plain SGD for momentum 0 whatever nesterov says (it validates only its defaults).
  const bool momentum = a.flag("momentum"), nesterov = momentum && a.flag("nesterov");
  std::vector<TensorSpan> states;
  if (momentum) states.push_back(a.tensors("momentum_buffers"));
  TORCH_CHECK(momentum || a.tensors("momentum_buffers").empty(), "fusedopt.sgd_: momentum_buffers given without momentum");
  launch<Runner>(
      a.inputs("sgd_", std::move(states), false, 1),
      [](auto m, auto n, auto x) {
        return [](auto t) {
          return TypeTag<SgdRule<typename decltype(t)::type, FUSEDOPT_FLAG(m), FUSEDOPT_FLAG(n), FUSEDOPT_FLAG(x)>>{};
        };
      },
      momentum, nesterov, a.flag("maximize"));
  a.done();
}

template <class Runner>
void adam_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const BoxedArgs a(op, *stack);
  const bool amsgrad = a.flag("amsgrad");
  std::vector<TensorSpan> states{a.tensors("exp_avgs"), a.tensors("exp_avg_sqs")};
  if (amsgrad) states.push_back(a.tensors("max_exp_avg_sqs"));
  TORCH_CHECK(amsgrad || a.tensors("max_exp_avg_sqs").empty(), "fusedopt.adam_: max_exp_avg_sqs given without amsgrad");
  launch<Runner>(
      a.inputs("adam_", std::move(states), true, 1),
      [](auto am, auto m, auto d) {
        return [](auto t) {
          return TypeTag<AdamRule<typename decltype(t)::type, FUSEDOPT_FLAG(am), FUSEDOPT_FLAG(m), FUSEDOPT_FLAG(d)>>{};
        };
      },
      amsgrad, a.flag("maximize"), a.flag("decoupled_weight_decay"));
  a.done();
}

template <class Runner>
void adagrad_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const BoxedArgs a(op, *stack);
  launch<Runner>(
      a.inputs("adagrad_", {a.tensors("state_sums")}, true, -1),
      [](auto m) { return [](auto t) { return TypeTag<AdagradRule<typename decltype(t)::type, FUSEDOPT_FLAG(m)>>{}; }; },
      a.flag("maximize"));
  a.done();
}

template <class Runner>
void adadelta_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const BoxedArgs a(op, *stack);
  launch<Runner>(
      a.inputs("adadelta_", {a.tensors("square_avgs"), a.tensors("acc_deltas")}, true, -1),
      [](auto m) { return [](auto t) { return TypeTag<AdadeltaRule<typename decltype(t)::type, FUSEDOPT_FLAG(m)>>{}; }; },
      a.flag("maximize"));
  a.done();
}

template <class Runner>
void adamax_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const BoxedArgs a(op, *stack);
  launch<Runner>(
      a.inputs("adamax_", {a.tensors("exp_avgs"), a.tensors("exp_infs")}, true, 1),
      [](auto m) { return [](auto t) { return TypeTag<AdamaxRule<typename decltype(t)::type, FUSEDOPT_FLAG(m)>>{}; }; },
      a.flag("maximize"));
  a.done();
}

template <class Runner>
void rmsprop_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const BoxedArgs a(op, *stack);
  const bool momentum = a.flag("momentum"), centered = a.flag("centered");
  std::vector<TensorSpan> states{a.tensors("square_avgs")};
  if (momentum) states.push_back(a.tensors("momentum_buffers"));
  if (centered) states.push_back(a.tensors("grad_avgs"));
  TORCH_CHECK(momentum || a.tensors("momentum_buffers").empty(), "fusedopt.rmsprop_: momentum_buffers given without momentum");
  TORCH_CHECK(centered || a.tensors("grad_avgs").empty(), "fusedopt.rmsprop_: grad_avgs given without centered");
  launch<Runner>(
      a.inputs("rmsprop_", std::move(states), true, 4),
      [](auto m, auto c, auto x) {
        return [](auto t) {
          return TypeTag<RmspropRule<typename decltype(t)::type, FUSEDOPT_FLAG(m), FUSEDOPT_FLAG(c), FUSEDOPT_FLAG(x)>>{};
        };
      },
      momentum, centered, a.flag("maximize"));
  a.done();
}

#define FUSEDOPT_BOXED(op, Runner) torch::CppFunction::makeFromBoxedFunction<&fusedopt::op##boxed<Runner>>()

// Registers every algorithm's implementation for one dispatch key.
template <class Runner>
void register_impls(torch::Library& m) {
  m.impl("sgd_", FUSEDOPT_BOXED(sgd_, Runner));
  m.impl("adam_", FUSEDOPT_BOXED(adam_, Runner));
  m.impl("adagrad_", FUSEDOPT_BOXED(adagrad_, Runner));
  m.impl("adadelta_", FUSEDOPT_BOXED(adadelta_, Runner));
  m.impl("adamax_", FUSEDOPT_BOXED(adamax_, Runner));
  m.impl("rmsprop_", FUSEDOPT_BOXED(rmsprop_, Runner));
}

}  // namespace fusedopt
