// Input checks of fusedopt::advance_schedule_, shared by its CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "lr_schedule.h"

namespace fusedopt {

// Every tensor float64, contiguous and on lrs's device; lrs [G], state [G, S], program [G, P], momenta [G],
// metric one element. Throws before anything is written.
void check_schedule_inputs(const at::Tensor& lrs, const at::Tensor& state, const at::Tensor& program,
                           const std::optional<at::Tensor>& momenta, const std::optional<at::Tensor>& metric);

}  // namespace fusedopt
