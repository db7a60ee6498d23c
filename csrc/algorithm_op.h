// The registration of one algorithm, for the baseline CPU: its op schema, derived from the declaration (the
// header included before this one, csrc/algorithm.h says what it declares), its CPU kernel and autograd
// fallthrough, its spec for the Python side, and its per-instruction-set CPU kernels. setup.py compiles this once
// per algorithm header, in a generated translation unit: #include "algorithms/<name>.h", then this file.
#pragma once

#include <torch/library.h>

#include <string>

#include "algorithm_spec.h"
#include "cpu_runner.h"
#include "ops.h"

namespace fusedopt {

// Every step op's arguments after its options (StepExtras in ops.h).
inline constexpr const char* kStepSchemaTail =
    ", Tensor?[] momenta, Tensor? grad_scale=None, Tensor? skip_if=None, Tensor(x!)? found_inf=None, "
    "Tensor(y!)? grad_stats=None, float max_grad_norm=0., int phases=2, Tensor(z!)? schedule_lrs=None, "
    "Tensor(w!)? schedule_momenta=None, Tensor(v!)? schedule_state=None, Tensor? schedule_program=None, "
    "Tensor(m!)[]? master_params=None, Tensor(k!)[]? kahan_comp=None, str param_rounding=\"nearest\", "
    "Tensor(r!)? rng_state=None) -> ()";

// params, grads, one mutable list per state buffer and per scalar (named as the declaration names them), the
// table arguments, one bool per option, then the tail every op shares.
template <class A>
std::string step_schema() {
  std::string schema = std::string(A::kOp) + "(Tensor(a!)[] params, Tensor[] grads";
  for (size_t k = 0; k < A::kStates.size(); ++k) {
    schema += ", Tensor(s" + std::to_string(k) + "!)[] " + std::string(A::kStates[k].name);
  }
  for (size_t k = 0; k < A::kScalars.size(); ++k) {
    schema += ", Tensor(c" + std::to_string(k) + "!)[] " + std::string(A::kScalars[k]);
  }
  schema += ", int[] fresh_state, int[] group_ends, float[] hyper, Tensor?[] lrs, Tensor(t!) host_table, "
            "Tensor(u!) device_table";
  for (const std::string_view option : A::kOptions) schema += ", bool " + std::string(option);
  return schema + kStepSchemaTail;
}

template <class A>
AlgorithmSpec algorithm_spec() {
  AlgorithmSpec spec{std::string(A::kOp), {}, {}, {}, {}, std::string(A::kMomentum)};
  for (const std::string_view name : A::kHyper) spec.hyper.emplace_back(name);
  for (const std::string_view name : A::kOptions) spec.options.emplace_back(name);
  for (const StateDecl& state : A::kStates) spec.states.emplace_back(state.name, state.enabled_by);
  for (const std::string_view name : A::kScalars) spec.scalars.emplace_back(name);
  return spec;
}

}  // namespace fusedopt

// Each variant's kernels for this algorithm, defined in its per-variant translation unit (cpu/update_kernels.h).
namespace fusedopt::cpu {
namespace DEFAULT {
template <class A>
void register_update_kernels();
}
#if defined(FUSEDOPT_CPU_AVX2)
namespace AVX2 {
template <class A>
void register_update_kernels();
}
#endif
#if defined(FUSEDOPT_CPU_AVX512)
namespace AVX512 {
template <class A>
void register_update_kernels();
}
#endif
}  // namespace fusedopt::cpu

namespace {

const bool kRegistered = [] {
  using fusedopt::ThisAlgorithm;
  namespace cpu = fusedopt::cpu;
  fusedopt::add_algorithm_spec(fusedopt::algorithm_spec<ThisAlgorithm>());
  fusedopt::add_direct_step_for<ThisAlgorithm, cpu::CpuRunner>(c10::DeviceType::CPU);
  cpu::add_kernel_registrar(cpu::kDefault, &cpu::DEFAULT::register_update_kernels<ThisAlgorithm>);
#if defined(FUSEDOPT_CPU_AVX2)
  cpu::add_kernel_registrar(cpu::kAvx2, &cpu::AVX2::register_update_kernels<ThisAlgorithm>);
#endif
#if defined(FUSEDOPT_CPU_AVX512)
  cpu::add_kernel_registrar(cpu::kAvx512, &cpu::AVX512::register_update_kernels<ThisAlgorithm>);
#endif
  return true;
}();

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedopt, m) { m.def(fusedopt::step_schema<fusedopt::ThisAlgorithm>().c_str()); }

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl(fusedopt::ThisAlgorithm::kOp.data(),
         torch::CppFunction::makeFromBoxedFunction<&fusedopt::step_boxed<fusedopt::ThisAlgorithm, fusedopt::cpu::CpuRunner>>());
}

// The step ops run outside autograd, as torch's fused optimizer kernels do (optimizers step under no_grad).
// Without an Autograd kernel every call would go through torch's autograd fallback, which visits each of the
// thousands of tensor arguments; a fallthrough goes straight to the device kernel.
TORCH_LIBRARY_IMPL(fusedopt, Autograd, m) {
  m.impl(fusedopt::ThisAlgorithm::kOp.data(), torch::CppFunction::makeFallthrough());
}
