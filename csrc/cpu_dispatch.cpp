// Which CPU kernel variant runs: the instruction sets this CPU has (cpuid), the kernels each algorithm registered
// for each variant (csrc/algorithm_op.h), and the private ops tests and benchmarks use to pick one (and to pick
// the stored path's general kernel over a fixed layout's). Compiled for the baseline CPU; only the kernels
// themselves are compiled per instruction set.
#include <ATen/Version.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include <c10/util/StringUtil.h>
#include <torch/library.h>

namespace fusedopt::cpu {

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

// The kernel registrars of every algorithm (csrc/algorithm_op.h adds them during static initialisation, before
// any step can run), per variant.
std::vector<KernelRegistrar>& registrars(Variant variant) {
  static auto* lists = new std::vector<KernelRegistrar>[kNumVariants];
  return lists[variant];
}

// Registers every variant this CPU can run (once), and starts with the best of them that torch would use too.
Dispatch& dispatch() {
  static Dispatch* instance = [] {
    auto* d = new Dispatch;
    for (int v = 0; v < kNumVariants; ++v) {
      if (!cpu_has(Variant(v))) continue;
      for (KernelRegistrar registrar : registrars(Variant(v))) registrar();
      d->available[v] = true;
    }
    int best = torch_variant();
    while (!d->available[best]) --best;
    d->active = best;
    return d;
  }();
  return *instance;
}

}  // namespace

void add_kernel_registrar(Variant variant, KernelRegistrar registrar) { registrars(variant).push_back(registrar); }

int active_variant() { return dispatch().active.load(std::memory_order_relaxed); }

namespace {
std::atomic<bool> fixed_layouts{true};
std::array<std::atomic<int64_t>, kStoredSlots> stored_launches{};
}  // namespace

int stored_launch_slot(const StoragePolicy& policy) {
  const int slot = fixed_layouts.load(std::memory_order_relaxed) ? stored_slot(policy) : 0;
  stored_launches[slot].fetch_add(1, std::memory_order_relaxed);
  return slot;
}

namespace {

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

// Runs every later stored-path launch with its fixed layout's kernel (true, the default) or the general one.
// For tests: not synchronised with steps running on other threads.
void set_fixed_layouts(bool enabled) { fixed_layouts = enabled; }

// How many stored-path launches each kernel has run so far, by name: "general", or its kFixedLayouts name.
c10::Dict<std::string, int64_t> stored_launch_counts() {
  c10::Dict<std::string, int64_t> counts;
  for (int slot = 0; slot < kStoredSlots; ++slot) {
    const std::string_view name = slot == 0 ? kGeneralKernelName : kFixedLayouts[slot - 1].name;
    counts.insert(std::string(name), stored_launches[slot].load(std::memory_order_relaxed));
  }
  return counts;
}

}  // namespace
}  // namespace fusedopt::cpu

namespace fusedopt {

TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("_cpu_variants() -> str[]", &cpu::cpu_variants);
  m.def("_cpu_variant() -> str", &cpu::cpu_variant);
  m.def("_set_cpu_variant(str name) -> ()", &cpu::set_cpu_variant);
  m.def("_set_fixed_layouts(bool enabled) -> ()", &cpu::set_fixed_layouts);
  m.def("_stored_launches() -> Dict(str, int)", &cpu::stored_launch_counts);
}

}  // namespace fusedopt
