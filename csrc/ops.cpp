// Op schemas and the host-side preparation every launch shares (validation, dense layouts, the table cache).
// The CPU runner is csrc/cpu_step.cpp, the CUDA one csrc/cuda_step.cuh.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "lr_schedule.h"
#include "grad_check.h"
#include "host_prefetch.h"
#include "ops.h"

namespace fusedopt {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << t.scalar_type() << " " << t.sizes() << " on " << t.device();
  return out.str();
}

bool given(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// Every tensor the kernel touches for entry i must match the param in shape and device, and have `dtype` (the
// param's, but for state buffers of another state dtype and fp32 master params). The test every step passes is
// inline; the checks that say what is wrong run only when it fails.
void explain_unlike_param(std::string_view op, const char* what, size_t index, const at::Tensor& t,
                          const at::Tensor& param, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "fusedopt.", op, ": ", what, "[", index, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fusedopt.", op, ": ", what, "[", index,
              "] is sparse; fusedopt optimizers do not support sparse gradients");
  TORCH_CHECK(t.scalar_type() == dtype && t.device() == param.device() && t.sizes() == param.sizes(),
              "fusedopt.", op, ": ", what, "[", index, "] is ", describe(t), " but params[", index, "] is ",
              describe(param), (dtype == param.scalar_type() ? std::string() : " (expected dtype " +
              std::string(c10::toString(dtype)) + ")"));
}

C10_ALWAYS_INLINE void check_like_param(std::string_view op, const char* what, size_t index, const at::Tensor& t,
                                        const at::Tensor& param, at::ScalarType dtype) {
  if (C10_UNLIKELY(!like_param(t, param, dtype))) explain_unlike_param(op, what, index, t, param, dtype);
}

// Whether two table records hold the same bits. std::memcmp of a record is a library call, and prepare_step
// compares one record per tensor every step; word loads compare it inline.
template <typename Record>
C10_ALWAYS_INLINE bool same_record(const Record& a, const Record& b) {
  static_assert(sizeof(Record) % 8 == 0, "table records are whole int64 words");
  uint64_t difference = 0;
  for (size_t offset = 0; offset < sizeof(Record); offset += 8) {
    uint64_t x, y;
    std::memcpy(&x, reinterpret_cast<const char*>(&a) + offset, 8);
    std::memcpy(&y, reinterpret_cast<const char*>(&b) + offset, 8);
    difference |= x ^ y;
  }
  return difference == 0;
}

bool is_low_precision(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

StoredType stored_type(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? kStoredBFloat16 : dtype == at::kHalf ? kStoredHalf : kStoredFloat;
}

// The launch's storage policy (csrc/storage.h), validated: which rounding, which buffers, which dtypes. Plain
// (stored == 0) unless a master copy, a compensation buffer, stochastic rounding of a low-precision tensor or a
// state dtype other than the params' asks for the stored kernels.
StoragePolicy storage_policy(const StepInputs& in, at::ScalarType param_dtype, at::ScalarType state_dtype) {
  const std::string_view op = in.op_name;
  const StepExtras& x = in.extras;
  const auto found = std::find(kRoundingNames.begin(), kRoundingNames.end(), x.param_rounding);
  if (found == kRoundingNames.end()) {
    std::string names;
    for (const std::string_view name : kRoundingNames) names += std::string(names.empty() ? "" : ", ") + std::string(name);
    TORCH_CHECK(false, "fusedopt.", op, ": param_rounding must be one of ", names, ", got ", x.param_rounding);
  }
  const auto rounding = Rounding(found - kRoundingNames.begin());
  const bool master = !x.master_params.empty(), kahan = !x.kahan_comp.empty();
  TORCH_CHECK(kahan == (rounding == kKahan), "fusedopt.", op,
              ": param_rounding=\"kahan\" and kahan_comp go together (one compensation buffer per param)");
  TORCH_CHECK(!(master && kahan), "fusedopt.", op, ": master_params and Kahan compensation exclude each other");
  TORCH_CHECK(!(master || kahan) || is_low_precision(param_dtype), "fusedopt.", op,
              ": master_params and kahan_comp are for bfloat16/float16 params, got ", param_dtype);
  const bool float_types = param_dtype != at::kDouble && state_dtype != at::kDouble;
  TORCH_CHECK(state_dtype == param_dtype || (float_types && (state_dtype == at::kFloat || is_low_precision(state_dtype))),
              "fusedopt.", op, ": state buffers of dtype ", state_dtype, " for ", param_dtype,
              " params: the state dtype may differ from the params' only among float32, bfloat16 and float16");
  const bool stochastic = rounding == kStochastic && (is_low_precision(param_dtype) || is_low_precision(state_dtype));
  if (rounding == kStochastic) {
    TORCH_CHECK(given(x.rng_state) && x.rng_state->scalar_type() == at::kLong && x.rng_state->numel() == 2 &&
                    x.rng_state->is_contiguous() && x.rng_state->device() == in.params[0].device(),
                "fusedopt.", op, ": stochastic rounding needs rng_state, a contiguous int64 tensor [seed, counter] "
                "on ", in.params[0].device());
  }
  StoragePolicy policy{};
  policy.stored = master || kahan || stochastic || state_dtype != param_dtype;
  policy.rounding = rounding;
  policy.param_type = stored_type(param_dtype);
  policy.state_type = stored_type(state_dtype);
  policy.has_master = master;
  policy.has_kahan = kahan;
  return policy;
}

// A 1-element tensor of `dtype` on `device`, when given.
void check_scalar(std::string_view op, const char* what, const OptionalTensor& t, at::ScalarType dtype,
                  const at::Device& device) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == dtype && t->device() == device, "fusedopt.", op, ": ", what,
              " must be a 1-element ", dtype, " tensor on ", device, ", got ", describe(*t));
}

void validate_extras(const StepInputs& in, const at::Device& device) {
  const std::string_view op = in.op_name;
  const StepExtras& x = in.extras;
  const size_t num_groups = in.group_ends.size();
  TORCH_CHECK(x.momenta.size() == 0 || x.momenta.size() == num_groups, "fusedopt.", op,
              ": momenta must be empty or have one entry per group");
  for (size_t g = 0; g < x.momenta.size(); ++g) {
    const OptionalTensor momentum = x.momenta.get(g);
    if (!given(momentum)) continue;
    TORCH_CHECK(in.momentum_slot >= 0, "fusedopt.", op, ": this algorithm has no momentum to read from momenta");
    check_scalar(op, "a momenta entry", momentum, at::kDouble, device);
  }
  check_scalar(op, "grad_scale", x.grad_scale, at::kFloat, device);
  check_scalar(op, "skip_if", x.skip_if, at::kFloat, device);
  check_scalar(op, "found_inf", x.found_inf, at::kFloat, device);
  TORCH_CHECK(x.phases >= kReduceGrads && x.phases <= (kReduceGrads | kUpdate | kResetStats) &&
                  (x.phases & (kReduceGrads | kUpdate)) != 0,
              "fusedopt.", op, ": phases must combine kReduceGrads (1), kUpdate (2) and kResetStats (4), got ",
              x.phases);
  TORCH_CHECK(std::isfinite(x.max_grad_norm) && x.max_grad_norm >= 0, "fusedopt.", op,
              ": max_grad_norm must be finite and >= 0 (0: no clipping), got ", x.max_grad_norm);
  const bool needs_stats = (x.phases & kReduceGrads) || given(x.found_inf) || x.max_grad_norm > 0;
  if (needs_stats) {
    TORCH_CHECK(given(x.grad_stats), "fusedopt.", op,
                ": grad_stats is required to reduce grads, detect non-finite grads or clip");
  }
  if (given(x.grad_stats)) {
    TORCH_CHECK(x.grad_stats->scalar_type() == at::kDouble && x.grad_stats->device() == device &&
                    x.grad_stats->is_contiguous() && x.grad_stats->numel() == kGradStats,
                "fusedopt.", op, ": grad_stats must be a contiguous float64 tensor of ", kGradStats,
                " elements on ", device, ", got ", describe(*x.grad_stats));
  }
  const bool any_schedule = given(x.schedule_lrs) || given(x.schedule_state) || given(x.schedule_program) ||
                            given(x.schedule_momenta);
  if (any_schedule) {
    TORCH_CHECK(given(x.schedule_lrs) && given(x.schedule_state) && given(x.schedule_program), "fusedopt.", op,
                ": a schedule needs schedule_lrs, schedule_state and schedule_program");
    const at::Tensor& lrs = *x.schedule_lrs;
    const at::Tensor& state = *x.schedule_state;
    const at::Tensor& program = *x.schedule_program;
    const int64_t groups = lrs.numel();
    auto check = [&](const at::Tensor& t, const char* what, int64_t dims) {
      TORCH_CHECK(t.scalar_type() == at::kDouble && t.device() == device && t.is_contiguous() && t.dim() == dims &&
                      t.size(0) == groups,
                  "fusedopt.", op, ": ", what, " must be a contiguous float64 tensor of ", dims,
                  " dims and ", groups, " rows on ", device, ", got ", describe(t));
    };
    check(lrs, "schedule_lrs", 1);
    check(state, "schedule_state", 2);
    check(program, "schedule_program", 2);
    if (given(x.schedule_momenta)) check(*x.schedule_momenta, "schedule_momenta", 1);
  }
}

// One state dtype per launch: the first buffer's (the params' when there is none).
at::ScalarType launch_state_dtype(const StepInputs& in) {
  return !in.states.empty() && in.states[0][0].defined() ? in.states[0][0].scalar_type()
                                                         : in.params[0].scalar_type();
}

// What the tensor pass does with a tensor that does not fit its launch: the op raises, saying what is wrong; a
// cached call reports it, and its plan is rebuilt (the rebuild raises, with torch's wording, where torch would).
enum class OnMisfit { kRaise, kReport };

template <GradsFrom kFrom>
C10_ALWAYS_INLINE const at::Tensor& grad_at(const StepInputs& in, size_t i) {
  if constexpr (kFrom == GradsFrom::kList) {
    return in.grads[i];
  } else {
    return grad_of(in.params[i]);
  }
}

// Every tensor of entry i against params[i] and the launch's dtypes and device. The tensor pass checks each entry
// just before it reads it: one walk over the tensors, not one to check and one to read (validate checks the
// rest of the call before either). The test every step passes is inline; the messages are built only on failure.
template <OnMisfit kOn, GradsFrom kFrom>
C10_ALWAYS_INLINE bool check_entry(const StepInputs& in, size_t i, const LaunchKey& key) {
  constexpr bool kReport = kOn == OnMisfit::kReport;
  const std::string_view op = in.op_name;
  const at::Tensor& param = in.params[i];
  if (C10_UNLIKELY(param.scalar_type() != key.param_dtype || param.device() != key.device ||
                   param.layout() != at::kStrided)) {
    if (kReport) return false;
    TORCH_CHECK(false, "fusedopt.", op, ": all params of one launch must share dtype and device; params[", i,
                "] is ", describe(param), ", params[0] is ", describe(in.params[0]));
  }
  const at::Tensor& grad = grad_at<kFrom>(in, i);
  if (C10_UNLIKELY(!grad_usable(param, grad))) {
    if (kReport) return false;
    TORCH_CHECK(false, "fusedopt.", op, ": grads[", i, "]: ", grad_problem(param, grad));
  }
  auto fits = [&](const char* what, const at::Tensor& t, at::ScalarType dtype) {
    if (C10_LIKELY(like_param(t, param, dtype))) return true;
    if (!kReport) explain_unlike_param(op, what, i, t, param, dtype);
    return false;
  };
  for (const auto& list : in.states) {
    if (!fits("state", list[i], key.state_dtype)) return false;
  }
  if (!in.extras.master_params.empty() && !fits("master_params", in.extras.master_params[i], at::kFloat)) {
    return false;
  }
  if (!in.extras.kahan_comp.empty() && !fits("kahan_comp", in.extras.kahan_comp[i], key.param_dtype)) return false;
  for (const auto& list : in.scalars) {
    const at::Tensor& scalar = list[i];
    if (C10_LIKELY(scalar.defined() && scalar.numel() == 1 && scalar.scalar_type() == at::kFloat &&
                   scalar.device() == param.device())) {
      continue;
    }
    if (kReport) return false;
    TORCH_CHECK(false, "fusedopt.", op, ": scalar state [", i, "] must be a 1-element float32 tensor on ",
                param.device(), ", got ", scalar.defined() ? describe(scalar) : std::string("undefined"));
  }
  return true;
}

// The tensors of the entries ahead of entry i, in the stages their chains take (csrc/host_prefetch.h): a grad
// read from its param comes through the param's TensorImpl and AutogradMeta (stages 0, 1); then every tensor's
// TensorImpl (stage 2) and its StorageImpl (stage 3).
template <GradsFrom kFrom>
C10_ALWAYS_INLINE void prefetch_entries_ahead(const StepInputs& in, int64_t i, int64_t n) {
  host::prefetch_chains_ahead<4>(i, n, [&](size_t j, int stage) {
    if (kFrom == GradsFrom::kParams && stage < 2) return prefetch_grad_link(in.params[j], stage);
    if (stage < 2) return;
    auto request = [stage](const at::Tensor& t) {
      if (stage == 2) {
        host::prefetch_metadata(t);
      } else {
        host::prefetch_storage(t);
      }
    };
    if (kFrom == GradsFrom::kList || stage == 3) {
      request(grad_at<kFrom>(in, j));
    } else {
      prefetch_grad_link(in.params[j], 2);
    }
    request(in.params[j]);
    for (const auto& list : in.states) request(list[j]);
    for (const auto& list : in.scalars) request(list[j]);
    if (!in.extras.master_params.empty()) request(in.extras.master_params[j]);
    if (!in.extras.kahan_comp.empty()) request(in.extras.kahan_comp[j]);
  });
}

// The table entries prepare_step compares a few tensors on: the table is rewritten only when something changed,
// so a step usually finds it out of cache.
void prefetch_table_entry(TableView table, int64_t i, int64_t n) {
  host::prefetch_chains_ahead<1>(
      i, n, [&](size_t j, int) { host::prefetch_bytes(&table.tensors()[j], sizeof(TensorEntry)); });
}

// The call's lists against the number of params and groups, and the host table's size: what the tensor pass
// indexes. Nothing here reads a tensor the pass checks, so a cached call's plan that went stale is reported by
// the pass, not raised here.
void check_lists(const StepInputs& in) {
  const std::string_view op = in.op_name;
  const size_t n = in.params.size();
  for (const auto& list : in.states) {
    TORCH_CHECK(list.size() == n, "fusedopt.", op, ": got ", n, " params but a state list of ", list.size());
  }
  for (const auto& list : in.scalars) {
    TORCH_CHECK(list.size() == n, "fusedopt.", op, ": got ", n, " params but a scalar state list of ", list.size());
  }
  const StepExtras& x = in.extras;
  TORCH_CHECK(x.master_params.empty() || x.master_params.size() == n, "fusedopt.", op, ": got ", n,
              " params but ", x.master_params.size(), " master_params");
  TORCH_CHECK(x.kahan_comp.empty() || x.kahan_comp.size() == n, "fusedopt.", op, ": got ", n, " params but ",
              x.kahan_comp.size(), " kahan_comp buffers");
  TORCH_CHECK(in.fresh_state.empty() || in.fresh_state.size() == n, "fusedopt.", op, ": got ", n,
              " params but ", in.fresh_state.size(), " fresh_state flags");
  const size_t num_groups = in.group_ends.size();
  TORCH_CHECK(int64_t(in.hyper.size()) == int64_t(num_groups) * in.num_hyper, "fusedopt.", op, ": expected ",
              in.num_hyper, " hyperparameters for each of ", num_groups, " groups, got ", in.hyper.size());
  TORCH_CHECK(in.lrs.size() == num_groups, "fusedopt.", op, ": expected one lr entry per group");
  int64_t previous_end = 0;
  for (size_t g = 0; g < num_groups; ++g) {
    const int64_t end = in.group_ends[g];
    TORCH_CHECK(end >= previous_end, "fusedopt.", op, ": group_ends must be non-decreasing");
    previous_end = end;
  }
  TORCH_CHECK(previous_end == int64_t(n), "fusedopt.", op, ": group_ends must end at the number of params");
  const int64_t words = table_words(n, num_groups);
  TORCH_CHECK(in.host_table.device().is_cpu() && in.host_table.scalar_type() == at::kLong &&
                  in.host_table.is_contiguous() && in.host_table.numel() == words,
              "fusedopt.", op, ": host_table must be a contiguous CPU int64 tensor of table_words(", n, ", ",
              num_groups, ") = ", words, " elements");
}

// Returns the launch's storage policy (plain for an empty launch).
StoragePolicy validate(const StepInputs& in) {
  check_lists(in);
  const std::string_view op = in.op_name;
  const size_t n = in.params.size();
  const size_t num_groups = in.group_ends.size();
  if (n == 0) return StoragePolicy{};

  const at::Tensor& first = in.params[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusedopt.", op, ": params must be float32, float64, float16 or bfloat16, got ", dtype);
  const StoragePolicy storage = storage_policy(in, dtype, launch_state_dtype(in));
  for (size_t g = 0; g < num_groups; ++g) {
    const std::optional<at::Tensor> lr = in.lrs.get(g);
    if (lr.has_value() && lr->defined()) {
      TORCH_CHECK(lr->numel() == 1 && (lr->scalar_type() == at::kFloat || lr->scalar_type() == at::kDouble) &&
                      lr->device() == first.device(),
                  "fusedopt.", op, ": a tensor lr must be a 1-element float32/float64 tensor on ", first.device(),
                  ", got ", describe(*lr));
    }
  }
  validate_extras(in, first.device());
  const int64_t words = table_words(n, num_groups);
  if (first.device().is_cpu()) {
    TORCH_CHECK(in.device_table.numel() == 0, "fusedopt.", op, ": device_table must be empty for CPU params");
  } else {
    TORCH_CHECK(in.device_table.device() == first.device() && in.device_table.scalar_type() == at::kLong &&
                    in.device_table.is_contiguous() && in.device_table.numel() == words,
                "fusedopt.", op, ": device_table must be a contiguous int64 tensor of ", words, " elements on ",
                first.device());
  }
  return storage;
}

// A tensor's data, as Tensor::data_ptr() (mutated) or const_data_ptr() gives it, through the storage's inline
// accessors (which materialize a copy-on-write storage for a write, and raise where the storage forbids the
// access) without the TensorImpl's virtual has_storage() call: one per tensor per step. A tensor without storage
// or data (undefined, batched, functional, lazily allocated) takes torch's accessor, which raises as torch does.
C10_ALWAYS_INLINE void* tensor_data(const at::Tensor& t, bool mutated) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::Storage& storage = impl->unsafe_storage();
  if (C10_LIKELY(storage)) {
    const void* base = mutated ? storage.mutable_data() : storage.data();
    if (C10_LIKELY(base != nullptr)) {
      if (impl->numel() == 0) return nullptr;  // as torch: no offset into an empty tensor
      return const_cast<char*>(static_cast<const char*>(base)) + impl->itemsize() * impl->storage_offset();
    }
  }
  return mutated ? t.data_ptr() : const_cast<void*>(t.const_data_ptr());
}

// The kernels walk each tensor as one flat array, so param, grad and state must share one dense layout. Where
// they do not (a param that is a strided view, a grad whose strides differ), work on dense copies. Returns the
// data the kernel reads, and writes where `mutated`: a tensor it only reads (a grad) is read through the immutable
// accessor, which leaves a copy-on-write storage shared (the mutable one would copy it).
void* dense_data(const at::Tensor& t, const at::Tensor& reference, PreparedStep& prepared, bool mutated) {
  // Two contiguous tensors of one shape walk alike (the cached flags spare comparing strides).
  if ((t.is_contiguous() && reference.is_contiguous()) || t.numel() == 0 || t.strides() == reference.strides()) {
    return tensor_data(t, mutated);
  }
  at::Tensor copy = at::empty_like(reference, reference.options().dtype(t.scalar_type()));
  copy.copy_(t);
  void* data = copy.data_ptr();
  if (mutated) {
    prepared.write_back.emplace_back(t, std::move(copy));
  } else {
    prepared.keep_alive.push_back(std::move(copy));
  }
  return data;
}

// The per-call values, read from the op's arguments at every call (validated by validate_extras).
StepArgs step_args(const StepExtras& x) {
  auto pointer = [](const OptionalTensor& t) { return given(t) ? t->data_ptr() : nullptr; };
  StepArgs args{};
  args.phases = x.phases;
  args.grad_scale = static_cast<const float*>(pointer(x.grad_scale));
  args.skip_if = static_cast<const float*>(pointer(x.skip_if));
  args.found_inf = static_cast<float*>(pointer(x.found_inf));
  args.grad_stats = static_cast<double*>(pointer(x.grad_stats));
  args.max_grad_norm = x.max_grad_norm;
  args.rng = x.param_rounding == kRoundingNames[kStochastic] ? static_cast<int64_t*>(pointer(x.rng_state)) : nullptr;
  ScheduleArgs& schedule = args.schedule;
  schedule.groups = given(x.schedule_lrs) ? x.schedule_lrs->numel() : 0;
  schedule.lrs = static_cast<double*>(pointer(x.schedule_lrs));
  schedule.momenta = static_cast<double*>(pointer(x.schedule_momenta));
  schedule.program = static_cast<const double*>(pointer(x.schedule_program));
  schedule.state = static_cast<double*>(pointer(x.schedule_state));
  schedule.program_stride = given(x.schedule_program) ? x.schedule_program->size(1) : 0;
  schedule.state_stride = given(x.schedule_state) ? x.schedule_state->size(1) : 0;
  return args;
}

}  // namespace

std::atomic<bool>& cooperative_launch_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

namespace {

// From the first difference until the chunk map is rebuilt the table is marked incomplete (num_chunks < 0), so
// a step that throws half-way never leaves one that looks valid.
void mark_changed(PreparedStep& prepared) {
  prepared.table_changed = true;
  prepared.host.header().num_chunks = -1;
}

// The step's table, its header reset where the launch's sizes changed; the tensor pass follows.
void begin_prepare(const StepInputs& in, PreparedStep& prepared) {
  const int64_t n = in.params.size(), num_groups = in.group_ends.size();
  prepared.empty = false;
  prepared.dtype = in.params[0].scalar_type();
  prepared.device = in.params[0].device();
  prepared.host_table = in.host_table;
  prepared.host = TableView{in.host_table.data_ptr<int64_t>()};
  if (!prepared.device.is_cpu()) prepared.device_table = in.device_table;
  TableHeader& header = prepared.host.header();
  prepared.table_changed = header.num_tensors != n || header.num_groups != num_groups || header.num_chunks < 0;
  if (prepared.table_changed) {
    const int64_t stale = header.device_copy_stale;
    header = TableHeader{};
    header.device_copy_stale = stale;
    header.num_tensors = n;  // fixes where the group entries and the chunk map start
    header.num_groups = num_groups;
    mark_changed(prepared);
  }
}

// Every tensor checked (check_entry) and its table entry compared, rewritten where it differs. Entries are
// rewritten in place; a throw or a misfit leaves the table as it was or marked incomplete, and the params and
// state untouched. False: a tensor does not fit the launch (OnMisfit::kReport).
// Flattened: the TensorImpl accessors it calls per tensor (device, layout, sizes, contiguity, data) are inline
// in torch's headers but too large for the compiler to inline by itself, and five out-of-line calls per tensor
// were a third of a stable step's host time.
template <OnMisfit kOn, GradsFrom kFrom>
__attribute__((flatten)) bool tensor_pass(const StepInputs& in, const LaunchKey& key, PreparedStep& prepared) {
  const int64_t n = in.params.size();
  TableView table = prepared.host;
  int64_t group = 0;
  for (int64_t i = 0; i < n; ++i) {
    prefetch_entries_ahead<kFrom>(in, i, n);
    prefetch_table_entry(table, i, n);
    if (!check_entry<kOn, kFrom>(in, i, key)) return false;
    while (in.group_ends[group] <= i) ++group;
    const at::Tensor* param = &in.params[i];
    at::Tensor dense_param;  // only for a param the kernel cannot walk in place
    if (param->numel() != 0 && !param->is_non_overlapping_and_dense()) {
      dense_param = param->contiguous();
      prepared.write_back.emplace_back(*param, dense_param);
      param = &dense_param;
    }
    TensorEntry e{};
    e.param = tensor_data(*param, true);
    e.grad = dense_data(grad_at<kFrom>(in, i), *param, prepared, false);
    for (int k = 0; k < kMaxStates; ++k) {
      e.state[k] = k < int(in.states.size()) ? dense_data(in.states[k][i], *param, prepared, true) : nullptr;
    }
    for (int k = 0; k < kMaxScalars; ++k) {
      // float32, validated above: the unchecked pointer spares data_ptr<float>()'s type check per tensor
      e.scalars[k] = k < int(in.scalars.size()) ? static_cast<float*>(tensor_data(in.scalars[k][i], true)) : nullptr;
    }
    const TensorSpan& extras = in.extras.master_params.empty() ? in.extras.kahan_comp : in.extras.master_params;
    e.extra = extras.empty() ? nullptr : dense_data(extras[i], *param, prepared, true);
    e.numel = param->numel();
    e.group = int32_t(group);
    e.fresh_state = in.fresh_state.empty() ? 0 : int32_t(in.fresh_state[i] != 0);
    if (!same_record(e, table.tensors()[i])) {
      if (!prepared.table_changed) mark_changed(prepared);
      table.tensors()[i] = e;
    }
  }
  return true;
}

// What follows the tensor pass at every call: the group entries, the header's storage policy and momentum
// slot, the per-call values, and the chunk map where any tensor entry changed.
void finish_prepare(const StepInputs& in, const StoragePolicy& storage, PreparedStep& prepared) {
  const int64_t n = in.params.size(), num_groups = in.group_ends.size();
  TableView table = prepared.host;
  TableHeader& header = table.header();
  bool groups_changed = false;
  for (int64_t g = 0; g < num_groups; ++g) {
    GroupEntry entry{};
    for (int64_t k = 0; k < in.num_hyper; ++k) entry.hyper[k] = in.hyper[g * in.num_hyper + k];
    const std::optional<at::Tensor> lr = in.lrs.get(g);
    if (lr.has_value() && lr->defined()) {
      entry.lr_tensor = lr->data_ptr();
      entry.lr_is_double = lr->scalar_type() == at::kDouble;
      entry.hyper[0] = 0.0;  // unused: the kernel reads the tensor
    }
    if (in.extras.momenta.size() != 0) {
      const OptionalTensor momentum = in.extras.momenta.get(g);
      if (given(momentum)) {
        entry.momentum_value = momentum->data_ptr<double>();
        entry.hyper[in.momentum_slot] = 0.0;  // unused: the kernel reads the tensor
      }
    }
    // A group entry holds no pointer the chunk map depends on: rewriting it leaves the table valid.
    if (std::memcmp(&entry, &table.groups()[g], sizeof(GroupEntry)) != 0) {
      groups_changed = true;
      table.groups()[g] = entry;
    }
  }

  if (std::memcmp(&header.storage, &storage, sizeof(StoragePolicy)) != 0) {
    if (!prepared.table_changed) mark_changed(prepared);
    header.storage = storage;
  }
  if (header.momentum_slot != in.momentum_slot) {
    if (!prepared.table_changed) mark_changed(prepared);
    header.momentum_slot = in.momentum_slot;
  }
  prepared.args = step_args(in.extras);
  prepared.groups_changed = groups_changed && !prepared.table_changed;

  if (header.num_chunks < 0) {
    int64_t* first_chunk = table.first_chunk();
    int64_t chunks = 0, total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t numel = table.tensors()[i].numel;
      first_chunk[i] = chunks;
      chunks += (numel + kChunkSize - 1) / kChunkSize;
      total += numel;
    }
    first_chunk[n] = chunks;
    header.total_numel = total;
    header.num_chunks = chunks;  // complete again
  }
}

}  // namespace

LaunchKey launch_key(const StepInputs& in) {
  const at::Tensor& first = in.params[0];
  return LaunchKey{first.scalar_type(), first.device(), launch_state_dtype(in)};
}

PreparedStep prepare_step(const StepInputs& in) {
  const size_t n = in.params.size();
  TORCH_CHECK(in.grads.size() == n, "fusedopt.", in.op_name, ": got ", n, " params but ", in.grads.size(), " grads");
  const StoragePolicy storage = validate(in);
  PreparedStep prepared;
  if (n == 0) return prepared;
  begin_prepare(in, prepared);
  tensor_pass<OnMisfit::kRaise, GradsFrom::kList>(in, launch_key(in), prepared);
  finish_prepare(in, storage, prepared);
  return prepared;
}

bool prepare_tensors(const StepInputs& in, GradsFrom grads, const LaunchKey& key, PreparedStep& prepared) {
  const size_t n = in.params.size();
  TORCH_CHECK(grads == GradsFrom::kParams || in.grads.size() == n, "fusedopt.", in.op_name, ": got ", n,
              " params but ", in.grads.size(), " grads");
  check_lists(in);  // what the pass indexes; the call's values are validated at each call (prepare_call)
  prepared = PreparedStep{};
  if (n == 0) return true;
  begin_prepare(in, prepared);
  return grads == GradsFrom::kParams ? tensor_pass<OnMisfit::kReport, GradsFrom::kParams>(in, key, prepared)
                                     : tensor_pass<OnMisfit::kReport, GradsFrom::kList>(in, key, prepared);
}

void prepare_call(const StepInputs& in, PreparedStep& prepared) {
  const StoragePolicy storage = validate(in);
  if (!prepared.empty) finish_prepare(in, storage, prepared);
}

void finish_step(PreparedStep& prepared) {
  for (auto& [original, copy] : prepared.write_back) original.copy_(copy);
}

namespace {

int64_t table_words_op(int64_t num_tensors, int64_t num_groups) { return table_words(num_tensors, num_groups); }

}  // namespace


TORCH_LIBRARY(fusedopt, m) {
  m.def("table_words(int num_tensors, int num_groups) -> int", &table_words_op);
  // One step of a device-side LR schedule (csrc/lr_schedule.h) for every param group: lrs[g] (and momenta[g]
  // when the schedule cycles momentum) from program[g] and state[g]; metric feeds ReduceLROnPlateau.
  m.def(
      "advance_schedule_(Tensor(a!) lrs, Tensor(b!) state, Tensor program, Tensor(c!)? momenta=None, "
      "Tensor? metric=None) -> ()");
  // Each algorithm's step op is defined by its own registration (csrc/algorithm_op.h).
}

}  // namespace fusedopt
