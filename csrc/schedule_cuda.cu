// fusedopt::advance_schedule_ on CUDA: one thread per param group runs csrc/lr_schedule.h on the current
// stream. No host synchronization, so a captured CUDA graph can replay it.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "schedule_ops.h"

namespace fusedopt {
namespace {

constexpr int kScheduleThreads = 128;

__global__ void advance_schedule_kernel(double* lrs, double* state, const double* program, double* momenta,
                                        const double* metric, int64_t groups, int64_t state_width,
                                        int64_t program_width) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  advance_schedule(program + g * program_width, state + g * state_width, lrs + g,
                   momenta ? momenta + g : nullptr, metric);
}

void advance_schedule_cuda(at::Tensor& lrs, at::Tensor& state, const at::Tensor& program,
                           const std::optional<at::Tensor>& momenta, const std::optional<at::Tensor>& metric) {
  check_schedule_inputs(lrs, state, program, momenta, metric);
  const int64_t groups = lrs.size(0);
  if (groups == 0) return;
  const c10::cuda::CUDAGuard guard(lrs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(lrs.device().index());
  const int64_t blocks = (groups + kScheduleThreads - 1) / kScheduleThreads;
  advance_schedule_kernel<<<blocks, kScheduleThreads, 0, stream>>>(
      lrs.data_ptr<double>(), state.data_ptr<double>(), program.data_ptr<double>(),
      momenta.has_value() && momenta->defined() ? momenta->data_ptr<double>() : nullptr,
      metric.has_value() && metric->defined() ? metric->data_ptr<double>() : nullptr, groups, state.size(1),
      program.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) { m.impl("advance_schedule_", &advance_schedule_cuda); }

}  // namespace fusedopt
