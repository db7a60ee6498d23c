// The CPU runner: one parallel region over the same (tensor, chunk) work items the CUDA grid walks, calling the
// explicitly vectorized update kernel (csrc/cpu/update_kernels.cpp) of the best instruction set this CPU has.
// This file is compiled for the baseline CPU; only the kernels are compiled per instruction set.
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "lr_schedule.h"
#include "ops.h"

namespace fusedopt::cpu {

// Defined once per variant, in the variant's inline namespace (setup.py says which ones it compiled).
namespace DEFAULT {
void register_update_kernels();
}
#if defined(FUSEDOPT_CPU_AVX2)
namespace AVX2 {
void register_update_kernels();
}
#endif
#if defined(FUSEDOPT_CPU_AVX512)
namespace AVX512 {
void register_update_kernels();
}
#endif

namespace {

// Whether this CPU (and its OS) can run a variant: cpuid, through the compiler's builtin. Each variant needs
// the instruction sets setup.py compiles it for.
bool cpu_has(Variant variant) {
  switch (variant) {
    case kDefault:
      return true;
#if defined(FUSEDOPT_CPU_AVX2)
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
#endif
#if defined(FUSEDOPT_CPU_AVX512)
    case kAvx512:
      return cpu_has(kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

// torch's choice for its own kernels ("DEFAULT", "AVX2", "AVX512" on x86), which honours ATEN_CPU_CAPABILITY.
Variant torch_variant() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return kAvx512;
  if (capability == "AVX2") return kAvx2;
  return kDefault;
}

struct Dispatch {
  bool available[kNumVariants] = {};
  std::atomic<int> active{kDefault};
};

// Registers every variant this CPU can run (once), and starts with the best of them that torch would use too.
Dispatch& dispatch() {
  static Dispatch* instance = [] {
    auto* d = new Dispatch;
    DEFAULT::register_update_kernels();
    d->available[kDefault] = true;
#if defined(FUSEDOPT_CPU_AVX2)
    if (cpu_has(kAvx2)) {
      AVX2::register_update_kernels();
      d->available[kAvx2] = true;
    }
#endif
#if defined(FUSEDOPT_CPU_AVX512)
    if (cpu_has(kAvx512)) {
      AVX512::register_update_kernels();
      d->available[kAvx512] = true;
    }
#endif
    int best = torch_variant();
    while (!d->available[best]) --best;
    d->active = best;
    return d;
  }();
  return *instance;
}

template <typename scalar_t, typename Rule>
UpdateFn<scalar_t, Rule> update_kernel() {
  const UpdateFn<scalar_t, Rule> fn = UpdateKernels<scalar_t, Rule>::by_variant[dispatch().active.load()];
  TORCH_CHECK(fn != nullptr, "fusedopt: no CPU kernel for this update rule (is it listed in for_each_rule_family?)");
  return fn;
}

// Storage -> math conversion for the (scalar) grad reduction. c10's bfloat16 conversion is one shift already;
// spelled out so the loop vectorizes whatever the compiler.
template <typename T, typename scalar_t>
inline T to_math(scalar_t v) {
  return T(v);
}
template <>
inline float to_math<float, c10::BFloat16>(c10::BFloat16 v) {
  return c10::bit_cast<float>(uint32_t(v.x) << 16);
}

// Sum of squares (in double) and non-finite flag of grad elements [begin, end).
template <typename scalar_t>
void reduce_range(const TensorEntry& e, int64_t begin, int64_t end, double& sum_sq, bool& nonfinite) {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ grad = static_cast<const scalar_t*>(e.grad);
  double sum = 0.0;
  bool bad = false;
  for (int64_t i = begin; i < end; ++i) {
    const T g = to_math<T>(grad[i]);
    bad |= is_nonfinite(g);
    sum += double(g) * double(g);
  }
  sum_sq = sum;
  nonfinite = bad;
}

// Below this many elements a single thread is faster than waking the pool.
constexpr int64_t kSerialBelow = 1 << 16;

struct CpuRunner {
  template <typename scalar_t, typename Rule>
  static void run(PreparedStep& prepared) {
    using T = typename Rule::opmath_t;
    const TableView table = prepared.host;
    const TableHeader& header = table.header();
    const StepArgs& args = prepared.args;  // the per-call values (phases, scaler, clipping, schedule)
    const int64_t num_chunks = header.num_chunks;
    // body(entry, start, stop, chunk) for every chunk, in parallel where it pays off.
    auto for_each_chunk = [&](auto&& body) {
      auto work = [&](int64_t begin, int64_t end) {
        if (begin >= end) return;
        int64_t t = table.tensor_of_chunk(begin);
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          while (table.first_chunk()[t + 1] <= chunk) ++t;
          const TensorEntry& entry = table.tensors()[t];
          const int64_t start = (chunk - table.first_chunk()[t]) * kChunkSize;
          body(entry, start, std::min(start + kChunkSize, entry.numel), chunk);
        }
      };
      if (header.total_numel < kSerialBelow) {
        work(0, num_chunks);
      } else {
        at::parallel_for(0, num_chunks, 1, work);
      }
    };

    if (args.phases & kReduceGrads) {
      // Per-chunk partial sums added in chunk order: the result does not depend on the thread count.
      std::vector<double> sums(num_chunks);
      std::vector<char> nonfinite(num_chunks);
      for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t chunk) {
        bool bad = false;
        reduce_range<scalar_t>(entry, start, stop, sums[chunk], bad);
        nonfinite[chunk] = bad;
      });
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        args.grad_stats[0] += sums[chunk];
        if (nonfinite[chunk]) args.grad_stats[1] += 1.0;
      }
    }
    if (!(args.phases & kUpdate)) return;

    const double no_stats[kGradStats] = {0.0, 0.0};
    const GradAdjustment adjust = grad_adjustment(args, args.grad_stats ? args.grad_stats : no_stats);
    if (!adjust.skip) {
      const T grad_factor = T(adjust.factor);
      const UpdateFn<scalar_t, Rule> update = update_kernel<scalar_t, Rule>();
      for_each_chunk([&](const TensorEntry& entry, int64_t start, int64_t stop, int64_t) {
        update(entry, table.rule_for<Rule>(entry), grad_factor, start, stop);
      });
      // Only after every chunk has read its step number and lr.
      for (int64_t t = 0; t < header.num_tensors; ++t) {
        if (float* step = table.tensors()[t].step) *step += 1.0f;
      }
      const ScheduleArgs& schedule = args.schedule;
      for (int64_t g = 0; g < schedule.groups; ++g) {
        advance_schedule(schedule.program + g * schedule.program_stride, schedule.state + g * schedule.state_stride,
                         schedule.lrs + g, schedule.momenta ? schedule.momenta + g : nullptr, nullptr);
      }
    }
    if (args.found_inf != nullptr) *args.found_inf = adjust.skip ? 1.0f : 0.0f;
    if (args.phases & kResetStats) std::fill_n(args.grad_stats, kGradStats, 0.0);
  }
};

// ---- Private ops for tests and benchmarks: which kernel variants this CPU has, and which one runs. ----

std::vector<std::string> cpu_variants() {
  std::vector<std::string> names;
  for (int v = 0; v < kNumVariants; ++v) {
    if (dispatch().available[v]) names.emplace_back(kVariantNames[v]);
  }
  return names;
}

std::string cpu_variant() { return kVariantNames[dispatch().active.load()]; }

// Runs every later CPU step with the named variant ("" restores the automatic choice). For tests: not
// synchronised with steps running on other threads.
void set_cpu_variant(const std::string& name) {
  Dispatch& d = dispatch();
  if (name.empty()) {
    int best = torch_variant();
    while (!d.available[best]) --best;
    d.active = best;
    return;
  }
  for (int v = 0; v < kNumVariants; ++v) {
    if (name == kVariantNames[v]) {
      TORCH_CHECK(d.available[v], "fusedopt: the ", name, " CPU kernels are not available here (available: ",
                  c10::Join(", ", cpu_variants()), ")");
      d.active = v;
      return;
    }
  }
  TORCH_CHECK(false, "fusedopt: unknown CPU kernel variant '", name, "' (one of: default, avx2, avx512)");
}

}  // namespace
}  // namespace fusedopt::cpu

namespace fusedopt {

TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("_cpu_variants() -> str[]", &cpu::cpu_variants);
  m.def("_cpu_variant() -> str", &cpu::cpu_variant);
  m.def("_set_cpu_variant(str name) -> ()", &cpu::set_cpu_variant);
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { register_impls<cpu::CpuRunner>(m); }

}  // namespace fusedopt
