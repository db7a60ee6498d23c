// PlanGuard: do the containers a cached launch plan was read from still hold what they held?
//
// A plan caches the tensors a fused call updates. Users and libraries change the optimizer between steps in
// ways no hook reports: `opt.state.clear()`, `opt.state[p] = {}`, `state["exp_avg"] = t`, `del state[k]`,
// `group["params"].reverse()`. The guard records, when the plan is built, the contents of every container the
// plan was read from (the param lists, `optimizer.state`, each planned param's state dict) by object identity.
// `unchanged()` then compares, without hashing a single tensor (Tensor.__hash__ is a Python call): a dict whose
// version tag is unchanged is skipped, and the others are walked in insertion order with PyDict_Next, so any
// added, removed or replaced entry shows up as a different (key, value) object at some position or a different
// length. Recorded objects are held by strong reference, so no new object can reuse an address.
//
// The tensors themselves are the cached call's to check (csrc/cached_call.cpp): its one pass per step finds a
// param or state tensor whose dtype, device or shape changed in place (`p.data = other`) while it reads them for
// the kernel. Complex params and states reach the kernels through real views, which `.data = other` leaves
// pointing at the old storage: the guard checks that each view still views its source.
#include "plan_guard.h"

#include "host_prefetch.h"

#include <vector>

namespace fusedopt {
namespace {

// CPython up to 3.13 gives every dict a version tag (PEP 509) that every change of the dict sets to a value no
// dict had before. A dict whose tag is the recorded one holds what it held, so its walk is skipped: one word read
// per state dict instead of its entries. A changed tag proves nothing (an entry replaced and put back moves it), so
// the walk decides then. 3.14 dropped the tag, and there every dict is walked.
#if PY_VERSION_HEX < 0x030E0000
constexpr bool kDictVersions = true;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // 3.12 deprecated the field, and keeps it exact
uint64_t dict_version(PyObject* dict) { return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag; }
#pragma GCC diagnostic pop
#else
constexpr bool kDictVersions = false;
uint64_t dict_version(PyObject*) { return 0; }
#endif

class PlanGuard {
 public:
  // containers: the lists/tuples/dicts the plan was read from. views: (source, real view) pairs of the complex
  // params and states.
  PlanGuard(const py::list& containers, const std::vector<std::pair<at::Tensor, at::Tensor>>& views) {
    for (const py::handle container : containers) record(container);
    views_.assign(views.begin(), views.end());
  }

  // True while the plan's containers hold what they held and every real view still views its source. False
  // means rebuild.
  bool unchanged() const {
    if (unsupported_) return false;
    for (size_t w = 0; w < watched_.size(); ++w) {
      prefetch_containers_ahead(w);
      if (!same_contents(watched_[w])) return false;
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
    mutable uint64_t version;  // a dict's tag when its walk last found the recorded contents (kDictVersions)
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
    const uint64_t version = kind == Kind::kDict ? dict_version(object) : 0;
    watched_.push_back({py::reinterpret_borrow<py::object>(container), kind, begin, objects_.size(), version});
  }

  // A step after backward finds the state dicts and tensors out of cache: request the objects the loops in
  // unchanged() read a few positions ahead (csrc/host_prefetch.h). A dict is two objects: the dict (its version
  // tag), then its keys table (where PyDict_Next finds the entries), which a matching tag spares.
  void prefetch_containers_ahead(size_t w) const {
    host::prefetch_chains_ahead<2>(w, watched_.size(), [&](size_t ahead, int stage) {
      if (watched_[ahead].kind != Kind::kDict) return;
      PyObject* dict = watched_[ahead].container.ptr();
      if (stage == 0) {
        host::prefetch_bytes(dict, sizeof(PyDictObject));
      } else if (!kDictVersions) {
        host::prefetch_bytes(reinterpret_cast<PyDictObject*>(dict)->ma_keys, 128);
      }
    });
  }

  bool same_contents(const Watched& watched) const {
    PyObject* object = watched.container.ptr();
    if (watched.kind == Kind::kDict) {
      if (kDictVersions && dict_version(object) == watched.version) return true;
      Py_ssize_t position = 0;
      PyObject *key, *value;
      size_t i = watched.begin;
      while (PyDict_Next(object, &position, &key, &value)) {
        if (i == watched.end || objects_[i].ptr() != key || objects_[i + 1].ptr() != value) return false;
        i += 2;
      }
      if (i != watched.end) return false;
      watched.version = dict_version(object);
      return true;
    }
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(object);
    if (size_t(size) != watched.end - watched.begin) return false;
    for (Py_ssize_t i = 0; i < size; ++i) {
      if (PySequence_Fast_GET_ITEM(object, i) != objects_[watched.begin + i].ptr()) return false;
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
  std::vector<std::pair<at::Tensor, at::Tensor>> views_;
};

}  // namespace

void register_plan_guard(py::module& m) {
  py::class_<PlanGuard>(m, "PlanGuard")
      .def(py::init<const py::list&, const std::vector<std::pair<at::Tensor, at::Tensor>>&>(), py::arg("containers"),
           py::arg("views"))
      .def("unchanged", &PlanGuard::unchanged,
           "True while the plan's containers hold the objects they held when it was built");
}

}  // namespace fusedopt
