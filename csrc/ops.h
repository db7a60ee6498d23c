// Host side of every fused op, shared by the CPU and CUDA registrations (csrc/algorithm_op.h,
// csrc/algorithm_cuda.cuh): reading the boxed arguments by name, validation and the table cache (ops.cpp), and
// the one templated implementation every algorithm's op runs (step_boxed), which turns runtime options into
// template flags and hands the prepared step to a device Runner.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <string_view>

#include "step_table.h"

namespace fusedopt {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;
using OptionalTensor = std::optional<at::Tensor>;

// A list argument (Tensor[], int[], float[]) read in place from the boxed call's stack, its elements as the
// IValues the list holds. The ops are registered as boxed kernels so that a step reads its thousands of tensors
// where the caller put them: the unboxed wrapper would copy every list into a std::vector<at::Tensor> (a
// reference count up and down per tensor) on every call. Likewise toIntVector()/toDoubleVector() would copy an
// int[]/float[] at every call: for fresh_state, one flag per tensor, an allocation large enough to make glibc
// consolidate its free lists (every grad the last backward freed, cold) inside the step.
template <typename T>
class ListSpan {
 public:
  ListSpan() = default;
  explicit ListSpan(c10::ArrayRef<c10::IValue> items) : items_(items) {}
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  decltype(auto) operator[](size_t i) const {  // a tensor by const reference, a number by value
    if constexpr (std::is_same_v<T, at::Tensor>) {
      return items_[i].toTensor();
    } else if constexpr (std::is_same_v<T, double>) {
      return items_[i].toDouble();
    } else {
      return items_[i].toInt();
    }
  }

 private:
  c10::ArrayRef<c10::IValue> items_;
};
using TensorSpan = ListSpan<at::Tensor>;

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
  // Low-precision storage (csrc/storage.h): no lists, "nearest" and no rng_state for the plain kernels.
  TensorSpan master_params;
  TensorSpan kahan_comp;
  std::string_view param_rounding;
  OptionalTensor rng_state;
};

struct StepInputs {
  std::string_view op_name;
  TensorSpan params;
  TensorSpan grads;
  std::vector<TensorSpan> states;   // the state lists these options use, in declaration order
  std::vector<TensorSpan> scalars;  // one list per declared scalar (kScalars)
  ListSpan<int64_t> fresh_state;  // empty, or one 0/1 per tensor
  ListSpan<int64_t> group_ends;
  ListSpan<double> hyper;         // num_hyper per group
  int64_t num_hyper;
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

  const c10::IValue& operator[](std::string_view name) const {
    const auto index = schema_.argumentIndexWithName(name);
    TORCH_INTERNAL_ASSERT(index.has_value(), schema_.name(), " has no argument ", name);
    return stack_[first_ + *index];
  }
  TensorSpan tensors(std::string_view name) const { return TensorSpan((*this)[name].toListRef()); }
  // A Tensor[]? argument: None reads as an empty list.
  TensorSpan optional_tensors(std::string_view name) const {
    const c10::IValue& value = (*this)[name];
    return value.isNone() ? TensorSpan() : TensorSpan(value.toListRef());
  }
  ListSpan<int64_t> ints(std::string_view name) const { return ListSpan<int64_t>((*this)[name].toListRef()); }
  ListSpan<double> doubles(std::string_view name) const { return ListSpan<double>((*this)[name].toListRef()); }
  bool flag(std::string_view name) const { return (*this)[name].toBool(); }
  OptionalTensor optional(std::string_view name) const { return (*this)[name].toOptional<at::Tensor>(); }

  // Everything but the state lists and scalars, which the algorithm picks from its declaration.
  StepInputs inputs(std::string_view op_name, int64_t num_hyper, int64_t momentum_slot) const {
    const BoxedArgs& a = *this;
    return StepInputs{op_name, a.tensors("params"), a.tensors("grads"), {}, {}, a.ints("fresh_state"),
                      a.ints("group_ends"), a.doubles("hyper"), num_hyper,
                      a["lrs"].to<OptionalTensorList>(), a["host_table"].toTensor(), a["device_table"].toTensor(),
                      momentum_slot,
                      StepExtras{a["momenta"].to<OptionalTensorList>(), a.optional("grad_scale"), a.optional("skip_if"),
                                 a.optional("found_inf"), a.optional("grad_stats"), a["max_grad_norm"].toDouble(),
                                 a["phases"].toInt(), a.optional("schedule_lrs"), a.optional("schedule_momenta"),
                                 a.optional("schedule_state"), a.optional("schedule_program"),
                                 a.optional_tensors("master_params"), a.optional_tensors("kahan_comp"),
                                 a["param_rounding"].toStringView(), a.optional("rng_state")}};
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

// A cached call's step (csrc/cached_call.cpp) is prepare_step in two parts: the tensors once per step, the
// per-call values at every call of the step (a step that reduces, then updates, calls a launch twice).
//
// What a cached launch was built for: every tensor must still have these dtypes and this device.
struct LaunchKey {
  at::ScalarType param_dtype;
  at::Device device;
  at::ScalarType state_dtype;
};
// The launch the op sees in `inputs`: params[0]'s dtype and device, the first state buffer's dtype (the params'
// without state buffers).
LaunchKey launch_key(const StepInputs& inputs);
// Where the tensor pass reads each grad: the op's grads list, or the .grad of each of the params themselves
// (a cached call whose kernel params are the optimizer's own: no list to build, no reference to count).
enum class GradsFrom { kList, kParams };
// prepare_step's checks and table entries for every tensor, in one pass. A tensor that no longer fits the
// launch (another dtype, device or shape, a param without a grad) is reported (false), not raised: the plan
// is rebuilt. A grad that cannot update its param raises.
bool prepare_tensors(const StepInputs& inputs, GradsFrom grads, const LaunchKey& key, PreparedStep& prepared);
// The rest of prepare_step, for one call: its values validated, the group entries, the table's header and
// chunk map. `prepared` came from prepare_tensors and is reused by every call of the step.
void prepare_call(const StepInputs& inputs, PreparedStep& prepared);

// The op's kernel for one device type, for callers that hold the op's boxed arguments already and prepare the
// step themselves (a cached call): reads the arguments the declaration names, and runs a prepared step.
struct DirectStep {
  StepInputs (*inputs)(const c10::OperatorHandle& op, torch::jit::Stack& stack, uint32_t& option_mask);
  void (*run)(PreparedStep& prepared, uint32_t option_mask);
};
// Called during static initialisation by each algorithm's CPU and CUDA registrations.
void add_direct_step(std::string_view op, c10::DeviceType device, DirectStep step);
// nullptr when the op has no kernel for the device type in this build.
const DirectStep* find_direct_step(std::string_view op, c10::DeviceType device);

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

// Runtime option bits to a template constant: fn(std::integral_constant<uint32_t, mask>{}) for the mask given,
// among the 2^num_options combinations (each a kernel of its own).
template <int kNumOptions, uint32_t kMask = 0, typename Fn>
void with_option_mask(uint32_t mask, Fn&& fn) {
  if constexpr (kMask + 1 < (1u << kNumOptions)) {
    if (mask != kMask) return with_option_mask<kNumOptions, kMask + 1>(mask, std::forward<Fn>(fn));
  }
  fn(std::integral_constant<uint32_t, kMask>{});
}

// The arguments the declaration names: the options as a mask, the state lists the options use, the scalars.
template <class A>
StepInputs step_inputs(const c10::OperatorHandle& op, torch::jit::Stack& stack, uint32_t& mask) {
  using D = Declared<A>;
  const BoxedArgs a(op, stack);
  mask = 0;
  for (size_t k = 0; k < A::kOptions.size(); ++k) mask |= uint32_t(a.flag(A::kOptions[k])) << k;
  StepInputs inputs = a.inputs(A::kOp, int64_t(A::kHyper.size()), D::momentum_slot());
  for (size_t k = 0; k < A::kStates.size(); ++k) {
    const StateDecl& state = A::kStates[k];
    const TensorSpan list = a.tensors(state.name);
    const bool used = state.enabled_by.empty() || a.flag(state.enabled_by);
    TORCH_CHECK(used || list.empty(), "fusedopt.", A::kOp, ": ", state.name, " given without ", state.enabled_by);
    if (used) inputs.states.push_back(list);
  }
  for (const std::string_view name : A::kScalars) inputs.scalars.push_back(a.tensors(name));
  return inputs;
}

// The kernel for the options given and the params' dtype, on the device's Runner; the dense copies written back.
template <class A, class Runner>
void run_prepared(PreparedStep& prepared, uint32_t mask) {
  if (prepared.empty) return;
  with_option_mask<int(A::kOptions.size())>(mask, [&](auto flags) {
    run_for_dtype<Runner>(prepared, [](auto math) {
      return TypeTag<typename A::template Rule<typename decltype(math)::type, decltype(flags)::value>>{};
    });
  });
  finish_step(prepared);
}

// The one implementation of every algorithm's op. Boxed: see TensorSpan.
template <class A, class Runner>
void step_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  uint32_t mask = 0;
  const StepInputs inputs = step_inputs<A>(op, *stack, mask);
  PreparedStep prepared = prepare_step(inputs);
  run_prepared<A, Runner>(prepared, mask);
  BoxedArgs(op, *stack).done();
}

// Registers step_boxed's parts for the cached calls of Runner's device type.
template <class A, class Runner>
bool add_direct_step_for(c10::DeviceType device) {
  add_direct_step(A::kOp, device, DirectStep{&step_inputs<A>, &run_prepared<A, Runner>});
  return true;
}

}  // namespace fusedopt
