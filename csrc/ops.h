// Host side of every fused op, shared by the CPU (ops.cpp) and CUDA (step_cuda.cu) registrations: input
// validation, the table cache, and one templated implementation per algorithm that turns runtime options into
// template flags and hands the prepared step to a device Runner.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <utility>
#include <vector>

#include "step_table.h"

namespace fusedopt {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;
using OptionalTensor = std::optional<at::Tensor>;

// The arguments every step op takes after its options (the schema tail in ops.cpp): a device-read momentum
// per group (in the table), gradient unscaling / skipping / clipping and a per-step LR schedule to advance
// (per-call values: StepArgs, never in the table).
struct StepExtras {
  const OptionalTensorList& momenta;
  const OptionalTensor& grad_scale;
  const OptionalTensor& skip_if;
  const OptionalTensor& found_inf;
  const OptionalTensor& grad_stats;
  double max_grad_norm;
  int64_t phases;
  const OptionalTensor& schedule_lrs;
  const OptionalTensor& schedule_momenta;
  const OptionalTensor& schedule_state;
  const OptionalTensor& schedule_program;
};

#define FUSEDOPT_EXTRAS_PARAMS                                                                               \
  const OptionalTensorList &momenta, const OptionalTensor &grad_scale, const OptionalTensor &skip_if,         \
      const OptionalTensor &found_inf, const OptionalTensor &grad_stats, double max_grad_norm, int64_t phases, \
      const OptionalTensor &schedule_lrs, const OptionalTensor &schedule_momenta,                             \
      const OptionalTensor &schedule_state, const OptionalTensor &schedule_program
#define FUSEDOPT_EXTRAS                                                                                     \
  StepExtras {                                                                                              \
    momenta, grad_scale, skip_if, found_inf, grad_stats, max_grad_norm, phases, schedule_lrs, schedule_momenta, \
        schedule_state, schedule_program                                                                    \
  }

struct StepInputs {
  const char* op_name;
  at::TensorList params;
  at::TensorList grads;
  std::vector<at::TensorList> states;  // the state lists this configuration uses, in rule slot order
  bool uses_step;
  at::TensorList steps;
  at::IntArrayRef fresh_state;  // empty, or one 0/1 per tensor (SGD)
  at::IntArrayRef group_ends;
  at::ArrayRef<double> hyper;
  const OptionalTensorList& lrs;
  const at::Tensor& host_table;
  const at::Tensor& device_table;
  int64_t momentum_slot;  // the hyper slot `momenta` replaces, or -1 when the algorithm has no momentum
  StepExtras extras;
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

// ---- One implementation per algorithm, registered for each device with its Runner. ----

template <class Runner>
void sgd_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              at::IntArrayRef fresh_state, at::IntArrayRef group_ends, at::ArrayRef<double> hyper,
              const OptionalTensorList& lrs, const at::Tensor& host_table, const at::Tensor& device_table,
              bool momentum, bool nesterov, bool maximize, FUSEDOPT_EXTRAS_PARAMS) {
  std::vector<at::TensorList> states;
  if (momentum) states.push_back(momentum_buffers);
  TORCH_CHECK(momentum || momentum_buffers.empty(), "fusedopt.sgd_: momentum_buffers given without momentum");
  TORCH_CHECK(!nesterov || momentum, "fusedopt.sgd_: Nesterov momentum requires a momentum");
  launch<Runner>(
      StepInputs{"sgd_", params, grads, states, false, {}, fresh_state, group_ends, hyper, lrs, host_table,
                 device_table, 1, FUSEDOPT_EXTRAS},
      [](auto m, auto n, auto x) {
        return [](auto t) {
          return TypeTag<SgdRule<typename decltype(t)::type, FUSEDOPT_FLAG(m), FUSEDOPT_FLAG(n), FUSEDOPT_FLAG(x)>>{};
        };
      },
      momentum, nesterov, maximize);
}

template <class Runner>
void adam_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::IntArrayRef group_ends,
               at::ArrayRef<double> hyper, const OptionalTensorList& lrs, const at::Tensor& host_table,
               const at::Tensor& device_table, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               FUSEDOPT_EXTRAS_PARAMS) {
  std::vector<at::TensorList> states{exp_avgs, exp_avg_sqs};
  if (amsgrad) states.push_back(max_exp_avg_sqs);
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), "fusedopt.adam_: max_exp_avg_sqs given without amsgrad");
  launch<Runner>(
      StepInputs{"adam_", params, grads, states, true, state_steps, {}, group_ends, hyper, lrs, host_table,
                 device_table, 1, FUSEDOPT_EXTRAS},
      [](auto a, auto m, auto d) {
        return [](auto t) {
          return TypeTag<AdamRule<typename decltype(t)::type, FUSEDOPT_FLAG(a), FUSEDOPT_FLAG(m), FUSEDOPT_FLAG(d)>>{};
        };
      },
      amsgrad, maximize, decoupled_weight_decay);
}

template <class Runner>
void adagrad_impl(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList state_steps, at::IntArrayRef group_ends, at::ArrayRef<double> hyper,
                  const OptionalTensorList& lrs, const at::Tensor& host_table, const at::Tensor& device_table,
                  bool maximize, FUSEDOPT_EXTRAS_PARAMS) {
  launch<Runner>(
      StepInputs{"adagrad_", params, grads, {state_sums}, true, state_steps, {}, group_ends, hyper, lrs,
                 host_table, device_table, -1, FUSEDOPT_EXTRAS},
      [](auto m) { return [](auto t) { return TypeTag<AdagradRule<typename decltype(t)::type, FUSEDOPT_FLAG(m)>>{}; }; },
      maximize);
}

template <class Runner>
void adadelta_impl(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                   at::TensorList acc_deltas, at::TensorList state_steps, at::IntArrayRef group_ends,
                   at::ArrayRef<double> hyper, const OptionalTensorList& lrs, const at::Tensor& host_table,
                   const at::Tensor& device_table, bool maximize, FUSEDOPT_EXTRAS_PARAMS) {
  launch<Runner>(
      StepInputs{"adadelta_", params, grads, {square_avgs, acc_deltas}, true, state_steps, {}, group_ends, hyper,
                 lrs, host_table, device_table, -1, FUSEDOPT_EXTRAS},
      [](auto m) { return [](auto t) { return TypeTag<AdadeltaRule<typename decltype(t)::type, FUSEDOPT_FLAG(m)>>{}; }; },
      maximize);
}

template <class Runner>
void adamax_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_infs,
                 at::TensorList state_steps, at::IntArrayRef group_ends, at::ArrayRef<double> hyper,
                 const OptionalTensorList& lrs, const at::Tensor& host_table, const at::Tensor& device_table,
                 bool maximize, FUSEDOPT_EXTRAS_PARAMS) {
  launch<Runner>(
      StepInputs{"adamax_", params, grads, {exp_avgs, exp_infs}, true, state_steps, {}, group_ends, hyper, lrs,
                 host_table, device_table, 1, FUSEDOPT_EXTRAS},
      [](auto m) { return [](auto t) { return TypeTag<AdamaxRule<typename decltype(t)::type, FUSEDOPT_FLAG(m)>>{}; }; },
      maximize);
}

template <class Runner>
void rmsprop_impl(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList momentum_buffers, at::TensorList grad_avgs, at::TensorList state_steps,
                  at::IntArrayRef group_ends, at::ArrayRef<double> hyper, const OptionalTensorList& lrs,
                  const at::Tensor& host_table, const at::Tensor& device_table, bool momentum, bool centered,
                  bool maximize, FUSEDOPT_EXTRAS_PARAMS) {
  std::vector<at::TensorList> states{square_avgs};
  if (momentum) states.push_back(momentum_buffers);
  if (centered) states.push_back(grad_avgs);
  TORCH_CHECK(momentum || momentum_buffers.empty(), "fusedopt.rmsprop_: momentum_buffers given without momentum");
  TORCH_CHECK(centered || grad_avgs.empty(), "fusedopt.rmsprop_: grad_avgs given without centered");
  launch<Runner>(
      StepInputs{"rmsprop_", params, grads, states, true, state_steps, {}, group_ends, hyper, lrs, host_table,
                 device_table, 4, FUSEDOPT_EXTRAS},
      [](auto m, auto c, auto x) {
        return [](auto t) {
          return TypeTag<RmspropRule<typename decltype(t)::type, FUSEDOPT_FLAG(m), FUSEDOPT_FLAG(c), FUSEDOPT_FLAG(x)>>{};
        };
      },
      momentum, centered, maximize);
}

// Registers every algorithm's implementation for one dispatch key.
template <class Runner>
void register_impls(torch::Library& m) {
  m.impl("sgd_", &sgd_impl<Runner>);
  m.impl("adam_", &adam_impl<Runner>);
  m.impl("adagrad_", &adagrad_impl<Runner>);
  m.impl("adadelta_", &adadelta_impl<Runner>);
  m.impl("adamax_", &adamax_impl<Runner>);
  m.impl("rmsprop_", &rmsprop_impl<Runner>);
}

}  // namespace fusedopt
