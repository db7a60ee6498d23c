// PlanGuard: is a cached launch plan still exactly what `optimizer.state` and the param groups hold?
//
// A plan caches the tensors a fused call updates. Users and libraries change the optimizer between steps in
// ways no hook reports: `opt.state.clear()`, `opt.state[p] = {}`, `state["exp_avg"] = t`, `del state[k]`,
// `group["params"].reverse()`, `p.data = other`. The guard records, when the plan is built, the contents of
// every container the plan was read from (the param lists, `optimizer.state`, each planned param's state dict)
// by object identity, and the dtype/device of each planned param. `unchanged()` then compares, without hashing
// a single tensor (Tensor.__hash__ is a Python call): dicts are walked in insertion order with PyDict_Next, so
// any added, removed or replaced entry shows up as a different (key, value) object at some position or a
// different length. Recorded objects are held by strong reference, so no new object can reuse an address.
//
// In-place changes to a tensor (`.zero_()`, `.data = other`) keep its identity; the kernels re-read data
// pointers every step, and the guard checks that every state tensor still matches its param in shape and device
// and keeps its dtype, so a step never starts on tensors the op would reject half-way through a multi-launch step.
// Complex params and states reach the kernels through real views, which `.data = other` leaves pointing at the
// old storage: the guard checks that each view still views its source.
#include "plan_guard.h"

#include "grad_check.h"
#include "host_prefetch.h"

#include <vector>

namespace fusedopt {
namespace {

class PlanGuard {
 public:
  // containers: the lists/tuples/dicts the plan was read from. params/states/scalars: one entry per planned
  // param, its state tensors as `optimizer.state` holds them and its scalar state (`step`, ...).
  // views: (source, real view) pairs of the complex params and states.
  PlanGuard(const py::list& containers, const std::vector<at::Tensor>& params,
            const std::vector<std::vector<at::Tensor>>& states, const std::vector<std::vector<at::Tensor>>& scalars,
            const std::vector<std::pair<at::Tensor, at::Tensor>>& views) {
    for (const py::handle container : containers) record(container);
    TORCH_CHECK(states.size() == params.size() && scalars.size() == params.size(),
                "fusedopt.PlanGuard: one state list and one scalar list per param");
    entries_.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& param = params[i];
      entries_.push_back({param, param.scalar_type(), param.device(), state_tensors_.size(),
                          state_tensors_.size() + states[i].size(), scalar_tensors_.size(),
                          scalar_tensors_.size() + scalars[i].size()});
      state_tensors_.insert(state_tensors_.end(), states[i].begin(), states[i].end());
      for (const at::Tensor& state : states[i]) state_dtypes_.push_back(state.scalar_type());
      scalar_tensors_.insert(scalar_tensors_.end(), scalars[i].begin(), scalars[i].end());
    }
    views_.assign(views.begin(), views.end());
  }

  // True while the plan is exact: same containers' contents, every state tensor still shaped like its param,
  // every real view still viewing its source. False means rebuild (which raises on unusable state).
  bool unchanged() const {
    if (unsupported_) return false;
    for (size_t w = 0; w < watched_.size(); ++w) {
      prefetch_containers_ahead(w);
      if (!same_contents(watched_[w])) return false;
    }
    for (size_t e = 0; e < entries_.size(); ++e) {
      host::prefetch_chains_ahead<1>(e, entries_.size(),
                                     [&](size_t j, int) { prefetch_tensors_of(entries_[j]); });
      if (!entry_matches(entries_[e])) return false;
    }
    for (const auto& [source, view] : views_) {
      if (!still_views(source, view)) return false;
    }
    return true;
  }

 private:
  enum class Kind { kList, kTuple, kDict };
  struct Watched {
    py::object container;
    Kind kind;
    size_t begin, end;  // its recorded objects in objects_: items, or (key, value) pairs for a dict
  };
  struct Entry {
    at::Tensor param;
    at::ScalarType dtype;  // the launch it is in was chosen by dtype and device
    at::Device device;
    size_t states_begin, states_end;    // in state_tensors_
    size_t scalars_begin, scalars_end;  // in scalar_tensors_
  };

  void record(py::handle container) {
    PyObject* object = container.ptr();
    const size_t begin = objects_.size();
    Kind kind;
    if (PyDict_Check(object)) {
      kind = Kind::kDict;
      Py_ssize_t position = 0;
      PyObject *key, *value;
      while (PyDict_Next(object, &position, &key, &value)) {
        objects_.push_back(py::reinterpret_borrow<py::object>(key));
        objects_.push_back(py::reinterpret_borrow<py::object>(value));
      }
    } else if (PyList_Check(object) || PyTuple_Check(object)) {
      kind = PyList_Check(object) ? Kind::kList : Kind::kTuple;
      const Py_ssize_t size = PySequence_Fast_GET_SIZE(object);
      for (Py_ssize_t i = 0; i < size; ++i) {
        objects_.push_back(py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(object, i)));
      }
    } else {
      unsupported_ = true;  // another container type: no cheap exact check, so the plan is rebuilt every step
      return;
    }
    watched_.push_back({py::reinterpret_borrow<py::object>(container), kind, begin, objects_.size()});
  }

  // A step after backward finds the state dicts and tensors out of cache: request the objects the loops in
  // unchanged() read a few positions ahead (csrc/host_prefetch.h). A dict is two objects: the dict, then its
  // keys table (where PyDict_Next finds the entries).
  void prefetch_containers_ahead(size_t w) const {
    host::prefetch_chains_ahead<2>(w, watched_.size(), [&](size_t ahead, int stage) {
      if (watched_[ahead].kind != Kind::kDict) return;
      PyObject* dict = watched_[ahead].container.ptr();
      if (stage == 0) {
        host::prefetch_bytes(dict, sizeof(PyDictObject));
      } else {
        host::prefetch_bytes(reinterpret_cast<PyDictObject*>(dict)->ma_keys, 128);
      }
    });
  }

  // The TensorImpls entry_matches reads: the param's, its state tensors' and its scalars'.
  void prefetch_tensors_of(const Entry& entry) const {
    host::prefetch_metadata(entry.param);
    for (size_t s = entry.states_begin; s < entry.states_end; ++s) host::prefetch_metadata(state_tensors_[s]);
    for (size_t s = entry.scalars_begin; s < entry.scalars_end; ++s) host::prefetch_metadata(scalar_tensors_[s]);
  }

  bool same_contents(const Watched& watched) const {
    PyObject* object = watched.container.ptr();
    if (watched.kind == Kind::kDict) {
      Py_ssize_t position = 0;
      PyObject *key, *value;
      size_t i = watched.begin;
      while (PyDict_Next(object, &position, &key, &value)) {
        if (i == watched.end || objects_[i].ptr() != key || objects_[i + 1].ptr() != value) return false;
        i += 2;
      }
      return i == watched.end;
    }
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(object);
    if (size_t(size) != watched.end - watched.begin) return false;
    for (Py_ssize_t i = 0; i < size; ++i) {
      if (PySequence_Fast_GET_ITEM(object, i) != objects_[watched.begin + i].ptr()) return false;
    }
    return true;
  }

  bool entry_matches(const Entry& entry) const {
    const at::Tensor& param = entry.param;
    if (param.scalar_type() != entry.dtype || param.device() != entry.device) return false;
    const at::IntArrayRef sizes = param.sizes();
    for (size_t s = entry.states_begin; s < entry.states_end; ++s) {
      const at::Tensor& state = state_tensors_[s];
      if (state.scalar_type() != state_dtypes_[s] || state.device() != entry.device ||
          !same_sizes(state.sizes(), sizes)) {
        return false;
      }
    }
    for (size_t s = entry.scalars_begin; s < entry.scalars_end; ++s) {
      const at::Tensor& scalar = scalar_tensors_[s];
      if (scalar.numel() != 1 || scalar.scalar_type() != at::kFloat || scalar.device() != entry.device) return false;
    }
    return true;
  }

  static bool still_views(const at::Tensor& source, const at::Tensor& view) {
    const int64_t dims = source.dim();
    if (view.dim() != dims + 1 || source.const_data_ptr() != view.const_data_ptr() ||
        view.scalar_type() != c10::toRealValueType(source.scalar_type())) {
      return false;
    }
    for (int64_t d = 0; d < dims; ++d) {
      if (view.size(d) != source.size(d) || view.stride(d) != 2 * source.stride(d)) return false;
    }
    return true;
  }

  std::vector<Watched> watched_;
  std::vector<py::object> objects_;
  bool unsupported_ = false;
  std::vector<Entry> entries_;
  std::vector<at::Tensor> state_tensors_;
  // Each state tensor's dtype when the plan was built: the param's, or the optimizer's state dtype, or float32
  // for a master copy (csrc/storage.h). The launch was chosen by it.
  std::vector<at::ScalarType> state_dtypes_;
  std::vector<at::Tensor> scalar_tensors_;
  std::vector<std::pair<at::Tensor, at::Tensor>> views_;
};

}  // namespace

void register_plan_guard(py::module& m) {
  py::class_<PlanGuard>(m, "PlanGuard")
      .def(py::init<const py::list&, const std::vector<at::Tensor>&, const std::vector<std::vector<at::Tensor>>&,
                    const std::vector<std::vector<at::Tensor>>&,
                    const std::vector<std::pair<at::Tensor, at::Tensor>>&>(),
           py::arg("containers"), py::arg("params"), py::arg("states"), py::arg("scalars"), py::arg("views"))
      .def("unchanged", &PlanGuard::unchanged,
           "True while the plan holds exactly the tensors the optimizer's state and param groups hold");
}

}  // namespace fusedopt
