// The CUDA kernel: one launch updates every tensor of the table. A persistent grid walks the (tensor, chunk)
// work items; each block builds the tensor's rule once per chunk and streams the chunk through it with 16-byte
// loads where every pointer allows. The step counters (and a per-step LR schedule) are advanced by the last
// block to finish, after every block has read them, so a single launch both uses and advances them (and any
// other per-param scalar state, csrc/algorithm.h). A step
// that unscales or clips gradients first reduces them (kReduceGrads), waits at a grid barrier, then updates.
//
// What one launch needs besides the table is its own: the per-call values come by value (StepArgs), and the
// counters and per-block partial sums live in a workspace no other launch in flight uses (one per stream for
// eager launches, one per captured launch inside its graph's snapshot), so overlapping launches, graph replays
// and eager steps cannot confuse each other's barriers. Per-block partials are added in block order, so the
// global norm, hence the clip factor, is the same bit for bit in every run.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "lr_schedule.h"
#include "ops.h"

namespace fusedopt {

constexpr int kThreads = 256;

template <typename scalar_t, int kVec>
struct alignas(16) Packet {
  scalar_t v[kVec];
};

template <typename scalar_t, typename Rule>
__device__ __forceinline__ void update_element(const Rule& rule, typename Rule::opmath_t grad_factor,
                                               scalar_t* param, const scalar_t* grad, scalar_t* const* states,
                                               int64_t i) {
  using T = typename Rule::opmath_t;
  constexpr int kStates = Rule::kNumStates;
  T p = T(param[i]);
  T s[kStates > 0 ? kStates : 1];
#pragma unroll
  for (int k = 0; k < kStates; ++k) s[k] = T(states[k][i]);
  rule(p, T(grad[i]) * grad_factor, s);
  param[i] = scalar_t(p);
#pragma unroll
  for (int k = 0; k < kStates; ++k) states[k][i] = scalar_t(s[k]);
}

template <typename scalar_t, typename Rule>
__device__ __forceinline__ void update_chunk(const TensorEntry& e, const Rule& rule,
                                             typename Rule::opmath_t grad_factor, int64_t begin, int64_t end) {
  using T = typename Rule::opmath_t;
  constexpr int kStates = Rule::kNumStates;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Packet<scalar_t, kVec>;
  scalar_t* param = static_cast<scalar_t*>(e.param);
  const scalar_t* grad = static_cast<const scalar_t*>(e.grad);
  scalar_t* states[kMaxStates];
  uintptr_t address_bits = reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(grad);
#pragma unroll
  for (int k = 0; k < kMaxStates; ++k) {
    states[k] = static_cast<scalar_t*>(e.state[k]);
    if (k < kStates) address_bits |= reinterpret_cast<uintptr_t>(states[k]);
  }
  // `begin` is a multiple of kChunkSize, hence of kVec: the base pointers decide alignment.
  if (address_bits % 16 == 0) {
    const int64_t packed_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < packed_end; i += int64_t(blockDim.x) * kVec) {
      P p = *reinterpret_cast<const P*>(param + i);
      const P g = *reinterpret_cast<const P*>(grad + i);
      P s[kStates > 0 ? kStates : 1];
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = *reinterpret_cast<const P*>(states[k] + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        T pj = T(p.v[j]);
        T sj[kStates > 0 ? kStates : 1];
#pragma unroll
        for (int k = 0; k < kStates; ++k) sj[k] = T(s[k].v[j]);
        rule(pj, T(g.v[j]) * grad_factor, sj);
        p.v[j] = scalar_t(pj);
#pragma unroll
        for (int k = 0; k < kStates; ++k) s[k].v[j] = scalar_t(sj[k]);
      }
      *reinterpret_cast<P*>(param + i) = p;
#pragma unroll
      for (int k = 0; k < kStates; ++k) *reinterpret_cast<P*>(states[k] + i) = s[k];
    }
    begin = packed_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    update_element<scalar_t>(rule, grad_factor, param, grad, states, i);
  }
}

// The stored path (csrc/storage.h): the kernel's scalar_t for a launch whose params and states are stored in
// other dtypes or rounded otherwise than to nearest. One kernel per fp32 rule serves every storage dtype: the
// element types are read from the table (one uniform branch per access), and each element is loaded, updated
// and stored by the same functions the CPU kernels use, so both round identically.
struct StoredElements {};

template <typename Rule>
__device__ __forceinline__ void stored_update_chunk(const TensorEntry& e, const ElementStore& store, const Rule& rule,
                                                    float grad_factor, int64_t begin, int64_t end) {
  constexpr int kStates = Rule::kNumStates;
  const StoragePolicy& policy = store.policy;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float p = load_param(store, e.param, e.extra, i);
    float s[kStates > 0 ? kStates : 1];
#pragma unroll
    for (int k = 0; k < kStates; ++k) s[k] = load_as_float(e.state[k], i, policy.state_type);
    rule(p, load_as_float(e.grad, i, policy.param_type) * grad_factor, s);
    store_param(store, e.param, e.extra, i, p);
#pragma unroll
    for (int k = 0; k < kStates; ++k) store_state(store, e.state[k], k, i, s[k]);
  }
}

// This thread's share of a chunk's grad statistics: sum of squares (in double, as the norm of many tensors
// must not lose the small ones) and whether any element is inf or NaN.
template <typename scalar_t>
__device__ __forceinline__ void reduce_plain_chunk(const TensorEntry& e, int64_t begin, int64_t end, double& sum_sq,
                                             bool& nonfinite) {
  using T = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Packet<scalar_t, kVec>;
  const scalar_t* grad = static_cast<const scalar_t*>(e.grad);
  auto add = [&](scalar_t value) {
    const T g = T(value);
    nonfinite |= is_nonfinite(g);
    sum_sq += double(g) * double(g);
  };
  if (reinterpret_cast<uintptr_t>(grad) % 16 == 0) {
    const int64_t packed_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < packed_end; i += int64_t(blockDim.x) * kVec) {
      const P g = *reinterpret_cast<const P*>(grad + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) add(g.v[j]);
    }
    begin = packed_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) add(grad[i]);
}

template <typename scalar_t>
__device__ __forceinline__ void reduce_chunk(const TableView& table, const TensorEntry& e, int64_t begin,
                                             int64_t end, double& sum_sq, bool& nonfinite) {
  if constexpr (std::is_same_v<scalar_t, StoredElements>) {
    const int32_t type = table.header().storage.param_type;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const float g = load_as_float(e.grad, i, type);
      nonfinite |= is_nonfinite(g);
      sum_sq += double(g) * double(g);
    }
  } else {
    reduce_plain_chunk<scalar_t>(e, begin, end, sum_sq, nonfinite);
  }
}

// A launch's scratch space, in int64 words: [0] the blocks-done counter (self-resetting), then capacity
// per-block sums of squares and capacity per-block non-finite counts; for an algorithm that declares
// kTensorSums, then its per-chunk partial sums (tensor_sum_words: sized from the table, not the device).
struct LaunchWorkspace {
  unsigned int* blocks_done;
  double* partial_sums;
  double* partial_nonfinite;
  double* chunk_sums;  // num_chunks x kTensorSums, chunk-major
};

constexpr int64_t workspace_words(int64_t capacity) { return 1 + 2 * capacity; }

template <class A>
int64_t tensor_sum_words(const TableHeader& header) {
  return header.num_chunks * Declared<A>::num_tensor_sums();
}

inline LaunchWorkspace workspace_at(int64_t* words, int64_t capacity) {
  return LaunchWorkspace{reinterpret_cast<unsigned int*>(words), reinterpret_cast<double*>(words + 1),
                         reinterpret_cast<double*>(words + 1 + capacity),
                         reinterpret_cast<double*>(words + workspace_words(capacity))};
}

// The block's (sum, non-finite count), valid in every thread. Fixed shuffle pattern and warp order: the
// result does not depend on timing.
__device__ __forceinline__ void block_sum(double& sum, double& nonfinite) {
  __shared__ double warp_sums[kThreads / 32];
  __shared__ double warp_nonfinite[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
    nonfinite += __shfl_down_sync(0xffffffffu, nonfinite, offset);
  }
  const int warp = threadIdx.x / 32;
  __syncthreads();  // the shared arrays may still be read by a previous call
  if (threadIdx.x % 32 == 0) {
    warp_sums[warp] = sum;
    warp_nonfinite[warp] = nonfinite;
  }
  __syncthreads();
  sum = 0.0;
  nonfinite = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) {
    sum += warp_sums[w];
    nonfinite += warp_nonfinite[w];
  }
}

// The sum of the grid's per-block partials, added in block order (read through L2: other blocks wrote them).
__device__ __forceinline__ void sum_partials(const LaunchWorkspace& ws, double stats[kGradStats]) {
  double sum = 0.0, nonfinite = 0.0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    sum += __ldcg(&ws.partial_sums[b]);
    nonfinite += __ldcg(&ws.partial_nonfinite[b]);
  }
  block_sum(sum, nonfinite);
  stats[0] += sum;
  stats[1] += nonfinite;
}

// True in every thread of the last block to get here; that block then sees every other block's writes. The
// counter wraps back to 0 (atomicInc), ready for the next launch that uses this workspace.
__device__ __forceinline__ bool last_block_done(unsigned int* counter) {
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

// The tensor that owns `chunk` and the chunk's element range in it.
__device__ __forceinline__ void chunk_bounds(const TableView& table, int64_t chunk, int64_t& t, int64_t& begin,
                                             int64_t& end) {
  t = table.tensor_of_chunk(chunk);
  begin = (chunk - table.first_chunk()[t]) * kChunkSize;
  end = min(begin + kChunkSize, table.tensors()[t].numel);
}

// ---- Per-tensor sums (an algorithm that declares kTensorSums): summed before any update, behind a barrier ----

// This thread's share of a chunk's tensor terms (the rule's tensor_terms, on copies of the state), in double.
template <typename scalar_t, typename Rule>
__device__ __forceinline__ void tensor_terms_chunk(const TensorEntry& e, const ElementStore& store, const Rule& rule,
                                                   typename Rule::opmath_t grad_factor, int64_t begin, int64_t end,
                                                   double (&sums)[kMaxTensorSums]) {
  using T = typename Rule::opmath_t;
  constexpr int kStates = Rule::kNumStates;
  constexpr int kSums = Declared<typename Rule::Algorithm>::num_tensor_sums();
  using Stored = std::conditional_t<std::is_same_v<scalar_t, StoredElements>, float, scalar_t>;  // unused if stored
  const Stored* param = static_cast<const Stored*>(e.param);
  const Stored* grad = static_cast<const Stored*>(e.grad);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    T s[kStates > 0 ? kStates : 1];
    T terms[kSums];
    if constexpr (std::is_same_v<scalar_t, StoredElements>) {
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = load_as_float(e.state[k], i, store.policy.state_type);
      rule.tensor_terms(load_param(store, e.param, e.extra, i),
                        load_as_float(e.grad, i, store.policy.param_type) * grad_factor, s, terms);
    } else {
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = T(static_cast<const scalar_t*>(e.state[k])[i]);
      rule.tensor_terms(T(param[i]), T(grad[i]) * grad_factor, s, terms);
    }
#pragma unroll
    for (int k = 0; k < kSums; ++k) sums[k] += double(terms[k]);
  }
}

// Every chunk's partial sums, block-reduced, at its own place in the workspace: where a chunk's sums land does
// not depend on which block summed it.
template <typename scalar_t, typename Rule>
__device__ __forceinline__ void accumulate_tensor_sums(const TableView& table, const LaunchWorkspace& ws,
                                                       typename Rule::opmath_t grad_factor) {
  static_assert(kMaxTensorSums <= 2, "block_sum reduces two values at a time");
  constexpr int kSums = Declared<typename Rule::Algorithm>::num_tensor_sums();
  for (int64_t chunk = blockIdx.x; chunk < table.header().num_chunks; chunk += gridDim.x) {
    int64_t t, begin, end;
    chunk_bounds(table, chunk, t, begin, end);
    const TensorEntry entry = table.tensors()[t];
    double sums[kMaxTensorSums] = {};
    const ElementStore store = element_store(table.header().storage, nullptr, t);  // read only: no rounding
    tensor_terms_chunk<scalar_t>(entry, store, table.rule_for<Rule>(entry), grad_factor, begin, end, sums);
    block_sum(sums[0], sums[1]);
    if (threadIdx.x == 0) {
      for (int k = 0; k < kSums; ++k) ws.chunk_sums[chunk * kSums + k] = sums[k];
    }
  }
}

// Tensor t's sums, valid in every thread: its chunks' partials added by one block in a fixed pattern, so every
// block (and every run, whatever the grid size) gets the same values.
template <int kSums>
__device__ __forceinline__ void tensor_totals(const TableView& table, const LaunchWorkspace& ws, int64_t t,
                                              double (&totals)[kMaxTensorSums]) {
  double sums[kMaxTensorSums] = {};
  for (int64_t chunk = table.first_chunk()[t] + threadIdx.x; chunk < table.first_chunk()[t + 1];
       chunk += blockDim.x) {
    for (int k = 0; k < kSums; ++k) sums[k] += __ldcg(&ws.chunk_sums[chunk * kSums + k]);
  }
  block_sum(sums[0], sums[1]);
  for (int k = 0; k < kMaxTensorSums; ++k) totals[k] = sums[k];
}

// Not inlined: the schedule math runs once per step in one block, and inlined into every kernel it would cost
// registers in the update loop. Takes scalars, not the kernel's ScheduleArgs by reference: a reference to a
// kernel parameter makes the kernel copy it to its stack.
static __device__ __noinline__ void advance_group_schedule(const double* program, double* state, double* lr,
                                                           double* momentum) {
  advance_schedule(program, state, lr, momentum, nullptr);
}

template <typename scalar_t, typename Rule>
__global__ void __launch_bounds__(kThreads)
    fused_step_kernel(const int64_t* __restrict__ table_words_ptr, const StepArgs args, const LaunchWorkspace ws) {
  using T = typename Rule::opmath_t;
  constexpr int kSums = Declared<typename Rule::Algorithm>::num_tensor_sums();
  const TableView table{const_cast<int64_t*>(table_words_ptr)};
  const TableHeader& header = table.header();
  const int64_t num_chunks = header.num_chunks;
  const int64_t phases = args.phases;

  // grad_stats holds what earlier launches of this step reduced (stream order: they have finished).
  double stats[kGradStats] = {0.0, 0.0};
  if (args.grad_stats != nullptr) {
    for (int k = 0; k < kGradStats; ++k) stats[k] = __ldcg(&args.grad_stats[k]);
  }
  if (phases & kReduceGrads) {
    double sum_sq = 0.0;
    bool nonfinite = false;
    for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
      int64_t t, begin, end;
      chunk_bounds(table, chunk, t, begin, end);
      reduce_chunk<scalar_t>(table, table.tensors()[t], begin, end, sum_sq, nonfinite);
    }
    double block_nonfinite = nonfinite ? 1.0 : 0.0;
    block_sum(sum_sq, block_nonfinite);
    if (threadIdx.x == 0) {
      ws.partial_sums[blockIdx.x] = sum_sq;
      ws.partial_nonfinite[blockIdx.x] = block_nonfinite;
    }
    if (!(phases & kUpdate)) {
      // Reduce only (several launches per step, or the two-launch fallback): the last block adds this
      // launch's total to grad_stats, after the launches before it in the stream.
      if (!last_block_done(ws.blocks_done)) return;
      sum_partials(ws, stats);
      if (threadIdx.x == 0) {
        for (int k = 0; k < kGradStats; ++k) args.grad_stats[k] = stats[k];
      }
      return;
    }
    // Every block is resident (a cooperative launch): wait for all partials, then every block adds them in
    // the same order and gets the same total.
    __threadfence();
    cooperative_groups::this_grid().sync();
    sum_partials(ws, stats);
  }

  const GradAdjustment adjust = grad_adjustment(args, stats);
  if constexpr (kSums > 0) {
    if (phases & kAccumulateTensorSums) {
      if (!adjust.skip) accumulate_tensor_sums<scalar_t, Rule>(table, ws, T(adjust.factor));
      if (!(phases & kUpdate)) return;  // the first of separate launches: the update launch reads the sums
      if (!adjust.skip) {
        __threadfence();
        cooperative_groups::this_grid().sync();
      }
    }
  }
  if (!adjust.skip) {
    // After a reduction in this launch, walk the chunks backwards: the grads read last are still in L2.
    const bool backwards = (phases & (kReduceGrads | kAccumulateTensorSums)) != 0;
    const int64_t owned = num_chunks > int64_t(blockIdx.x) ? (num_chunks - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    int64_t summed = -1;  // the tensor `totals` holds: a block's consecutive chunks mostly share one
    double totals[kMaxTensorSums] = {};
    for (int64_t k = 0; k < owned; ++k) {
      const int64_t chunk = blockIdx.x + (backwards ? owned - 1 - k : k) * int64_t(gridDim.x);
      int64_t t, begin, end;
      chunk_bounds(table, chunk, t, begin, end);
      const TensorEntry entry = table.tensors()[t];
      if constexpr (kSums > 0) {
        if (t != summed) tensor_totals<kSums>(table, ws, t, totals);
        summed = t;
      }
      const Rule rule = table.rule_for<Rule>(entry, kSums > 0 ? totals : nullptr);
      if constexpr (std::is_same_v<scalar_t, StoredElements>) {
        stored_update_chunk(entry, element_store(header.storage, args.rng, t), rule, T(adjust.factor), begin, end);
      } else {
        update_chunk<scalar_t>(entry, rule, T(adjust.factor), begin, end);
      }
    }
  }

  // Only once every block is past its reads of the step counters, lrs and grad_stats.
  if (!last_block_done(ws.blocks_done)) return;
  if (!adjust.skip) {
    const int64_t num_tensors = header.num_tensors;
    for (int64_t t = threadIdx.x; t < num_tensors; t += blockDim.x) {
      table.store_scalars<typename Rule::Algorithm>(t);
    }
    if constexpr (std::is_same_v<scalar_t, StoredElements>) {
      // Every block has drawn this launch's random streams: the next launch gets new ones.
      if (threadIdx.x == 0 && args.rng != nullptr && header.storage.rounding == kStochastic) args.rng[1] += 1;
    }
    __syncthreads();  // the scalars' advance reads the lrs the schedule is about to change
    const ScheduleArgs& schedule = args.schedule;
    for (int64_t g = threadIdx.x; g < schedule.groups; g += blockDim.x) {
      advance_group_schedule(schedule.program + g * schedule.program_stride, schedule.state + g * schedule.state_stride,
                             schedule.lrs + g, schedule.momenta ? schedule.momenta + g : nullptr);
    }
  }
  if (threadIdx.x == 0) {
    if (args.found_inf != nullptr) *args.found_inf = adjust.skip ? 1.0f : 0.0f;
    if (args.grad_stats != nullptr) {
      // Keep this launch's reduction for the launches after it, or start the next step from zero.
      for (int k = 0; k < kGradStats; ++k) args.grad_stats[k] = (phases & kResetStats) ? 0.0 : stats[k];
    }
  }
}

// ---- Launch configuration ----

constexpr int kMaxDevices = 64;

struct DeviceLimits {
  int64_t workspace_capacity = 0;  // the most blocks any kernel can have resident: SMs x max blocks per SM
  bool cooperative = false;        // cudaDevAttrCooperativeLaunch
};

inline const DeviceLimits& device_limits(c10::DeviceIndex device) {
  static std::array<DeviceLimits, kMaxDevices> limits{};
  static std::array<std::once_flag, kMaxDevices> once;
  std::call_once(once.at(device), [&] {
    int sms = 0, per_sm = 0, cooperative = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxBlocksPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    limits[device] = DeviceLimits{int64_t(sms) * std::max(per_sm, 1), cooperative != 0};
  });
  return limits[device];
}

// Blocks of this kernel instantiation that fit on the device at once: the persistent grid's size. Registers
// differ between instantiations (SGD, fp32 AdamW and bf16 amsgrad Adam fit 4, 3 and 2 blocks per SM on sm_90),
// so the cache is per instantiation (a static of this template) and per device.
template <typename scalar_t, typename Rule>
int64_t resident_blocks(c10::DeviceIndex device) {
  static std::array<std::atomic<int64_t>, kMaxDevices> per_device{};  // 0 until queried
  std::atomic<int64_t>& blocks = per_device.at(device);
  if (blocks.load(std::memory_order_relaxed) == 0) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_step_kernel<scalar_t, Rule>,
                                                                 kThreads, 0));
    blocks.store(int64_t(sms) * std::max(per_sm, 1), std::memory_order_relaxed);
  }
  return blocks.load(std::memory_order_relaxed);
}

// ---- Eager workspaces: one per (device, stream), zeroed once; launches on one stream run one after another ----

// `table_words_needed`: the part sized from the table (tensor_sum_words). A larger table replaces the workspace:
// the launches queued on this stream before it finish first, and the caching allocator hands the old block out
// again only on this stream, after them.
inline int64_t* eager_workspace(c10::DeviceIndex device, cudaStream_t stream, int64_t table_words_needed) {
  static std::mutex mutex;
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();  // never freed: see below
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& words = (*workspaces)[{int(device), stream}];
  const int64_t needed = workspace_words(device_limits(device).workspace_capacity) + table_words_needed;
  if (!words.defined() || words.numel() < needed) {
    words = at::zeros({needed}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device));
  }
  return words.data_ptr<int64_t>();
}

// ---- Captured launches: a snapshot of the table that the graph owns ----

// The pinned source of the graph's copy node and the device table plus workspace it fills, alive as long as
// the graph (a CUDA user object). Its destructor runs on a CUDA thread, where no CUDA call is allowed, so it
// only queues the snapshot; the next eager launch frees it.
struct CaptureSnapshot {
  at::Tensor host;
  at::Tensor device;
};

inline std::mutex& released_snapshots_mutex() {
  static std::mutex mutex;
  return mutex;
}
inline std::vector<CaptureSnapshot*>& released_snapshots() {
  static auto* released = new std::vector<CaptureSnapshot*>();  // leaked: graphs may die after static teardown
  return *released;
}

inline void release_snapshot(void* snapshot) {
  const std::lock_guard<std::mutex> lock(released_snapshots_mutex());
  released_snapshots().push_back(static_cast<CaptureSnapshot*>(snapshot));
}

inline void free_released_snapshots() {
  std::vector<CaptureSnapshot*> to_free;
  {
    const std::lock_guard<std::mutex> lock(released_snapshots_mutex());
    to_free.swap(released_snapshots());
  }
  for (CaptureSnapshot* snapshot : to_free) delete snapshot;
}

// The device table (and workspace) this captured launch reads: a copy that no later call rewrites.
inline int64_t* capture_snapshot(PreparedStep& prepared, cudaStream_t stream, int64_t capacity,
                                 int64_t table_words_needed) {
  const TableHeader& header = prepared.host.header();
  const int64_t table = table_words(header.num_tensors, header.num_groups);
  // Host: the table, then a zero blocks-done counter; the partials need no initial value.
  auto* snapshot = new CaptureSnapshot{
      at::empty({table + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true)),
      at::empty({table + workspace_words(capacity) + table_words_needed}, prepared.device_table.options())};
  std::memcpy(snapshot->host.data_ptr(), prepared.host.base, table * sizeof(int64_t));
  snapshot->host.data_ptr<int64_t>()[table] = 0;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph));
  cudaUserObject_t owner = nullptr;
  C10_CUDA_CHECK(cudaUserObjectCreate(&owner, snapshot, release_snapshot, 1, cudaUserObjectNoDestructorSync));
  C10_CUDA_CHECK(cudaGraphRetainUserObject(graph, owner, 1, cudaGraphUserObjectMove));
  // Replayed every time: it re-zeroes the counter too, harmless as a finished launch leaves it at zero.
  C10_CUDA_CHECK(cudaMemcpyAsync(snapshot->device.data_ptr(), snapshot->host.data_ptr(), (table + 1) * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream));
  return snapshot->device.data_ptr<int64_t>();
}

// ---- Eager uploads ----

// Copies words [offset, offset + count) of the host table to the device copy, through a fresh pinned block
// that the caching host allocator keeps alive until the copy has run, so the host may rewrite its table at once.
inline void upload_words(PreparedStep& prepared, int64_t offset, int64_t count) {
  if (count == 0) return;
  at::Tensor staging = at::empty({count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staging.data_ptr(), prepared.host.base + offset, count * sizeof(int64_t));
  prepared.device_table.narrow(0, offset, count).copy_(staging, /*non_blocking=*/true);
}

// Brings the eager device table up to date: all of it after a structural change, only the group entries after
// a hyperparameter change, nothing otherwise.
inline void refresh_device_table(PreparedStep& prepared) {
  TableHeader& header = prepared.host.header();
  if (prepared.table_changed || header.device_copy_stale) {
    header.device_copy_stale = 0;
    upload_words(prepared, 0, table_words(header.num_tensors, header.num_groups));
  } else if (prepared.groups_changed) {
    upload_words(prepared, group_words_offset(header.num_tensors), group_words(header.num_groups));
  }
}

struct CudaRunner {
  template <typename scalar_t, typename Rule>
  static void run(PreparedStep& prepared) {
    const c10::cuda::CUDAGuard guard(prepared.device);
    const c10::DeviceIndex device = prepared.device.index();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
    const TableHeader& header = prepared.host.header();
    const DeviceLimits& limits = device_limits(device);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));

    const int64_t* table = nullptr;
    LaunchWorkspace ws{};
    const int64_t sum_words = tensor_sum_words<typename Rule::Algorithm>(header);
    if (capture == cudaStreamCaptureStatusNone) {
      free_released_snapshots();
      refresh_device_table(prepared);
      table = prepared.device_table.data_ptr<int64_t>();
      ws = workspace_at(eager_workspace(device, stream, sum_words), limits.workspace_capacity);
    } else {
      // The eager copy stays as it was: the next eager step uploads what this capture changed.
      if (prepared.table_changed || prepared.groups_changed) prepared.host.header().device_copy_stale = 1;
      int64_t* words = capture_snapshot(prepared, stream, limits.workspace_capacity, sum_words);
      table = words;
      ws = workspace_at(words + table_words(header.num_tensors, header.num_groups), limits.workspace_capacity);
    }

    if (header.storage.stored != 0) {
      if constexpr (std::is_same_v<typename Rule::opmath_t, float>) {
        launch<StoredElements, Rule>(prepared, stream, limits, table, ws);
      } else {
        TORCH_INTERNAL_ASSERT(false, "fusedopt: stored fp64 launch");
      }
    } else {
      launch<scalar_t, Rule>(prepared, stream, limits, table, ws);
    }
  }

  // One step's kernel launches: one (cooperative where phases need a grid barrier), or one per phase.
  template <typename scalar_t, typename Rule>
  static void launch(PreparedStep& prepared, cudaStream_t stream, const DeviceLimits& limits, const int64_t* table,
                     const LaunchWorkspace& ws) {
    const TableHeader& header = prepared.host.header();
    const c10::DeviceIndex device = prepared.device.index();
    auto kernel = fused_step_kernel<scalar_t, Rule>;
    const int64_t blocks = std::max<int64_t>(
        1, std::min({header.num_chunks, resident_blocks<scalar_t, Rule>(device), limits.workspace_capacity}));
    StepArgs args = prepared.args;
    // An update that needs per-tensor sums accumulates them first, in this launch (or a launch of its own).
    if (Declared<typename Rule::Algorithm>::num_tensor_sums() > 0 && (args.phases & kUpdate)) {
      args.phases |= kAccumulateTensorSums;
    }
    const bool both = (args.phases & (kReduceGrads | kAccumulateTensorSums)) && (args.phases & kUpdate);
    if (both && limits.cooperative && cooperative_launch_enabled().load(std::memory_order_relaxed)) {
      // The grid barriers between the phases need every block resident: a cooperative launch guarantees it.
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(unsigned(blocks));
      config.blockDim = dim3(kThreads);
      config.stream = stream;
      cudaLaunchAttribute cooperative{};
      cooperative.id = cudaLaunchAttributeCooperative;
      cooperative.val.cooperative = 1;
      config.attrs = &cooperative;
      config.numAttrs = 1;
      const cudaError_t status = cudaLaunchKernelEx(&config, kernel, table, args, ws);
      if (status != cudaErrorCooperativeLaunchTooLarge) {
        C10_CUDA_CHECK(status);
        return;
      }
      // Fewer SMs than the device reports (MPS, green contexts): fall back to two launches.
      (void)cudaGetLastError();
    }
    if (both) {
      // One launch per phase: the reduction (its last block adds the partials into grad_stats), the per-tensor
      // sums (into the workspace), then the update.
      for (const int64_t phase : {int64_t(kReduceGrads), int64_t(kAccumulateTensorSums)}) {
        if (!(args.phases & phase)) continue;
        StepArgs first = args;
        first.phases = phase;
        kernel<<<blocks, kThreads, 0, stream>>>(table, first, ws);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      StepArgs update = args;
      update.phases = args.phases & ~int64_t(kReduceGrads | kAccumulateTensorSums);
      kernel<<<blocks, kThreads, 0, stream>>>(table, update, ws);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    kernel<<<blocks, kThreads, 0, stream>>>(table, args, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fusedopt

