// The CUDA kernel: one launch updates every tensor of the table. A persistent grid walks the (tensor, chunk)
// work items; each block builds the tensor's rule once per chunk and streams the chunk through it with 16-byte
// loads where every pointer allows. The step counters are bumped by the last block to finish, after every
// block has read them, so a single launch both uses and advances them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "ops.h"

namespace fusedopt {

constexpr int kThreads = 256;

template <typename scalar_t, int kVec>
struct alignas(16) Packet {
  scalar_t v[kVec];
};

template <typename scalar_t, typename Rule>
__device__ __forceinline__ void update_element(const Rule& rule, scalar_t* param, const scalar_t* grad,
                                               scalar_t* const* states, int64_t i) {
  using T = typename Rule::opmath_t;
  constexpr int kStates = Rule::kNumStates;
  T p = T(param[i]);
  T s[kStates > 0 ? kStates : 1];
#pragma unroll
  for (int k = 0; k < kStates; ++k) s[k] = T(states[k][i]);
  rule(p, T(grad[i]), s);
  param[i] = scalar_t(p);
#pragma unroll
  for (int k = 0; k < kStates; ++k) states[k][i] = scalar_t(s[k]);
}

template <typename scalar_t, typename Rule>
__device__ __forceinline__ void update_chunk(const TensorEntry& e, const Rule& rule, int64_t begin, int64_t end) {
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
        rule(pj, T(g.v[j]), sj);
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
    update_element<scalar_t>(rule, param, grad, states, i);
  }
}

template <typename scalar_t, typename Rule>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(int64_t* table_words_ptr) {
  const TableView table{table_words_ptr};
  const int64_t num_chunks = table.header().num_chunks;
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const int64_t t = table.tensor_of_chunk(chunk);
    const TensorEntry entry = table.tensors()[t];
    const int64_t begin = (chunk - table.first_chunk()[t]) * kChunkSize;
    update_chunk<scalar_t>(entry, table.rule_for<Rule>(entry), begin, min(begin + kChunkSize, entry.numel));
  }

  __shared__ bool is_last_block;
  __syncthreads();  // every thread of this block is past its reads of the step counters
  if (threadIdx.x == 0) {
    __threadfence();
    auto* done = reinterpret_cast<unsigned long long*>(&table.header().blocks_done);
    is_last_block = atomicAdd(done, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last_block) {
    const int64_t num_tensors = table.header().num_tensors;
    for (int64_t t = threadIdx.x; t < num_tensors; t += blockDim.x) {
      if (float* step = table.tensors()[t].step) *step += 1.0f;
    }
    if (threadIdx.x == 0) table.header().blocks_done = 0;  // ready for the next launch (and graph replay)
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
    kernel<<<blocks, kThreads, 0, stream>>>(prepared.device_table.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fusedopt

// Each algorithm's CUDA kernels live in their own translation unit so they compile in parallel.
#define FUSEDOPT_REGISTER_CUDA(op) \
  TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) { m.impl(#op, &fusedopt::op##impl<fusedopt::CudaRunner>); }
