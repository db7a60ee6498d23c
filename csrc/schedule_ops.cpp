// fusedopt::advance_schedule_ on the CPU: one advance of a device-side LR schedule (csrc/lr_schedule.h) for
// every param group. The checks are shared with the CUDA registration (csrc/schedule_cuda.cu).
#include "schedule_ops.h"

namespace fusedopt {

void check_schedule_inputs(const at::Tensor& lrs, const at::Tensor& state, const at::Tensor& program,
                           const std::optional<at::Tensor>& momenta, const std::optional<at::Tensor>& metric) {
  const auto device = lrs.device();
  auto check_f64 = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kDouble, "fusedopt.advance_schedule_: ", name, " must be float64, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == device, "fusedopt.advance_schedule_: ", name, " is on ", t.device(),
                " but lrs is on ", device);
    TORCH_CHECK(t.is_contiguous(), "fusedopt.advance_schedule_: ", name, " must be contiguous");
  };
  check_f64(lrs, "lrs");
  check_f64(state, "state");
  check_f64(program, "program");
  TORCH_CHECK(lrs.dim() == 1, "fusedopt.advance_schedule_: lrs must have shape [G], got ", lrs.sizes());
  const int64_t groups = lrs.size(0);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == groups, "fusedopt.advance_schedule_: state must have shape [",
              groups, ", S], got ", state.sizes());
  TORCH_CHECK(program.dim() == 2 && program.size(0) == groups && program.size(1) >= 4,
              "fusedopt.advance_schedule_: program must have shape [", groups, ", P] with P >= 4, got ",
              program.sizes());
  if (momenta.has_value() && momenta->defined()) {
    check_f64(*momenta, "momenta");
    TORCH_CHECK(momenta->dim() == 1 && momenta->size(0) == groups,
                "fusedopt.advance_schedule_: momenta must have shape [", groups, "], got ", momenta->sizes());
  }
  if (metric.has_value() && metric->defined()) {
    check_f64(*metric, "metric");
    TORCH_CHECK(metric->numel() == 1, "fusedopt.advance_schedule_: metric must have exactly one element, got ",
                metric->numel());
  }
}

namespace {

void advance_schedule_cpu(at::Tensor& lrs, at::Tensor& state, const at::Tensor& program,
                          const std::optional<at::Tensor>& momenta, const std::optional<at::Tensor>& metric) {
  check_schedule_inputs(lrs, state, program, momenta, metric);
  TORCH_CHECK(lrs.device().is_cpu(), "fusedopt.advance_schedule_: the CPU implementation got ", lrs.device());
  const int64_t groups = lrs.size(0);
  const int64_t program_width = program.size(1), state_width = state.size(1);
  double* lr = lrs.data_ptr<double>();
  double* state_rows = state.data_ptr<double>();
  const double* program_rows = program.data_ptr<double>();
  double* momentum = momenta.has_value() && momenta->defined() ? momenta->data_ptr<double>() : nullptr;
  const double* metric_value = metric.has_value() && metric->defined() ? metric->data_ptr<double>() : nullptr;
  for (int64_t g = 0; g < groups; ++g) {
    advance_schedule(program_rows + g * program_width, state_rows + g * state_width, lr + g,
                     momentum ? momentum + g : nullptr, metric_value);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("advance_schedule_", &advance_schedule_cpu); }

}  // namespace fusedopt
