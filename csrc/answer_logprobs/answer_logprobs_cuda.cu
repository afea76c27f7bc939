// answer_logprobs, CUDA epilogues around the vendor GEMM (cuBLAS via torch.mm in the Python driver).
//
// Math (derived in answer_logprobs_cpu.cpp; the same radit_math.h functions run here). Row r of a logits block
// z [rows, cols] covers the vocabulary columns [col0, col0 + cols); x_rj = z_rj + b_{col0+j}.
//   forward:  (m_r, s_r) <- lse_merge((m_r, s_r), (max_j x_rj, sum_j exp(x_rj - max)))   online logsumexp
//             target_logit_r = x_{r, t_r - col0} when col0 <= t_r < col0 + cols
//   finalize: lse_r = m_r + log s_r, tok_r = target_logit_r - lse_r (0 at ignored rows)
//   backward: dz_rj = g_r ([col0 + j == t_r] - exp(x_rj - lse_r))  (d tok_r / d z_rj = onehot - softmax),
//             grad_bias_{col0+j} += sum_r dz_rj.
//
// Design. Each thread owns 8-element chunks of a row (one 16-byte load for bfloat16, two for float32;
// common/cuda_utils.cuh load_chunk / store_chunk), so a warp moves 512 contiguous bytes per step.
//   * fwd_block_kernel<kGroup>: a group of kGroup threads per row, a warp (32) when the block has enough rows to
//     fill every resident warp, else the whole 256-thread block; the group strides over the row's chunks with an
//     online-logsumexp state per thread (lse_push_n: one rescale per chunk), reduced by warp shuffles (and a
//     shared-memory step across the block's warps, in a fixed order). The grid is the number of resident blocks
//     (SM count x occupancy from cudaOccupancyMaxActiveBlocksPerMultiprocessor), rows visited grid-stride.
//   * fwd_finalize_kernel: one thread per row; an out-of-range target gives NaN and raises the device error
//     flag (no host synchronisation). seg_sum_kernel: one thread per segment sums tok over the rows in row order
//     from shared-memory tiles (deterministic, no atomics).
//   * bwd_block_kernel: 2-D tiles of 256 columns (a warp across, 8 columns per lane) by tile_rows rows (the 8
//     warps take every 8th row); dz goes to out (or in place to z) as the chunk is computed; with grad_bias each
//     lane keeps its 8 column sums in registers, the block reduces its warps in a fixed order into a float32
//     workspace row per row tile, and bias_reduce_kernel adds the row tiles in order to grad_bias: the same
//     bits on every run (no float atomics). Row tiles are sized so that the grid is about one wave of resident
//     blocks.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "answer_logprobs/answer_logprobs.h"
#include "common/cuda_utils.cuh"
#include "common/radit_math.h"

namespace radit {
namespace answer_logprobs {
namespace {

using cuda::kChunk;
constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kTileCols = kWarp * kChunk;  // columns of a backward tile
constexpr unsigned kFull = 0xffffffffu;

struct NoBias {};  // bias type tag of a launch without bias

// x[i] += bias[c0 + i] for the n valid entries of a chunk.
template <class TB>
__device__ __forceinline__ void add_bias(float (&x)[kChunk], const void* bias, std::int64_t c0, int n) {
  if constexpr (!std::is_same_v<TB, NoBias>) {
    const TB* b = static_cast<const TB*>(bias) + c0;
    RADIT_UNROLL
    for (int i = 0; i < kChunk; ++i)
      if (i < n) x[i] += to_float(b[i]);
  }
}

template <class TB>
__device__ __forceinline__ float bias_at(const void* bias, std::int64_t v) {
  if constexpr (std::is_same_v<TB, NoBias>) {
    return 0.0f;
  } else {
    return to_float(static_cast<const TB*>(bias)[v]);
  }
}

__device__ __forceinline__ LseState warp_lse(LseState st) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const LseState o{__shfl_xor_sync(kFull, st.m, off), __shfl_xor_sync(kFull, st.s, off)};
    st = lse_merge(st, o);
  }
  return st;
}

// The state of the whole group (valid in the group's first thread). kGroup == kThreads: every thread of the
// block calls it (the row loop is block-uniform then).
template <int kGroup>
__device__ __forceinline__ LseState group_lse(LseState st, LseState* part) {
  st = warp_lse(st);
  if constexpr (kGroup == kWarp) {
    return st;
  } else {
    static_assert(kGroup == kThreads, "a row group is a warp or the block");
    __syncthreads();  // the previous row's reads of part are done
    if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = st;
    __syncthreads();
    LseState all = lse_empty();
    if (threadIdx.x == 0)
      for (int w = 0; w < kWarps; ++w) all = lse_merge(all, part[w]);
    return all;
  }
}

struct FwdArgs {
  const void* z;
  std::int64_t rows, cols, ld, col0;
  const void* bias;
  const std::int64_t* targets;
  std::int64_t ignore_index;
  float* row_max;
  float* row_sum;
  float* target_logit;
  bool aligned;
};

template <int kGroup, class T, class TB>
__global__ void __launch_bounds__(kThreads) fwd_block_kernel(FwdArgs a) {
  constexpr int kRowsPerBlock = kThreads / kGroup;
  __shared__ LseState part[kWarps];
  const int lane = threadIdx.x % kGroup;
  const std::int64_t chunks = (a.cols + kChunk - 1) / kChunk;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * kRowsPerBlock;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; r < a.rows;
       r += step) {
    const std::int64_t t = a.targets[r];
    if (t == a.ignore_index) continue;  // uniform over the group
    const T* row = static_cast<const T*>(a.z) + r * a.ld;
    LseState st = lse_empty();
    for (std::int64_t q = lane; q < chunks; q += kGroup) {
      const std::int64_t c = q * kChunk;
      const int n = a.cols - c < kChunk ? static_cast<int>(a.cols - c) : kChunk;
      float x[kChunk];
      cuda::load_chunk(row + c, x, n, a.aligned && n == kChunk, -INFINITY);
      add_bias<TB>(x, a.bias, a.col0 + c, n);
      st = lse_push_n(st, x);
    }
    st = group_lse<kGroup>(st, part);
    if (lane == 0) {
      st = lse_merge(LseState{a.row_max[r], a.row_sum[r]}, st);
      a.row_max[r] = st.m;
      a.row_sum[r] = st.s;
      const std::int64_t j = t - a.col0;
      if (j >= 0 && j < a.cols) a.target_logit[r] = to_float(row[j]) + bias_at<TB>(a.bias, t);
    }
  }
}

struct FinalizeArgs {
  const std::int64_t* targets;
  std::int64_t n, vocab, ignore_index;
  const float* row_max;
  const float* row_sum;
  const float* target_logit;
  float* lse;
  float* tok;
  int* error_flag;
};

__global__ void __launch_bounds__(kThreads) fwd_finalize_kernel(FinalizeArgs a) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < a.n; r += step) {
    const std::int64_t t = a.targets[r];
    if (t == a.ignore_index) {
      a.lse[r] = 0.0f;
      a.tok[r] = 0.0f;
      continue;
    }
    const float l = lse_value(LseState{a.row_max[r], a.row_sum[r]});
    a.lse[r] = l;
    if (t >= 0 && t < a.vocab) {
      a.tok[r] = a.target_logit[r] - l;
    } else {
      a.tok[r] = __int_as_float(0x7fc00000);  // NaN: the row has no valid target
      if (a.error_flag != nullptr) atomicExch(a.error_flag, 1);
    }
  }
}

// seg[s] = sum of tok[r] over the rows with segment_ids[r] == s, in row order: one thread per segment scans
// shared-memory tiles of (segment id, tok). Ids outside [0, S) raise the error flag (block 0 reports).
constexpr int kSegTile = 1024;
__global__ void __launch_bounds__(kThreads) seg_sum_kernel(const std::int64_t* ids, const float* tok, std::int64_t n,
                                                          float* seg, std::int64_t num_segments, int* error_flag) {
  __shared__ std::int64_t tile_id[kSegTile];
  __shared__ float tile_tok[kSegTile];
  const std::int64_t s = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float acc = 0.0f;
  for (std::int64_t r0 = 0; r0 < n; r0 += kSegTile) {
    const int m = n - r0 < kSegTile ? static_cast<int>(n - r0) : kSegTile;
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < m; i += blockDim.x) {
      const std::int64_t id = ids[r0 + i];
      tile_id[i] = id;
      tile_tok[i] = tok[r0 + i];
      if (blockIdx.x == 0 && (id < 0 || id >= num_segments) && error_flag != nullptr) atomicExch(error_flag, 1);
    }
    __syncthreads();
    for (int i = 0; i < m; ++i)
      if (tile_id[i] == s) acc += tile_tok[i];
  }
  if (s < num_segments) seg[s] = acc;
}

struct BwdArgs {
  const void* z;
  void* out;
  std::int64_t rows, cols, ld, out_ld, col0, tile_rows;
  const void* bias;
  const std::int64_t* targets;
  std::int64_t ignore_index;
  const float* lse;
  const float* grad_tok;
  float* partial;  // [gridDim.y, cols] column sums per row tile, or nullptr (no grad_bias)
  bool aligned;
};

template <class T, class TO, class TB>
__global__ void __launch_bounds__(kThreads) bwd_block_kernel(BwdArgs a) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kTileCols + lane * kChunk;
  const int n = a.cols - c >= kChunk ? kChunk : (a.cols > c ? static_cast<int>(a.cols - c) : 0);
  const bool vec = a.aligned && n == kChunk;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * a.tile_rows;
  const std::int64_t r1 = r0 + a.tile_rows < a.rows ? r0 + a.tile_rows : a.rows;
  float b[kChunk];
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i) b[i] = 0.0f;
  add_bias<TB>(b, a.bias, a.col0 + c, n);
  float colsum[kChunk];
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i) colsum[i] = 0.0f;
  if (n > 0) {
    for (std::int64_t r = r0 + warp; r < r1; r += kWarps) {
      const std::int64_t t = a.targets[r];
      const float g = a.grad_tok[r];
      float d[kChunk];
      if (t == a.ignore_index || g == 0.0f) {
        RADIT_UNROLL
        for (int i = 0; i < kChunk; ++i) d[i] = 0.0f;
      } else {
        const float l = a.lse[r];
        cuda::load_chunk(static_cast<const T*>(a.z) + r * a.ld + c, d, n, vec, 0.0f);
        const std::int64_t jt = t - a.col0 - c;  // the target's position in this chunk (any value when outside)
        RADIT_UNROLL
        for (int i = 0; i < kChunk; ++i) d[i] = i < n ? dlogit(d[i] + b[i], l, g, jt == i) : 0.0f;
      }
      cuda::store_chunk(static_cast<TO*>(a.out) + r * a.out_ld + c, d, n, vec);
      RADIT_UNROLL
      for (int i = 0; i < kChunk; ++i) colsum[i] += d[i];
    }
  }
  if (a.partial == nullptr) return;  // uniform over the launch
  // Column sums of the tile: the 8 warps' registers reduced in warp order (row stride 9 words per lane keeps
  // the stores free of bank conflicts).
  __shared__ float sums[kWarps][kWarp * (kChunk + 1)];
  RADIT_UNROLL
  for (int i = 0; i < kChunk; ++i) sums[warp][lane * (kChunk + 1) + i] = colsum[i];
  __syncthreads();
  const int col = threadIdx.x;  // kThreads == kTileCols: one column of the tile per thread
  const std::int64_t gc = static_cast<std::int64_t>(blockIdx.x) * kTileCols + col;
  if (gc < a.cols) {
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += sums[w][(col / kChunk) * (kChunk + 1) + col % kChunk];
    a.partial[static_cast<std::int64_t>(blockIdx.y) * a.cols + gc] = s;
  }
}
static_assert(kThreads == kTileCols, "bwd_block_kernel reduces one tile column per thread");

// grad_bias[j] += sum over the row tiles, in tile order, of partial[tile, j].
__global__ void __launch_bounds__(kThreads) bias_reduce_kernel(const float* partial, std::int64_t tiles,
                                                              std::int64_t cols, float* grad_bias) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float s = 0.0f;
  for (std::int64_t k = 0; k < tiles; ++k) s += partial[k * cols + j];
  grad_bias[j] += s;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

unsigned grid_1d(std::int64_t blocks, std::int64_t resident) {
  const std::int64_t g = blocks < resident ? blocks : resident;
  return static_cast<unsigned>(g > 0 ? g : 1);
}

// Calls f(T{}, TB{}) for the block's logits and bias types (NoBias when the bias is absent).
template <class F>
void dispatch_block(const Block& p, F&& f) {
  dispatch_dtype<float, Bf16>(p.z.dtype, "z", [&](auto tz) {
    if (!p.bias.present()) {
      f(tz, NoBias{});
    } else {
      dispatch_dtype<float, Bf16>(p.bias.dtype, "bias", [&](auto tb) { f(tz, tb); });
    }
  });
}

}  // namespace

void fwd_block_cuda(const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                    const TensorArg& targets, std::int64_t ignore_index, const TensorArg& row_max,
                    const TensorArg& row_sum, const TensorArg& target_logit, std::uint64_t stream) {
  const char* fn = "answer_logprobs_fwd_block";
  RADIT_CHECK(z.device >= 0, fn << ": z must be a CUDA tensor");
  const Block p = make_block(fn, z, col0, vocab, bias, targets, ignore_index, z.device);
  check_vector_f32(row_max, fn, "row_max", z.device, p.rows());
  check_vector_f32(row_sum, fn, "row_sum", z.device, p.rows());
  check_vector_f32(target_logit, fn, "target_logit", z.device, p.rows());
  if (p.rows() == 0) return;
  cuda::DeviceGuard guard(z.device);
  const FwdArgs a{p.z.data, p.rows(), p.cols(), p.ld(), p.col0, p.bias.data, p.targets.ptr<const std::int64_t>(),
                  p.ignore_index, row_max.ptr<float>(), row_sum.ptr<float>(), target_logit.ptr<float>(),
                  cuda::chunks_aligned(p.z.data, p.ld(), p.rows(), p.z.dtype == DType::kFloat32 ? 4 : 2)};
  dispatch_block(p, [&](auto tz, auto tb) {
    using T = decltype(tz);
    using TB = decltype(tb);
    // A warp per row when the rows fill every resident warp, else the whole block per row.
    const std::int64_t resident_warp = cuda::resident_blocks(fwd_block_kernel<kWarp, T, TB>, kThreads);
    if (p.rows() >= resident_warp * kWarps) {
      fwd_block_kernel<kWarp, T, TB>
          <<<grid_1d(ceil_div(p.rows(), kWarps), resident_warp), kThreads, 0, cuda::as_stream(stream)>>>(a);
    } else {
      const std::int64_t resident = cuda::resident_blocks(fwd_block_kernel<kThreads, T, TB>, kThreads);
      fwd_block_kernel<kThreads, T, TB><<<grid_1d(p.rows(), resident), kThreads, 0, cuda::as_stream(stream)>>>(a);
    }
  });
  cuda::check_launch(fn);
}

void fwd_finalize_cuda(const TensorArg& targets, std::int64_t vocab, std::int64_t ignore_index,
                       const TensorArg& row_max, const TensorArg& row_sum, const TensorArg& target_logit,
                       const TensorArg& lse, const TensorArg& tok, const TensorArg& segment_ids, const TensorArg& seg,
                       const TensorArg& error_flag, std::uint64_t stream) {
  const char* fn = "answer_logprobs_fwd_finalize";
  RADIT_CHECK(targets.device >= 0, fn << ": targets must be a CUDA tensor");
  const int dev = targets.device;
  check_finalize(fn, targets, vocab, row_max, row_sum, target_logit, lse, tok, segment_ids, seg, dev);
  if (error_flag.present()) check_tensor<std::int32_t>(error_flag, fn, "error_flag", dev, {1});
  const std::int64_t n = targets.size[0];
  cuda::DeviceGuard guard(dev);
  const cudaStream_t st = cuda::as_stream(stream);
  int* flag = error_flag.ptr<int>();
  if (n > 0) {
    const FinalizeArgs a{targets.ptr<const std::int64_t>(), n, vocab, ignore_index, row_max.ptr<const float>(),
                         row_sum.ptr<const float>(), target_logit.ptr<const float>(), lse.ptr<float>(),
                         tok.ptr<float>(), flag};
    fwd_finalize_kernel<<<grid_1d(ceil_div(n, kThreads), cuda::resident_blocks(fwd_finalize_kernel, kThreads)),
                          kThreads, 0, st>>>(a);
    cuda::check_launch(fn);
  }
  if (segment_ids.present() && seg.size[0] > 0) {
    const std::int64_t num_segments = seg.size[0];
    RADIT_CHECK(ceil_div(num_segments, kThreads) < (std::int64_t{1} << 31), fn << ": too many segments");
    seg_sum_kernel<<<static_cast<unsigned>(ceil_div(num_segments, kThreads)), kThreads, 0, st>>>(
        segment_ids.ptr<const std::int64_t>(), tok.ptr<const float>(), n, seg.ptr<float>(), num_segments, flag);
    cuda::check_launch(fn);
  }
}

void bwd_block_cuda(const TensorArg& z, std::int64_t col0, std::int64_t vocab, const TensorArg& bias,
                    const TensorArg& targets, std::int64_t ignore_index, const TensorArg& lse,
                    const TensorArg& grad_tok, const TensorArg& grad_bias, const TensorArg& out,
                    const TensorArg& workspace, std::uint64_t stream) {
  const char* fn = "answer_logprobs_bwd_block";
  RADIT_CHECK(z.device >= 0, fn << ": z must be a CUDA tensor");
  const Block p = make_block(fn, z, col0, vocab, bias, targets, ignore_index, z.device);
  check_bwd(fn, p, lse, grad_tok, grad_bias, out, z.device);
  const std::int64_t rows = p.rows(), cols = p.cols();
  const std::int64_t ws_rows = bwd_workspace_rows(rows);
  if (grad_bias.present()) {
    check_tensor<float>(workspace, fn, "workspace", z.device, {-1});
    RADIT_CHECK(workspace.size[0] >= ws_rows * cols && (workspace.stride[0] == 1 || workspace.size[0] <= 1),
                fn << ": workspace must be a contiguous float32 [" << ws_rows * cols << "], got "
                   << workspace.describe());
  }
  if (rows == 0) return;
  cuda::DeviceGuard guard(z.device);
  const TensorArg& dst = out.present() ? out : p.z;
  const std::int64_t dst_ld = rows <= 1 ? cols : dst.stride[0];
  const std::size_t z_elt = p.z.dtype == DType::kFloat32 ? 4 : 2, o_elt = dst.dtype == DType::kFloat32 ? 4 : 2;
  BwdArgs a{p.z.data, dst.data, rows, cols, p.ld(), dst_ld, p.col0, 0, p.bias.data,
            p.targets.ptr<const std::int64_t>(), p.ignore_index, lse.ptr<const float>(), grad_tok.ptr<const float>(),
            grad_bias.present() ? workspace.ptr<float>() : nullptr,
            cuda::chunks_aligned(p.z.data, p.ld(), rows, z_elt) && cuda::chunks_aligned(dst.data, dst_ld, rows, o_elt)};
  const cudaStream_t st = cuda::as_stream(stream);
  const std::int64_t col_tiles = ceil_div(cols, kTileCols);
  RADIT_CHECK(col_tiles < (std::int64_t{1} << 31), fn << ": too many columns");
  std::int64_t row_tiles = 1;
  dispatch_block(p, [&](auto tz, auto tb) {
    using T = decltype(tz);
    using TB = decltype(tb);
    dispatch_dtype<float, Bf16>(dst.dtype, "out", [&](auto to) {
      using TO = decltype(to);
      // About one wave of resident blocks: row tiles = resident / column tiles, at least 8 rows (one per warp)
      // each, at most the workspace's rows when the bias gradient is wanted.
      const std::int64_t resident = cuda::resident_blocks(bwd_block_kernel<T, TO, TB>, kThreads);
      const std::int64_t max_tiles = a.partial ? ws_rows : ceil_div(rows, kWarps);
      const std::int64_t want = ceil_div(resident, col_tiles);
      row_tiles = want < max_tiles ? want : max_tiles;
      a.tile_rows = ceil_div(rows, row_tiles);
      row_tiles = ceil_div(rows, a.tile_rows);
      bwd_block_kernel<T, TO, TB>
          <<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles)), kThreads, 0, st>>>(a);
    });
  });
  cuda::check_launch(fn);
  if (a.partial != nullptr) {
    bias_reduce_kernel<<<static_cast<unsigned>(ceil_div(cols, kThreads)), kThreads, 0, st>>>(
        a.partial, row_tiles, cols, grad_bias.ptr<float>() + p.col0);
    cuda::check_launch(fn);
  }
}

}  // namespace answer_logprobs
}  // namespace radit
