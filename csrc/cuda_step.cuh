// The CUDA kernel: one launch updates every tensor of the table. A persistent grid walks the (tensor, chunk)
// work items; each block builds the tensor's rule once per chunk and streams the chunk through it with 16-byte
// loads where every pointer allows. The step counters (and a per-step LR schedule) are advanced by the last
// block to finish, after every block has read them, so a single launch both uses and advances them. A step
// that unscales or clips gradients first reduces them (kReduceGrads), waits at a grid barrier, then updates.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstring>

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

// This thread's share of a chunk's grad statistics: sum of squares (in double, as the norm of many tensors
// must not lose the small ones) and whether any element is inf or NaN.
template <typename scalar_t>
__device__ __forceinline__ void reduce_chunk(const TensorEntry& e, int64_t begin, int64_t end, double& sum_sq,
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

// Adds the block's statistics to grad_stats (one atomic per block).
__device__ __forceinline__ void add_block_stats(double sum_sq, bool nonfinite, double* grad_stats) {
  __shared__ double warp_sums[kThreads / 32];
  __shared__ bool warp_nonfinite[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_down_sync(0xffffffffu, sum_sq, offset);
  nonfinite = __any_sync(0xffffffffu, nonfinite);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    warp_sums[warp] = sum_sq;
    warp_nonfinite[warp] = nonfinite;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_sum = 0.0;
    bool block_nonfinite = false;
    for (int w = 0; w < kThreads / 32; ++w) {
      block_sum += warp_sums[w];
      block_nonfinite |= warp_nonfinite[w];
    }
    atomicAdd(&grad_stats[0], block_sum);
    if (block_nonfinite) atomicAdd(&grad_stats[1], 1.0);
  }
}

// Waits until every block of the grid has arrived. Only for cooperative launches, which guarantee that all
// blocks are resident at once (otherwise a waiting block could keep a later one from ever starting).
__device__ __forceinline__ void grid_barrier(int64_t* arrived) {
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* counter = reinterpret_cast<unsigned long long*>(arrived);
    __threadfence();
    atomicAdd(counter, 1ull);
    while (*reinterpret_cast<volatile unsigned long long*>(counter) < gridDim.x) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

// Not inlined: the schedule math runs once per step in one block, and inlined into every kernel it would cost
// registers in the update loop.
static __device__ __noinline__ void advance_group_schedule(const TableHeader& header, int64_t g) {
  advance_schedule(header.schedule_program + g * header.schedule_program_stride,
                   header.schedule_state + g * header.schedule_state_stride, header.schedule_lrs + g,
                   header.schedule_momenta ? header.schedule_momenta + g : nullptr, nullptr);
}

template <typename scalar_t, typename Rule>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(int64_t* table_words_ptr) {
  using T = typename Rule::opmath_t;
  const TableView table{table_words_ptr};
  TableHeader& header = table.header();
  const int64_t num_chunks = header.num_chunks;
  const int64_t phases = header.phases;
  auto chunk_bounds = [&](int64_t chunk, int64_t& t, int64_t& begin, int64_t& end) {
    t = table.tensor_of_chunk(chunk);
    begin = (chunk - table.first_chunk()[t]) * kChunkSize;
    end = min(begin + kChunkSize, table.tensors()[t].numel);
  };

  if (phases & kReduceGrads) {
    double sum_sq = 0.0;
    bool nonfinite = false;
    for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
      int64_t t, begin, end;
      chunk_bounds(chunk, t, begin, end);
      reduce_chunk<scalar_t>(table.tensors()[t], begin, end, sum_sq, nonfinite);
    }
    add_block_stats(sum_sq, nonfinite, header.grad_stats);
    if (!(phases & kUpdate)) return;
    grid_barrier(&header.blocks_arrived);
  }

  // grad_stats is read through L2 (__ldcg): other blocks wrote it during this launch.
  double stats[kGradStats] = {0.0, 0.0};
  if (header.grad_stats != nullptr) {
    for (int k = 0; k < kGradStats; ++k) stats[k] = __ldcg(&header.grad_stats[k]);
  }
  const GradAdjustment adjust = grad_adjustment(header, stats);
  if (!adjust.skip) {
    // After a reduction in this launch, walk the chunks backwards: the grads read last are still in L2.
    const bool backwards = (phases & kReduceGrads) != 0;
    const int64_t owned = num_chunks > int64_t(blockIdx.x) ? (num_chunks - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    for (int64_t k = 0; k < owned; ++k) {
      const int64_t chunk = blockIdx.x + (backwards ? owned - 1 - k : k) * int64_t(gridDim.x);
      int64_t t, begin, end;
      chunk_bounds(chunk, t, begin, end);
      const TensorEntry entry = table.tensors()[t];
      update_chunk<scalar_t>(entry, table.rule_for<Rule>(entry), T(adjust.factor), begin, end);
    }
  }

  __shared__ bool is_last_block;
  __syncthreads();  // every thread of this block is past its reads of the step counters, lrs and grad_stats
  if (threadIdx.x == 0) {
    __threadfence();
    auto* done = reinterpret_cast<unsigned long long*>(&header.blocks_done);
    is_last_block = atomicAdd(done, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  if (!adjust.skip) {
    const int64_t num_tensors = header.num_tensors;
    for (int64_t t = threadIdx.x; t < num_tensors; t += blockDim.x) {
      if (float* step = table.tensors()[t].step) *step += 1.0f;
    }
    for (int64_t g = threadIdx.x; g < header.schedule_groups; g += blockDim.x) advance_group_schedule(header, g);
  }
  if (threadIdx.x == 0) {
    if (header.found_inf != nullptr) *header.found_inf = adjust.skip ? 1.0f : 0.0f;
    if (phases & kResetStats) {
      for (int k = 0; k < kGradStats; ++k) header.grad_stats[k] = 0.0;
    }
    header.blocks_arrived = 0;  // ready for the next launch (and graph replay)
    header.blocks_done = 0;
  }
}

// Blocks that fit on the device at once: the persistent grid's size.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, c10::DeviceIndex device) {
  static std::array<int, 64> per_device{};  // 0 until queried
  int& blocks = per_device.at(device);
  if (blocks == 0) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    blocks = sms * std::max(per_sm, 1);
  }
  return blocks;
}

// Copies the host table to the device, asynchronously.
inline void upload_table(PreparedStep& prepared, cudaStream_t stream) {
  const TableHeader& header = prepared.host.header();
  const int64_t bytes = table_words(header.num_tensors, header.num_groups) * int64_t(sizeof(int64_t));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // The graph's copy node reads its source at every replay, so the source must outlive the graph: the pinned
    // host table that the optimizer owns, which keeps this table until a later eager step changes it.
    TORCH_CHECK(prepared.host_table.is_pinned(),
                "fusedopt: capturing a step whose tensor table changed needs a pinned host_table");
    C10_CUDA_CHECK(cudaMemcpyAsync(prepared.device_table.data_ptr(), prepared.host.base, bytes,
                                   cudaMemcpyHostToDevice, stream));
    return;
  }
  // Eager: copy through a fresh pinned block, which the caching host allocator keeps alive until the copy has
  // run, so the next step may rewrite the host table at once without waiting for the device.
  at::Tensor staging = at::empty({bytes / int64_t(sizeof(int64_t))}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staging.data_ptr(), prepared.host.base, bytes);
  prepared.device_table.copy_(staging, /*non_blocking=*/true);
}

struct CudaRunner {
  template <typename scalar_t, typename Rule>
  static void run(PreparedStep& prepared) {
    const c10::cuda::CUDAGuard guard(prepared.device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(prepared.device.index());
    const TableHeader& header = prepared.host.header();
    if (prepared.table_changed) upload_table(prepared, stream);
    auto kernel = fused_step_kernel<scalar_t, Rule>;
    const int64_t blocks =
        std::max<int64_t>(1, std::min<int64_t>(header.num_chunks, resident_blocks(kernel, prepared.device.index())));
    int64_t* table = prepared.device_table.data_ptr<int64_t>();
    if ((header.phases & kReduceGrads) && (header.phases & kUpdate)) {
      // The grid barrier between the phases needs every block resident: a cooperative launch guarantees it.
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(unsigned(blocks));
      config.blockDim = dim3(kThreads);
      config.stream = stream;
      cudaLaunchAttribute cooperative{};
      cooperative.id = cudaLaunchAttributeCooperative;
      cooperative.val.cooperative = 1;
      config.attrs = &cooperative;
      config.numAttrs = 1;
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, table));
    } else {
      kernel<<<blocks, kThreads, 0, stream>>>(table);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

}  // namespace fusedopt

// Each algorithm's CUDA kernels live in their own translation unit so they compile in parallel.
#define FUSEDOPT_REGISTER_CUDA(op) \
  TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) { m.impl(#op, &fusedopt::op##impl<fusedopt::CudaRunner>); }
