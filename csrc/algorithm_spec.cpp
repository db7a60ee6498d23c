#include "algorithm_spec.h"

#include <torch/extension.h>

namespace fusedopt {
namespace {

std::vector<AlgorithmSpec>& specs() {
  static auto* all = new std::vector<AlgorithmSpec>();
  return *all;
}

}  // namespace

void add_algorithm_spec(AlgorithmSpec spec) { specs().push_back(std::move(spec)); }

void register_algorithm_specs(pybind11::module_& m) {
  m.def(
      "algorithm_specs",
      [] {
        py::dict result;
        for (const AlgorithmSpec& spec : specs()) {
          py::dict entry;
          entry["hyper"] = spec.hyper;
          entry["options"] = spec.options;
          entry["states"] = spec.states;
          entry["scalars"] = spec.scalars;
          entry["momentum"] = spec.momentum;
          result[py::str(spec.op)] = entry;
        }
        return result;
      },
      "Every algorithm's declaration (csrc/algorithms/*.h), by op name");
}

}  // namespace fusedopt
