// The spec the Python side builds its calls from: each registered algorithm's declaration, by name
// (fusedopt._C.algorithm_specs()). Filled by each algorithm's registration (csrc/algorithm_op.h).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace pybind11 {
class module_;
}

namespace fusedopt {

struct AlgorithmSpec {
  std::string op;
  std::vector<std::string> hyper;
  std::vector<std::string> options;
  std::vector<std::pair<std::string, std::string>> states;  // (name, option that enables it or "")
  std::vector<std::string> scalars;
  std::string momentum;
};

// Called during static initialisation, once per algorithm.
void add_algorithm_spec(AlgorithmSpec spec);

// fusedopt._C.algorithm_specs() -> {op: {"hyper": [...], "options": [...], "states": [(name, enabled_by)],
// "scalars": [...], "momentum": name or ""}}
void register_algorithm_specs(pybind11::module_& m);

}  // namespace fusedopt
