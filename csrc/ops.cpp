// Op schemas, the host-side preparation every launch shares (validation, dense layouts, the table cache), and
// the CPU kernel: one parallel region over the same (tensor, chunk) work items the CUDA grid walks.
#include <ATen/Parallel.h>

#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "ops.h"

namespace fusedopt {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << t.scalar_type() << " " << t.sizes() << " on " << t.device();
  return out.str();
}

// Every tensor the kernel touches for entry i must match the param in shape, dtype and device.
void check_like_param(const char* op, const char* what, size_t index, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.defined(), "fusedopt.", op, ": ", what, "[", index, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fusedopt.", op, ": ", what, "[", index,
              "] is sparse; fusedopt optimizers do not support sparse gradients");
  TORCH_CHECK(t.scalar_type() == param.scalar_type() && t.device() == param.device() && t.sizes() == param.sizes(),
              "fusedopt.", op, ": ", what, "[", index, "] is ", describe(t), " but params[", index, "] is ",
              describe(param));
}

void validate(const StepInputs& in) {
  const char* op = in.op_name;
  const size_t n = in.params.size();
  TORCH_CHECK(in.grads.size() == n, "fusedopt.", op, ": got ", n, " params but ", in.grads.size(), " grads");
  for (const auto& list : in.states) {
    TORCH_CHECK(list.size() == n, "fusedopt.", op, ": got ", n, " params but a state list of ", list.size());
  }
  TORCH_CHECK(in.steps.size() == (in.uses_step ? n : 0), "fusedopt.", op, ": got ", n, " params but ",
              in.steps.size(), " state_steps");
  TORCH_CHECK(in.fresh_state.empty() || in.fresh_state.size() == n, "fusedopt.", op, ": got ", n,
              " params but ", in.fresh_state.size(), " fresh_state flags");
  const size_t num_groups = in.group_ends.size();
  TORCH_CHECK(in.hyper.size() == num_groups * kMaxHyper, "fusedopt.", op, ": expected ", kMaxHyper,
              " hyperparameters for each of ", num_groups, " groups, got ", in.hyper.size());
  TORCH_CHECK(in.lrs.size() == num_groups, "fusedopt.", op, ": expected one lr entry per group");
  int64_t previous_end = 0;
  for (int64_t end : in.group_ends) {
    TORCH_CHECK(end >= previous_end, "fusedopt.", op, ": group_ends must be non-decreasing");
    previous_end = end;
  }
  TORCH_CHECK(previous_end == int64_t(n), "fusedopt.", op, ": group_ends must end at the number of params");
  if (n == 0) return;

  const at::Tensor& first = in.params[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusedopt.", op, ": params must be float32, float64, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = in.params[i];
    TORCH_CHECK(param.scalar_type() == dtype && param.device() == first.device() && param.layout() == at::kStrided,
                "fusedopt.", op, ": all params of one launch must share dtype and device; params[", i, "] is ",
                describe(param), ", params[0] is ", describe(first));
    check_like_param(op, "grads", i, in.grads[i], param);
    for (const auto& list : in.states) check_like_param(op, "state", i, list[i], param);
    if (in.uses_step) {
      const at::Tensor& step = in.steps[i];
      TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kFloat &&
                      step.device() == param.device(),
                  "fusedopt.", op, ": state_steps[", i, "] must be a 1-element float32 tensor on ", param.device(),
                  ", got ", step.defined() ? describe(step) : std::string("undefined"));
    }
  }
  for (size_t g = 0; g < num_groups; ++g) {
    const std::optional<at::Tensor> lr = in.lrs.get(g);
    if (lr.has_value() && lr->defined()) {
      TORCH_CHECK(lr->numel() == 1 && (lr->scalar_type() == at::kFloat || lr->scalar_type() == at::kDouble) &&
                      lr->device() == first.device(),
                  "fusedopt.", op, ": a tensor lr must be a 1-element float32/float64 tensor on ", first.device(),
                  ", got ", describe(*lr));
    }
  }
  const int64_t words = table_words(n, num_groups);
  TORCH_CHECK(in.host_table.device().is_cpu() && in.host_table.scalar_type() == at::kLong &&
                  in.host_table.is_contiguous() && in.host_table.numel() == words,
              "fusedopt.", op, ": host_table must be a contiguous CPU int64 tensor of table_words(", n, ", ",
              num_groups, ") = ", words, " elements");
  if (first.device().is_cpu()) {
    TORCH_CHECK(in.device_table.numel() == 0, "fusedopt.", op, ": device_table must be empty for CPU params");
  } else {
    TORCH_CHECK(in.device_table.device() == first.device() && in.device_table.scalar_type() == at::kLong &&
                    in.device_table.is_contiguous() && in.device_table.numel() == words,
                "fusedopt.", op, ": device_table must be a contiguous int64 tensor of ", words, " elements on ",
                first.device());
  }
}

// The kernels walk each tensor as one flat array, so param, grad and state must share one dense layout. Where
// they do not (a param that is a strided view, a grad whose strides differ), work on dense copies.
at::Tensor dense_like(const at::Tensor& t, const at::Tensor& reference, PreparedStep& prepared, bool mutated) {
  if (t.numel() == 0 || t.strides() == reference.strides()) return t;
  at::Tensor copy = at::empty_like(reference);
  copy.copy_(t);
  if (mutated) {
    prepared.write_back.emplace_back(t, copy);
  } else {
    prepared.keep_alive.push_back(copy);
  }
  return copy;
}

}  // namespace

PreparedStep prepare_step(const StepInputs& in) {
  validate(in);
  PreparedStep prepared;
  const int64_t n = in.params.size();
  if (n == 0) return prepared;
  prepared.empty = false;
  prepared.dtype = in.params[0].scalar_type();
  prepared.device = in.params[0].device();
  prepared.host_table = in.host_table;
  prepared.host = TableView{in.host_table.data_ptr<int64_t>()};
  if (!prepared.device.is_cpu()) prepared.device_table = in.device_table;

  const int64_t num_groups = in.group_ends.size();
  TableView table = prepared.host;
  TableHeader& header = table.header();
  // Entries are compared and rewritten in place. From the first difference until the chunk map is rebuilt the
  // table is marked incomplete (num_chunks < 0), so a step that throws half-way never leaves one that looks valid.
  bool changed = header.num_tensors != n || header.num_groups != num_groups || header.num_chunks < 0;
  auto mark_changed = [&] {
    changed = true;
    header.num_chunks = -1;
  };
  if (changed) {
    header = TableHeader{};
    header.num_tensors = n;  // fixes where the group entries and the chunk map start
    header.num_groups = num_groups;
    mark_changed();
  }

  int64_t group = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (in.group_ends[group] <= i) ++group;
    at::Tensor param = in.params[i];
    if (param.numel() != 0 && !param.is_non_overlapping_and_dense()) {
      at::Tensor copy = param.contiguous();
      prepared.write_back.emplace_back(param, copy);
      param = copy;
    }
    TensorEntry e{};
    e.param = param.data_ptr();
    e.grad = dense_like(in.grads[i], param, prepared, false).data_ptr();
    for (int k = 0; k < kMaxStates; ++k) {
      e.state[k] = k < int(in.states.size()) ? dense_like(in.states[k][i], param, prepared, true).data_ptr() : nullptr;
    }
    e.step = in.uses_step ? in.steps[i].data_ptr<float>() : nullptr;
    e.numel = param.numel();
    e.group = int32_t(group);
    e.fresh_state = in.fresh_state.empty() ? 0 : int32_t(in.fresh_state[i] != 0);
    if (std::memcmp(&e, &table.tensors()[i], sizeof(TensorEntry)) != 0) {
      if (!changed) mark_changed();
      table.tensors()[i] = e;
    }
  }

  for (int64_t g = 0; g < num_groups; ++g) {
    GroupEntry entry{};
    std::copy_n(in.hyper.data() + g * kMaxHyper, kMaxHyper, entry.hyper);
    const std::optional<at::Tensor> lr = in.lrs.get(g);
    if (lr.has_value() && lr->defined()) {
      entry.lr_tensor = lr->data_ptr();
      entry.lr_is_double = lr->scalar_type() == at::kDouble;
      entry.hyper[0] = 0.0;  // unused: the kernel reads the tensor
    }
    if (std::memcmp(&entry, &table.groups()[g], sizeof(GroupEntry)) != 0) {
      if (!changed) mark_changed();
      table.groups()[g] = entry;
    }
  }

  if (changed) {
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
  prepared.table_changed = changed;
  return prepared;
}

void finish_step(PreparedStep& prepared) {
  for (auto& [original, copy] : prepared.write_back) original.copy_(copy);
}

namespace {

// Storage <-> math conversions for the CPU loop. c10's bfloat16 rounding branches on NaN, which stops the
// loop from vectorizing; the same round-to-nearest-even written as one select does not.
template <typename T, typename scalar_t>
inline T to_math(scalar_t v) {
  return T(v);
}
template <>
inline float to_math<float, c10::BFloat16>(c10::BFloat16 v) {
  return c10::bit_cast<float>(uint32_t(v.x) << 16);
}
template <typename scalar_t, typename T>
inline scalar_t to_storage(T v) {
  return scalar_t(v);
}
template <>
inline c10::BFloat16 to_storage<c10::BFloat16, float>(float v) {
  const uint32_t bits = c10::bit_cast<uint32_t>(v);
  const uint16_t rounded = uint16_t((bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16);
  return c10::BFloat16(v != v ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

// Applies `rule` to elements [begin, end) of one tensor. Written as a plain loop over restrict pointers with
// compile-time state count, so the compiler vectorizes it.
template <typename scalar_t, typename Rule>
void update_range(const TensorEntry& e, const Rule& rule, int64_t begin, int64_t end) {
  using T = typename Rule::opmath_t;
  constexpr int kStates = Rule::kNumStates;
  scalar_t* __restrict__ param = static_cast<scalar_t*>(e.param);
  const scalar_t* __restrict__ grad = static_cast<const scalar_t*>(e.grad);
  scalar_t* __restrict__ s0 = static_cast<scalar_t*>(e.state[0]);
  scalar_t* __restrict__ s1 = static_cast<scalar_t*>(e.state[1]);
  scalar_t* __restrict__ s2 = static_cast<scalar_t*>(e.state[2]);
  for (int64_t i = begin; i < end; ++i) {
    T p = to_math<T>(param[i]);
    T s[kStates > 0 ? kStates : 1];
    if constexpr (kStates > 0) s[0] = to_math<T>(s0[i]);
    if constexpr (kStates > 1) s[1] = to_math<T>(s1[i]);
    if constexpr (kStates > 2) s[2] = to_math<T>(s2[i]);
    rule(p, to_math<T>(grad[i]), s);
    param[i] = to_storage<scalar_t>(p);
    if constexpr (kStates > 0) s0[i] = to_storage<scalar_t>(s[0]);
    if constexpr (kStates > 1) s1[i] = to_storage<scalar_t>(s[1]);
    if constexpr (kStates > 2) s2[i] = to_storage<scalar_t>(s[2]);
  }
}

// Below this many elements a single thread is faster than waking the pool.
constexpr int64_t kSerialBelow = 1 << 16;

struct CpuRunner {
  template <typename scalar_t, typename Rule>
  static void run(PreparedStep& prepared) {
    const TableView table = prepared.host;
    const TableHeader& header = table.header();
    auto work = [&](int64_t begin, int64_t end) {
      if (begin >= end) return;
      int64_t t = table.tensor_of_chunk(begin);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        while (table.first_chunk()[t + 1] <= chunk) ++t;
        const TensorEntry& entry = table.tensors()[t];
        const int64_t start = (chunk - table.first_chunk()[t]) * kChunkSize;
        update_range<scalar_t>(entry, table.rule_for<Rule>(entry), start,
                               std::min(start + kChunkSize, entry.numel));
      }
    };
    if (header.total_numel < kSerialBelow) {
      work(0, header.num_chunks);
    } else {
      at::parallel_for(0, header.num_chunks, 1, work);
    }
    // Only after every chunk has read its step number.
    for (int64_t t = 0; t < header.num_tensors; ++t) {
      if (float* step = table.tensors()[t].step) *step += 1.0f;
    }
  }
};

int64_t table_words_op(int64_t num_tensors, int64_t num_groups) { return table_words(num_tensors, num_groups); }

}  // namespace

TORCH_LIBRARY(fusedopt, m) {
  m.def("table_words(int num_tensors, int num_groups) -> int", &table_words_op);
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] fresh_state, "
      "int[] group_ends, float[] hyper, Tensor?[] lrs, Tensor(c!) host_table, Tensor(d!) device_table, "
      "bool momentum, bool nesterov, bool maximize) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, int[] group_ends, float[] hyper, Tensor?[] lrs, "
      "Tensor(f!) host_table, Tensor(g!) device_table, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay) -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, "
      "int[] group_ends, float[] hyper, Tensor?[] lrs, Tensor(d!) host_table, Tensor(e!) device_table, "
      "bool maximize) -> ()");
  m.def(
      "adadelta_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] acc_deltas, "
      "Tensor(d!)[] state_steps, int[] group_ends, float[] hyper, Tensor?[] lrs, Tensor(e!) host_table, "
      "Tensor(f!) device_table, bool maximize) -> ()");
  m.def(
      "adamax_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_infs, "
      "Tensor(d!)[] state_steps, int[] group_ends, float[] hyper, Tensor?[] lrs, Tensor(e!) host_table, "
      "Tensor(f!) device_table, bool maximize) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] state_steps, int[] group_ends, float[] hyper, Tensor?[] lrs, "
      "Tensor(f!) host_table, Tensor(g!) device_table, bool momentum, bool centered, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { register_impls<CpuRunner>(m); }

}  // namespace fusedopt
