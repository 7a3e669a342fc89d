// SA2_FAMILIES: all
// Fused quantizers for Q, K and V (docs/numerics.md §1), shared by every kernel family.
//
//   sa2_column_stats    per (batch, head, channel) mean, and max|x - mean| / 448, over all
//                       tokens: k-bar, v-bar and the FP8 V scales (the one reduction pass
//                       that needs every token). Chunked partials + a small finalize kernel:
//                       deterministic, no atomics.
//   sa2_quantize_rows   Q or K -> INT8/INT4 rows (B, H, N_pad, D or D/2), one pass: optional
//                       mean subtraction (a given per-head vector: K smoothing; or the mean of
//                       each q_mean_rows block: Q smoothing, whose q-bar is quantized to INT8
//                       too), group absmax scales, and optionally q_row . kbar for the lse.
//   sa2_quantize_v_fp8  V -> FP8 E4M3 V^T (B, H, D, N_pad) in quant::v_stored_position order.
//   sa2_smooth_v16      V - vbar rounded to V's dtype, (B, H, N, D) contiguous and zero-padded
//                       (FP16 PV with V smoothing, or a V whose rows are not 16-byte aligned).
// Inputs: fp16/bf16 (B, H, N, d) through batch/head/token strides in elements (the last dim
// contiguous), so HND and NHD both arrive without a copy. Offsets are 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "sa2/common.cuh"
#include "sa2/quant.cuh"

namespace {

using sa2::quant::GroupRule;
using sa2::quant::GroupScale;

constexpr int kThreads = 256;
// Tokens per partial in sa2_column_stats (the Python side sizes the workspace with it).
constexpr int kStatsChunkRows = 256;

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A (B, H, N, d) input with element strides; the last dim is contiguous.
struct StridedInput {
  const void* ptr;
  int64_t stride_b, stride_h, stride_n;
};

// Loads channels [c, c + 8) of one token as floats; channels >= d read as 0. `vec` says the
// 16-byte vector load is legal (d % 8 == 0, strides % 8 == 0, 16-byte aligned base).
template <class T>
__device__ __forceinline__ void load8(const T* row, int c, int d, bool vec, float (&v)[8]) {
  if (vec && c + 8 <= d) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = c + i < d ? to_float(row[c + i]) : 0.0f;
  }
}

// Eight 16-bit values from 16-byte aligned shared memory, as floats.
template <class T>
__device__ __forceinline__ void read8(const T* src, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}

// ---------------------------------------------------------------------------------------
// Column statistics

struct StatsParams {
  StridedInput x;
  int heads, n, d, D;
  float* partial;  // (B, H, chunks, 3, D): sum, max, min
  int chunks;
  int vec;
};

// Thread -> (8-channel vector, token phase): D / 8 vectors per token, 2048 / D tokens in flight
// per CTA with 16-byte loads; the phases are combined through shared memory.
template <class T>
__global__ void __launch_bounds__(kThreads) column_stats_partial_kernel(const StatsParams p) {
  const int chunk = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const T* base = static_cast<const T*>(p.x.ptr) + batch * p.x.stride_b + head * p.x.stride_h;
  const int t0 = chunk * kStatsChunkRows, t1 = min(p.n, t0 + kStatsChunkRows);
  const int vecs = p.D / 8, phases = kThreads / vecs;
  const int c = (threadIdx.x % vecs) * 8, phase = threadIdx.x / vecs;
  float sum[8], mx[8], mn[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) sum[k] = 0.0f, mx[k] = -INFINITY, mn[k] = INFINITY;
  for (int tok = t0 + phase; tok < t1; tok += phases) {
    float v[8];
    load8(base + tok * p.x.stride_n, c, p.d, p.vec != 0, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      sum[k] += v[k];
      mx[k] = fmaxf(mx[k], v[k]);
      mn[k] = fminf(mn[k], v[k]);
    }
  }
  __shared__ float part[3][kThreads * 8];  // phases * D == 2048 for every power-of-two D
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    part[0][phase * p.D + c + k] = sum[k];
    part[1][phase * p.D + c + k] = mx[k];
    part[2][phase * p.D + c + k] = mn[k];
  }
  __syncthreads();
  float* out = p.partial + ((static_cast<int64_t>(batch) * p.heads + head) * p.chunks + chunk) * 3 * p.D;
  for (int ch = threadIdx.x; ch < p.D; ch += kThreads) {
    float s = 0.0f, hi = -INFINITY, lo = INFINITY;
    for (int ph = 0; ph < phases; ++ph) {
      s += part[0][ph * p.D + ch];
      hi = fmaxf(hi, part[1][ph * p.D + ch]);
      lo = fminf(lo, part[2][ph * p.D + ch]);
    }
    out[ch] = s;
    out[p.D + ch] = hi;
    out[2 * p.D + ch] = lo;
  }
}

struct StatsFinalizeParams {
  const float* partial;
  int heads, n, d, D, chunks;
  float* mean;       // (B, H, D) or null
  float* fp8_scale;  // (B, H, D) or null: max|x - mean| / 448 (mean = 0 if `mean` is null)
  float* fp8_inv;    // (B, H, D) or null: 448 / max|x - mean|
};

__global__ void __launch_bounds__(kThreads) column_stats_finalize_kernel(const StatsFinalizeParams p) {
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  for (int c = threadIdx.x; c < p.D; c += blockDim.x) {
    float sum = 0.0f, mx = -INFINITY, mn = INFINITY;
    if (c < p.d) {
      for (int k = 0; k < p.chunks; ++k) {
        const float* part = p.partial + (bh * p.chunks + k) * 3 * p.D;
        sum += part[c];
        mx = fmaxf(mx, part[p.D + c]);
        mn = fminf(mn, part[2 * p.D + c]);
      }
    } else {
      mx = mn = 0.0f;  // padding channels are zero
    }
    const float mean = p.mean && c < p.d ? sum / static_cast<float>(p.n) : 0.0f;
    if (p.mean) p.mean[bh * p.D + c] = mean;
    if (p.fp8_scale) {
      // max_t |x_t - mean| = max(max x - mean, mean - min x) exactly: rounding is monotone.
      const float amax = fmaxf(__fsub_rn(mx, mean), __fsub_rn(mean, mn));
      const GroupScale s = sa2::quant::group_scale(amax, sa2::quant::kFp8Max);
      p.fp8_scale[bh * p.D + c] = s.scale;
      if (p.fp8_inv) p.fp8_inv[bh * p.D + c] = s.inv;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Q / K rows

struct RowsParams {
  StridedInput x;
  int heads, n, d, D;
  int64_t n_pad;
  int block_rows;   // rows per CTA: cta_q (Q) or k_tile (K)
  GroupRule rule;
  int groups_per_block;
  int int4;
  int8_t* out;      // (B, H, n_pad, D or D/2)
  float* scale;     // (B, H, n_pad / block_rows * groups_per_block)
  const float* mean_given;  // (B, H, D): K smoothing, or null
  int mean_rows;            // Q smoothing block (0: off)
  int8_t* mean_q;           // (B, H, n_pad / mean_rows, D): q-bar quantized to INT8
  float* mean_q_scale;      // (B, H, n_pad / mean_rows)
  const float* dot_vec;     // (B, dot_heads, D) or null: writes dot_out = x_row . dot_vec
  int dot_heads;
  float* dot_out;           // (B, H, n_pad)
  int vec;
};

template <class T>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(const RowsParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const int D = p.D, R = p.block_rows;
  const int mean_blocks = p.mean_rows > 0 ? R / p.mean_rows : 1;
  // R x D, the raw input: 16-byte rows of 8 values per thread are conflict-free (fp32 was
  // 2x the shared memory and an 8-way conflicted scalar pattern).
  T* tile = reinterpret_cast<T*>(smem_raw);
  float* mean = reinterpret_cast<float*>(tile + R * D);  // mean_blocks x D
  // Group absmax as int bits: for non-negative floats the int order is the float order, so
  // rows fold into their group with one shared-memory atomicMax.
  int* group_amax = reinterpret_cast<int*>(mean + mean_blocks * D);  // groups_per_block
  float* group_inv = mean + mean_blocks * D + p.groups_per_block;     // groups_per_block

  const int blk = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(batch) * p.heads + head;
  const int row0 = blk * R;
  const int rows_real = max(0, min(R, p.n - row0));
  const T* base = static_cast<const T*>(p.x.ptr) + batch * p.x.stride_b + head * p.x.stride_h;
  const int vecs_per_row = D / 8;
  const bool vec = p.vec != 0;

  for (int gi = threadIdx.x; gi < p.groups_per_block; gi += kThreads) group_amax[gi] = 0;

  // 1. Load the block (rows past n and channels past d are 0).
  for (int i = threadIdx.x; i < R * vecs_per_row; i += kThreads) {
    const int r = i / vecs_per_row, c = (i % vecs_per_row) * 8;
    float v[8];
    if (r < rows_real) {
      load8(base + (row0 + r) * p.x.stride_n, c, p.d, vec, v);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = 0.0f;
    }
    alignas(16) T raw[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) raw[k] = from_float<T>(v[k]);  // exact: v came from T
    *reinterpret_cast<uint4*>(tile + r * D + c) = *reinterpret_cast<const uint4*>(raw);
  }
  __syncthreads();

  // 2. The mean to subtract: given (K), per q_mean_rows block over its real rows (Q), or 0.
  for (int i = threadIdx.x; i < mean_blocks * D; i += kThreads) {
    const int b = i / D, c = i % D;
    float m = 0.0f;
    if (p.mean_rows > 0) {
      const int r0 = b * p.mean_rows, r1 = min(r0 + p.mean_rows, rows_real);
      float sum = 0.0f;
      for (int r = r0; r < r1; ++r) sum += to_float(tile[r * D + c]);
      m = r1 > r0 ? sum / static_cast<float>(r1 - r0) : 0.0f;
    } else if (p.mean_given) {
      m = p.mean_given[bh * D + c];
    }
    mean[i] = m;
  }
  __syncthreads();

  // 3. Row absmax of x - mean (and x . dot_vec on the raw row). A row is vecs_per_row
  //    consecutive lanes (8..32), reduced with shuffles.
  const float* dot_vec = p.dot_vec ? p.dot_vec + (static_cast<int64_t>(batch) * p.dot_heads +
                                                  head / (p.heads / p.dot_heads)) * D
                                   : nullptr;
  const int rows_per_pass = kThreads / vecs_per_row;
  for (int r = threadIdx.x / vecs_per_row; r < R; r += rows_per_pass) {
    const int c = (threadIdx.x % vecs_per_row) * 8;
    const float* mrow = mean + (p.mean_rows > 0 ? r / p.mean_rows : 0) * D;
    float amax = 0.0f, dot = 0.0f;
    float xs[8];
    read8(tile + r * D + c, xs);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float x = xs[k];
      amax = fmaxf(amax, fabsf(__fsub_rn(x, mrow[c + k])));
      if (dot_vec) dot = fmaf(x, dot_vec[c + k], dot);
    }
    for (int off = vecs_per_row / 2; off > 0; off /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      dot += __shfl_xor_sync(0xffffffffu, dot, off);
    }
    if (threadIdx.x % vecs_per_row == 0) {
      if (r < rows_real) atomicMax(&group_amax[p.rule.local_group(r)], __float_as_int(amax));
      if (dot_vec) p.dot_out[bh * p.n_pad + row0 + r] = r < rows_real ? dot : 0.0f;
    }
  }
  __syncthreads();

  // 4. Group scales; q-bar (INT8, one scale per mean block).
  const float qmax = p.int4 ? sa2::quant::kInt4Max : sa2::quant::kInt8Max;
  const int64_t groups_per_head = (p.n_pad / R) * p.groups_per_block;
  for (int gi = threadIdx.x; gi < p.groups_per_block; gi += kThreads) {
    const GroupScale s = sa2::quant::group_scale(__int_as_float(group_amax[gi]), qmax);
    group_inv[gi] = s.inv;
    p.scale[bh * groups_per_head + static_cast<int64_t>(blk) * p.groups_per_block + gi] = s.scale;
  }
  if (p.mean_rows > 0 && p.mean_q) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t blocks_per_head = p.n_pad / p.mean_rows;
    for (int b = warp; b < mean_blocks; b += kThreads / 32) {
      float amax = 0.0f;
      for (int c = lane; c < D; c += 32) amax = fmaxf(amax, fabsf(mean[b * D + c]));
      for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      const GroupScale s = sa2::quant::group_scale(amax, sa2::quant::kInt8Max);
      const int64_t gb = bh * blocks_per_head + static_cast<int64_t>(blk) * mean_blocks + b;
      for (int c = lane; c < D; c += 32)
        p.mean_q[gb * D + c] = static_cast<int8_t>(sa2::quant::quantize_int(mean[b * D + c], s.inv));
      if (lane == 0) p.mean_q_scale[gb] = s.scale;
    }
  }
  __syncthreads();

  // 5. Quantize and store: 8 channels -> 8 bytes (INT8) or 4 bytes (INT4).
  const int row_bytes = p.int4 ? D / 2 : D;
  int8_t* out = p.out + (bh * p.n_pad + row0) * row_bytes;
  for (int i = threadIdx.x; i < R * vecs_per_row; i += kThreads) {
    const int r = i / vecs_per_row, c = (i % vecs_per_row) * 8;
    const float* mrow = mean + (p.mean_rows > 0 ? r / p.mean_rows : 0) * D;
    const float inv = group_inv[p.rule.local_group(r)];
    float xs[8];
    read8(tile + r * D + c, xs);
    int q[8];
#pragma unroll
    for (int k = 0; k < 8; ++k)
      q[k] = r < rows_real ? sa2::quant::quantize_int(__fsub_rn(xs[k], mrow[c + k]), inv) : 0;
    if (p.int4) {
      uint32_t w = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) w |= sa2::quant::pack_int4_pair(q[2 * k], q[2 * k + 1]) << (8 * k);
      *reinterpret_cast<uint32_t*>(out + r * row_bytes + c / 2) = w;
    } else {
      uint32_t w[2] = {0, 0};
#pragma unroll
      for (int k = 0; k < 8; ++k) w[k / 4] |= (static_cast<uint32_t>(q[k]) & 0xFFu) << (8 * (k % 4));
      *reinterpret_cast<uint2*>(out + r * row_bytes + c) = make_uint2(w[0], w[1]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// V

constexpr int kVTileTokens = 64;

struct VFp8Params {
  StridedInput x;
  int heads, n, d, D;
  int64_t n_pad;
  const float* mean;  // (B, H, D) or null
  const float* inv;   // (B, H, D): 448 / max|V - mean|
  uint8_t* out;       // (B, H, D, n_pad)
  int vec;
};

template <class T>
__global__ void __launch_bounds__(kThreads) quantize_v_fp8_kernel(const VFp8Params p) {
  extern __shared__ __align__(16) uint8_t vt[];  // D x 64 bytes, already in stored order
  const int tile = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(batch) * p.heads + head;
  const int D = p.D, vecs_per_row = D / 8;
  const int tok0 = tile * kVTileTokens;
  const T* base = static_cast<const T*>(p.x.ptr) + batch * p.x.stride_b + head * p.x.stride_h;
  const float* mean = p.mean ? p.mean + bh * D : nullptr;
  const float* inv = p.inv + bh * D;
  for (int i = threadIdx.x; i < kVTileTokens * vecs_per_row; i += kThreads) {
    const int r = i / vecs_per_row, c = (i % vecs_per_row) * 8;
    const int pos = sa2::quant::v_stored_position(r);
    float v[8];
    if (tok0 + r < p.n) {
      load8(base + (tok0 + r) * p.x.stride_n, c, p.d, p.vec != 0, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float centered = mean ? __fsub_rn(v[k], mean[c + k]) : v[k];
        vt[(c + k) * kVTileTokens + pos] = c + k < p.d ? sa2::quant::to_e4m3(__fmul_rn(centered, inv[c + k])) : 0;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) vt[(c + k) * kVTileTokens + pos] = 0;
    }
  }
  __syncthreads();
  uint8_t* out = p.out + bh * D * p.n_pad + tok0;
  for (int i = threadIdx.x; i < D * (kVTileTokens / 16); i += kThreads) {
    const int c = i / (kVTileTokens / 16), part = i % (kVTileTokens / 16);
    *reinterpret_cast<uint4*>(out + c * p.n_pad + part * 16) =
        *reinterpret_cast<const uint4*>(vt + c * kVTileTokens + part * 16);
  }
}

struct V16Params {
  StridedInput x;
  int heads, n, d, D;
  const float* mean;  // (B, H, D) or null (plain zero-padded copy)
  void* out;          // (B, H, n, D) contiguous, x's dtype
  int vec;
};

template <class T>
__global__ void __launch_bounds__(kThreads) smooth_v16_kernel(const V16Params p) {
  const int head = blockIdx.y, batch = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(batch) * p.heads + head;
  const T* base = static_cast<const T*>(p.x.ptr) + batch * p.x.stride_b + head * p.x.stride_h;
  const float* mean = p.mean ? p.mean + bh * p.D : nullptr;
  T* out = static_cast<T*>(p.out) + bh * p.n * p.D;
  const int vecs_per_row = p.D / 8;
  const int64_t total = static_cast<int64_t>(p.n) * vecs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t tok = i / vecs_per_row;
    const int c = static_cast<int>(i % vecs_per_row) * 8;
    float v[8];
    load8(base + tok * p.x.stride_n, c, p.d, p.vec != 0, v);
    alignas(16) T r[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) r[k] = from_float<T>(c + k < p.d && mean ? __fsub_rn(v[k], mean[c + k]) : v[k]);
    *reinterpret_cast<uint4*>(out + tok * p.D + c) = *reinterpret_cast<const uint4*>(r);
  }
}

// ---------------------------------------------------------------------------------------
// Fused path (sa2_quantize_qkv): two launches per attention call instead of up to seven.
//
//   column_stats_fused_kernel  K and V column partials in one grid; the last CTA of each
//                              (tensor, batch, head) finalizes it (ticket counter, reset to 0
//                              by that CTA), so no finalize launch.
//   quantize_qkv_kernel        Q rows, K rows and the FP8 V^T tiles in one grid (the CTA
//                              index picks the job). Rows stay in registers (no shared tile).
// Every value is computed with the same fp32 operations in the same order as the per-pass
// kernels above (sums, fsub/fmul/fma, shuffle trees), so the results are bit-identical.

// Eight 16-bit values of one token (channels >= d read as 0), kept packed in T.
template <class T>
__device__ __forceinline__ uint4 load_raw8(const T* row, int c, int d, bool vec) {
  if (vec && c + 8 <= d) return *reinterpret_cast<const uint4*>(row + c);
  alignas(16) T e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = c + i < d ? row[c + i] : from_float<T>(0.0f);
  return *reinterpret_cast<const uint4*>(e);
}

template <class T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}

struct StatsJob {
  StridedInput x;
  float* partial;     // (B, H, chunks, 3, D)
  float* mean;        // (B, H, D) or null
  float* fp8_scale;   // (B, H, D) or null
  float* fp8_inv;     // (B, H, D) or null
  unsigned* counter;  // (B * H) tickets, 0 between calls
};

struct FusedStatsParams {
  StatsJob job[2];
  int heads, n, d, D, chunks, vec[2];
};

// Token loads per thread issued before they are summed (the sum order is unchanged).
constexpr int kStatsBatch = 8;

template <class T>
__global__ void __launch_bounds__(kThreads) column_stats_fused_kernel(const FusedStatsParams p) {
  const int which = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks;
  const int head = blockIdx.y, batch = blockIdx.z;
  const StatsJob& job = p.job[which];
  const int64_t bh = static_cast<int64_t>(batch) * p.heads + head;
  const T* base = static_cast<const T*>(job.x.ptr) + batch * job.x.stride_b + head * job.x.stride_h;
  const int t0 = chunk * kStatsChunkRows, t1 = min(p.n, t0 + kStatsChunkRows);
  const int vecs = p.D / 8, phases = kThreads / vecs;
  const int c = (threadIdx.x % vecs) * 8, phase = threadIdx.x / vecs;
  const bool vec = p.vec[which] != 0;
  float sum[8], mx[8], mn[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) sum[k] = 0.0f, mx[k] = -INFINITY, mn[k] = INFINITY;
  for (int tok0 = t0 + phase; tok0 < t1; tok0 += kStatsBatch * phases) {
    uint4 raw[kStatsBatch];
#pragma unroll
    for (int s = 0; s < kStatsBatch; ++s) {
      const int tok = tok0 + s * phases;
      if (tok < t1) raw[s] = load_raw8(base + tok * job.x.stride_n, c, p.d, vec);
    }
#pragma unroll
    for (int s = 0; s < kStatsBatch; ++s) {
      if (tok0 + s * phases < t1) {
        float v[8];
        unpack8<T>(raw[s], v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          sum[k] += v[k];
          mx[k] = fmaxf(mx[k], v[k]);
          mn[k] = fminf(mn[k], v[k]);
        }
      }
    }
  }
  __shared__ float part[3][kThreads * 8];
  __shared__ bool last;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    part[0][phase * p.D + c + k] = sum[k];
    part[1][phase * p.D + c + k] = mx[k];
    part[2][phase * p.D + c + k] = mn[k];
  }
  __syncthreads();
  float* out = job.partial + (bh * p.chunks + chunk) * 3 * p.D;
  for (int ch = threadIdx.x; ch < p.D; ch += kThreads) {
    float s = 0.0f, hi = -INFINITY, lo = INFINITY;
    for (int ph = 0; ph < phases; ++ph) {
      s += part[0][ph * p.D + ch];
      hi = fmaxf(hi, part[1][ph * p.D + ch]);
      lo = fminf(lo, part[2][ph * p.D + ch]);
    }
    out[ch] = s;
    out[p.D + ch] = hi;
    out[2 * p.D + ch] = lo;
  }
  // Publish this partial, then take a ticket; the CTA that draws the last one finalizes.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&job.counter[bh], 1u) == static_cast<unsigned>(p.chunks - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* partial = job.partial + bh * p.chunks * 3 * p.D;
  for (int ch = threadIdx.x; ch < p.D; ch += kThreads) {
    float s = 0.0f, hi = -INFINITY, lo = INFINITY;
    if (ch < p.d) {
#pragma unroll 8
      for (int k = 0; k < p.chunks; ++k) {  // chunk order, as column_stats_finalize_kernel
        const float* pk = partial + k * 3 * p.D;
        s += __ldcg(pk + ch);
        hi = fmaxf(hi, __ldcg(pk + p.D + ch));
        lo = fminf(lo, __ldcg(pk + 2 * p.D + ch));
      }
    } else {
      hi = lo = 0.0f;
    }
    const float mean = job.mean && ch < p.d ? s / static_cast<float>(p.n) : 0.0f;
    if (job.mean) job.mean[bh * p.D + ch] = mean;
    if (job.fp8_scale) {
      const float amax = fmaxf(__fsub_rn(hi, mean), __fsub_rn(mean, lo));
      const GroupScale g = sa2::quant::group_scale(amax, sa2::quant::kFp8Max);
      job.fp8_scale[bh * p.D + ch] = g.scale;
      if (job.fp8_inv) job.fp8_inv[bh * p.D + ch] = g.inv;
    }
  }
  if (threadIdx.x == 0) job.counter[bh] = 0;  // ready for the next call on this stream
}

// Rows per thread of a quantize_qkv rows job: block_rows * D / 2048 (8 for every tile shape in
// config.py: 128 x 128, 64 x 256, 128 x 64, 64 x 128).
constexpr int kMaxRowPasses = 8;

struct RowsJob {
  StridedInput x;
  int heads, n, block_rows, blocks_per_head, groups_per_block;
  int64_t n_pad;
  GroupRule rule;
  int8_t* out;              // (B, H, n_pad, D or D/2)
  float* scale;             // (B, H, blocks_per_head * groups_per_block)
  const float* mean;        // (B, H, D) or null
  const float* dot_vec;     // (B, dot_heads, D) or null
  int dot_heads;
  float* dot_out;           // (B, H, n_pad)
  int vec;
};

struct VJob {
  StridedInput x;
  int heads, n, tiles_per_head;
  int64_t n_pad;
  const float* mean;  // (B, H, D) or null
  const float* inv;   // (B, H, D)
  uint8_t* out;       // (B, H, D, n_pad)
  int vec;
};

struct QkvParams {
  RowsJob rows[2];      // Q, K
  VJob v;
  int d, D, int4;
  int64_t ctas[3];      // CTAs of Q, K, V (V: 0 when V is not quantized here)
};

// Same thread mapping as quantize_rows_kernel: thread -> (row phase, 8-channel vector), rows
// r = phase + s * rows_per_pass; the block's raw rows live in registers between the passes.
template <class T>
__device__ __forceinline__ void quantize_rows_job(const RowsJob& j, int64_t cta, int d, int D, int int4,
                                                  int* group_amax, float* group_inv) {
  const int blk = static_cast<int>(cta % j.blocks_per_head);
  const int64_t bh = cta / j.blocks_per_head;
  const int head = static_cast<int>(bh % j.heads), batch = static_cast<int>(bh / j.heads);
  const int R = j.block_rows, row0 = blk * R, rows_real = max(0, min(R, j.n - row0));
  const int vecs = D / 8, rows_per_pass = kThreads / vecs, passes = R / rows_per_pass;
  const int c = (threadIdx.x % vecs) * 8, rsub = threadIdx.x / vecs;
  const T* base = static_cast<const T*>(j.x.ptr) + batch * j.x.stride_b + head * j.x.stride_h;
  const bool vec = j.vec != 0;

  uint4 raw[kMaxRowPasses];
#pragma unroll
  for (int s = 0; s < kMaxRowPasses; ++s) {
    const int r = rsub + s * rows_per_pass;
    raw[s] = make_uint4(0, 0, 0, 0);
    if (s < passes && r < rows_real) raw[s] = load_raw8(base + (row0 + r) * j.x.stride_n, c, d, vec);
  }
  for (int gi = threadIdx.x; gi < j.groups_per_block; gi += kThreads) group_amax[gi] = 0;
  float m[8], dv[8];
  const float* dot_vec =
      j.dot_vec ? j.dot_vec + (static_cast<int64_t>(batch) * j.dot_heads + head / (j.heads / j.dot_heads)) * D
                : nullptr;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    m[k] = j.mean ? j.mean[bh * D + c + k] : 0.0f;
    dv[k] = dot_vec ? dot_vec[c + k] : 0.0f;
  }
  __syncthreads();

#pragma unroll
  for (int s = 0; s < kMaxRowPasses; ++s) {
    if (s < passes) {
      const int r = rsub + s * rows_per_pass;
      float x[8];
      unpack8<T>(raw[s], x);
      float amax = 0.0f, dot = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        amax = fmaxf(amax, fabsf(__fsub_rn(x[k], m[k])));
        if (dot_vec) dot = fmaf(x[k], dv[k], dot);
      }
      for (int off = vecs / 2; off > 0; off /= 2) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        dot += __shfl_xor_sync(0xffffffffu, dot, off);
      }
      if (threadIdx.x % vecs == 0) {
        if (r < rows_real) atomicMax(&group_amax[j.rule.local_group(r)], __float_as_int(amax));
        if (dot_vec) j.dot_out[bh * j.n_pad + row0 + r] = r < rows_real ? dot : 0.0f;
      }
    }
  }
  __syncthreads();

  const float qmax = int4 ? sa2::quant::kInt4Max : sa2::quant::kInt8Max;
  const int64_t groups_per_head = static_cast<int64_t>(j.blocks_per_head) * j.groups_per_block;
  for (int gi = threadIdx.x; gi < j.groups_per_block; gi += kThreads) {
    const GroupScale g = sa2::quant::group_scale(__int_as_float(group_amax[gi]), qmax);
    group_inv[gi] = g.inv;
    j.scale[bh * groups_per_head + static_cast<int64_t>(blk) * j.groups_per_block + gi] = g.scale;
  }
  __syncthreads();

  const int row_bytes = int4 ? D / 2 : D;
  int8_t* out = j.out + (bh * j.n_pad + row0) * row_bytes;
#pragma unroll
  for (int s = 0; s < kMaxRowPasses; ++s) {
    if (s < passes) {
      const int r = rsub + s * rows_per_pass;
      const float inv = group_inv[j.rule.local_group(r)];
      float x[8];
      unpack8<T>(raw[s], x);
      int q[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = r < rows_real ? sa2::quant::quantize_int(__fsub_rn(x[k], m[k]), inv) : 0;
      if (int4) {
        uint32_t w = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) w |= sa2::quant::pack_int4_pair(q[2 * k], q[2 * k + 1]) << (8 * k);
        *reinterpret_cast<uint32_t*>(out + r * row_bytes + c / 2) = w;
      } else {
        uint32_t w[2] = {0, 0};
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k / 4] |= (static_cast<uint32_t>(q[k]) & 0xFFu) << (8 * (k % 4));
        *reinterpret_cast<uint2*>(out + r * row_bytes + c) = make_uint2(w[0], w[1]);
      }
    }
  }
}

// Word slot of stored quad `quad` (bytes 4q..4q+3 of a 64-key row) in channel row `ch` of
// the V^T staging tile: XOR-swizzled so that the 32 lanes of a warp write 32 different banks
// (lanes differ in channel vector; odd vectors also write their channels in k ^ 1 order, so
// the two bank halves, i.e. even and odd channel rows, are both used).
__device__ __forceinline__ int v_slot_swizzle(int ch, int D) { return ((ch >> 4) * (256 / D)) & 15; }

// One 64-key tile of FP8 V^T. Thread -> (quad, 8-channel vector): a quad is the 4 keys that
// land in one 32-bit word of the stored order (keys 2a, 2a+1, 2a+8, 2a+9 of a 16-key group,
// quant::v_stored_position), so the transpose writes whole words, not bytes.
template <class T>
__device__ __forceinline__ void quantize_v_job(const VJob& j, int64_t cta, int d, int D, uint32_t* words) {
  const int tile = static_cast<int>(cta % j.tiles_per_head);
  const int64_t bh = cta / j.tiles_per_head;
  const int head = static_cast<int>(bh % j.heads), batch = static_cast<int>(bh / j.heads);
  const int vecs = D / 8, tok0 = tile * kVTileTokens;
  const T* base = static_cast<const T*>(j.x.ptr) + batch * j.x.stride_b + head * j.x.stride_h;
  const float* mean = j.mean ? j.mean + bh * D : nullptr;
  const float* inv = j.inv + bh * D;
  const bool vec = j.vec != 0;
  for (int i = threadIdx.x; i < (kVTileTokens / 4) * vecs; i += kThreads) {
    const int cv = i % vecs, quad = i / vecs, c = cv * 8;
    const int key0 = (quad / 4) * 16 + 2 * (quad % 4);
    const int keys[4] = {key0, key0 + 1, key0 + 8, key0 + 9};
    uint4 raw[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      raw[e] = make_uint4(0, 0, 0, 0);
      if (tok0 + keys[e] < j.n) raw[e] = load_raw8(base + (tok0 + keys[e]) * j.x.stride_n, c, d, vec);
    }
    float mk[8], ik[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      mk[k] = mean ? mean[c + k] : 0.0f;
      ik[k] = inv[c + k];
    }
    uint32_t packed[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // per channel: the quad's 4 bytes
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (tok0 + keys[e] < j.n) {
        float v[8];
        unpack8<T>(raw[e], v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float centered = mean ? __fsub_rn(v[k], mk[k]) : v[k];
          const uint32_t b = c + k < d ? sa2::quant::to_e4m3(__fmul_rn(centered, ik[k])) : 0u;
          packed[k] |= b << (8 * e);
        }
      }
    }
    const bool odd = cv & 1;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int ch = c + (k ^ static_cast<int>(odd));
      words[ch * 16 + (quad ^ v_slot_swizzle(ch, D))] = odd ? packed[k ^ 1] : packed[k];
    }
  }
  __syncthreads();
  uint8_t* out = j.out + bh * D * j.n_pad + tok0;
  for (int i = threadIdx.x; i < D * 4; i += kThreads) {
    const int ch = i / 4, chunk = i % 4, h = v_slot_swizzle(ch, D);
    const uint4 w = *reinterpret_cast<const uint4*>(words + ch * 16 + 4 * (chunk ^ (h >> 2)));
    // Undo the swizzle's low two bits inside the 16-byte chunk: out word a = stored word a ^ (h & 3).
    const bool x1 = h & 1, x2 = h & 2;
    const uint32_t a0 = x1 ? w.y : w.x, a1 = x1 ? w.x : w.y, a2 = x1 ? w.w : w.z, a3 = x1 ? w.z : w.w;
    *reinterpret_cast<uint4*>(out + ch * j.n_pad + chunk * 16) =
        make_uint4(x2 ? a2 : a0, x2 ? a3 : a1, x2 ? a0 : a2, x2 ? a1 : a3);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) quantize_qkv_kernel(const QkvParams p) {
  extern __shared__ __align__(16) uint32_t qkv_smem[];
  int64_t cta = blockIdx.x;
  if (cta < p.ctas[0]) {
    int* amax = reinterpret_cast<int*>(qkv_smem);
    quantize_rows_job<T>(p.rows[0], cta, p.d, p.D, p.int4, amax,
                         reinterpret_cast<float*>(amax + p.rows[0].groups_per_block));
    return;
  }
  cta -= p.ctas[0];
  if (cta < p.ctas[1]) {
    int* amax = reinterpret_cast<int*>(qkv_smem);
    quantize_rows_job<T>(p.rows[1], cta, p.d, p.D, p.int4, amax,
                         reinterpret_cast<float*>(amax + p.rows[1].groups_per_block));
    return;
  }
  quantize_v_job<T>(p.v, cta - p.ctas[1], p.d, p.D, qkv_smem);
}

// ---------------------------------------------------------------------------------------
// Host helpers

bool vector_ok(const void* ptr, int d, int64_t sb, int64_t sh, int64_t sn) {
  return d % 8 == 0 && sb % 8 == 0 && sh % 8 == 0 && sn % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

int check_common(int64_t batch, int64_t heads, int64_t n, int64_t d, int64_t D) {
  SA2_REQUIRE(batch >= 1 && heads >= 1 && n >= 1, "empty input: batch %lld heads %lld tokens %lld",
              (long long)batch, (long long)heads, (long long)n);
  SA2_REQUIRE(batch <= 65535 && heads <= 65535 && n < (1ll << 31), "input too large");
  // Padded head dims are powers of two (64, 128, 256 in every family): a token is D / 8
  // consecutive threads of a 256-thread CTA.
  SA2_REQUIRE(d >= 1 && d <= D && D >= 64 && D <= 256 && (D & (D - 1)) == 0,
              "bad head dims d %lld D %lld (D must be 64, 128 or 256)", (long long)d, (long long)D);
  return 0;
}

#define SA2_DISPATCH_DTYPE(is_bf16, KERNEL, ...) \
  ((is_bf16) ? KERNEL<__nv_bfloat16> __VA_ARGS__ : KERNEL<__half> __VA_ARGS__)

// Raises a kernel's dynamic shared-memory limit once per device (and again only for a larger
// need): cudaFuncSetAttribute on every call costs host time for nothing. One flag table per
// kernel (the template parameter).
template <auto kKernel>
int raise_smem_limit(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static size_t raised[kMaxDevices] = {};
  int dev = 0;
  SA2_CUDA_TRY(cudaGetDevice(&dev));
  if (dev < kMaxDevices && raised[dev] >= bytes) return 0;
  SA2_CUDA_TRY(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (dev < kMaxDevices) raised[dev] = bytes;
  return 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// C entry points. Every argument struct has only 8-byte fields, mirrored by ctypes
// Structures in sageattn2/backends/mma.py (same order).

struct Sa2Input {
  const void* ptr;
  int64_t batch, heads, tokens, head_dim, stride_b, stride_h, stride_n, is_bf16;
};

struct Sa2ColumnStatsArgs {
  Sa2Input x;
  int64_t padded_head_dim;
  void* workspace;  // f32, at least sa2_column_stats_workspace_floats(...) of them
  int64_t workspace_floats;
  void* mean;       // f32 (B, H, D) or null (then fp8 scales are about mean 0)
  void* fp8_scale;  // f32 (B, H, D) or null
  void* fp8_inv;    // f32 (B, H, D) or null
  void* stream;
};

struct Sa2QuantizeRowsArgs {
  Sa2Input x;
  int64_t padded_head_dim, padded_tokens, block_rows, slice_rows, mod_groups, mod_div, int4;
  void* out;
  void* scale;
  const void* mean_given;  // f32 (B, H, D) or null
  int64_t mean_rows;       // > 0: Q smoothing
  void* mean_q;
  void* mean_q_scale;
  const void* dot_vec;     // f32 (B, dot_heads, D) or null
  int64_t dot_heads;
  void* dot_out;           // f32 (B, H, padded_tokens)
  void* stream;
};

struct Sa2QuantizeVFp8Args {
  Sa2Input x;
  int64_t padded_head_dim, padded_tokens;
  const void* mean;  // f32 (B, H, D) or null
  const void* inv;   // f32 (B, H, D)
  void* out;         // u8 (B, H, D, padded_tokens)
  void* stream;
};

struct Sa2SmoothV16Args {
  Sa2Input x;
  int64_t padded_head_dim;
  const void* mean;  // f32 (B, H, D) or null
  void* out;         // (B, H, tokens, D) contiguous, x's dtype
  void* stream;
};

SA2_EXPORT int64_t sa2_column_stats_workspace_floats(int64_t batch, int64_t heads, int64_t tokens,
                                                     int64_t padded_head_dim) {
  return batch * heads * sa2::ceil_div<int64_t>(tokens, kStatsChunkRows) * 3 * padded_head_dim;
}

SA2_EXPORT int sa2_column_stats(const Sa2ColumnStatsArgs* a) {
  SA2_REQUIRE(a != nullptr, "null arguments");
  if (int e = check_common(a->x.batch, a->x.heads, a->x.tokens, a->x.head_dim, a->padded_head_dim)) return e;
  const int64_t need = sa2_column_stats_workspace_floats(a->x.batch, a->x.heads, a->x.tokens, a->padded_head_dim);
  SA2_REQUIRE(a->workspace && a->workspace_floats >= need, "column stats workspace too small (%lld < %lld floats)",
              (long long)a->workspace_floats, (long long)need);
  const int chunks = static_cast<int>(sa2::ceil_div<int64_t>(a->x.tokens, kStatsChunkRows));
  const cudaStream_t stream = static_cast<cudaStream_t>(a->stream);
  StatsParams p{{a->x.ptr, a->x.stride_b, a->x.stride_h, a->x.stride_n},
                static_cast<int>(a->x.heads),
                static_cast<int>(a->x.tokens),
                static_cast<int>(a->x.head_dim),
                static_cast<int>(a->padded_head_dim),
                static_cast<float*>(a->workspace),
                chunks,
                vector_ok(a->x.ptr, static_cast<int>(a->x.head_dim), a->x.stride_b, a->x.stride_h, a->x.stride_n)};
  const dim3 grid(chunks, static_cast<unsigned>(a->x.heads), static_cast<unsigned>(a->x.batch));
  SA2_DISPATCH_DTYPE(a->x.is_bf16, column_stats_partial_kernel, <<<grid, kThreads, 0, stream>>>(p));
  SA2_LAUNCH_CHECK();
  StatsFinalizeParams f{p.partial, p.heads, p.n, p.d, p.D, chunks, static_cast<float*>(a->mean),
                        static_cast<float*>(a->fp8_scale), static_cast<float*>(a->fp8_inv)};
  column_stats_finalize_kernel<<<dim3(1, grid.y, grid.z), kThreads, 0, stream>>>(f);
  SA2_LAUNCH_CHECK();
  return 0;
}

SA2_EXPORT int sa2_quantize_rows(const Sa2QuantizeRowsArgs* a) {
  SA2_REQUIRE(a != nullptr, "null arguments");
  if (int e = check_common(a->x.batch, a->x.heads, a->x.tokens, a->x.head_dim, a->padded_head_dim)) return e;
  const int R = static_cast<int>(a->block_rows);
  // A row is D / 8 consecutive lanes reduced with shuffles: the 256 threads must cover the
  // block's rows in whole passes.
  const int64_t D = a->padded_head_dim;
  SA2_REQUIRE(R % (kThreads * 8 / D) == 0, "block_rows must be a multiple of %lld", (long long)(kThreads * 8 / D));
  SA2_REQUIRE(R >= 8 && R <= 256 && R % 8 == 0 && a->padded_tokens % R == 0 && a->padded_tokens >= a->x.tokens,
              "bad block_rows %d / padded_tokens %lld", R, (long long)a->padded_tokens);
  SA2_REQUIRE(a->slice_rows >= 8 && R % a->slice_rows == 0 && a->mod_groups >= 1 && a->mod_div >= 1,
              "bad group rule");
  SA2_REQUIRE(a->mean_rows == 0 || (R % a->mean_rows == 0 && a->padded_tokens % a->mean_rows == 0),
              "mean_rows %lld must divide block_rows %d", (long long)a->mean_rows, R);
  SA2_REQUIRE(!a->dot_vec || (a->dot_heads >= 1 && a->x.heads % a->dot_heads == 0 && a->dot_out),
              "dot_vec needs dot_heads dividing heads and dot_out");
  SA2_REQUIRE(a->out && a->scale, "null output");
  const GroupRule rule{static_cast<int>(a->slice_rows), static_cast<int>(a->mod_groups), static_cast<int>(a->mod_div)};
  RowsParams p{{a->x.ptr, a->x.stride_b, a->x.stride_h, a->x.stride_n},
               static_cast<int>(a->x.heads),
               static_cast<int>(a->x.tokens),
               static_cast<int>(a->x.head_dim),
               static_cast<int>(a->padded_head_dim),
               a->padded_tokens,
               R,
               rule,
               rule.groups_per_block(R),
               a->int4 != 0,
               static_cast<int8_t*>(a->out),
               static_cast<float*>(a->scale),
               static_cast<const float*>(a->mean_given),
               static_cast<int>(a->mean_rows),
               static_cast<int8_t*>(a->mean_q),
               static_cast<float*>(a->mean_q_scale),
               static_cast<const float*>(a->dot_vec),
               static_cast<int>(a->dot_heads),
               static_cast<float*>(a->dot_out),
               vector_ok(a->x.ptr, static_cast<int>(a->x.head_dim), a->x.stride_b, a->x.stride_h, a->x.stride_n)};
  const int mean_blocks = p.mean_rows > 0 ? R / p.mean_rows : 1;
  const size_t smem = 2 * static_cast<size_t>(R) * p.D + sizeof(float) * (mean_blocks * p.D + 2 * p.groups_per_block);
  const cudaStream_t stream = static_cast<cudaStream_t>(a->stream);
  const dim3 grid(static_cast<unsigned>(a->padded_tokens / R), static_cast<unsigned>(a->x.heads),
                  static_cast<unsigned>(a->x.batch));
  if (a->x.is_bf16) {
    if (int e = raise_smem_limit<quantize_rows_kernel<__nv_bfloat16>>(smem)) return e;
    quantize_rows_kernel<__nv_bfloat16><<<grid, kThreads, smem, stream>>>(p);
  } else {
    if (int e = raise_smem_limit<quantize_rows_kernel<__half>>(smem)) return e;
    quantize_rows_kernel<__half><<<grid, kThreads, smem, stream>>>(p);
  }
  SA2_LAUNCH_CHECK();
  return 0;
}

SA2_EXPORT int sa2_quantize_v_fp8(const Sa2QuantizeVFp8Args* a) {
  SA2_REQUIRE(a != nullptr, "null arguments");
  if (int e = check_common(a->x.batch, a->x.heads, a->x.tokens, a->x.head_dim, a->padded_head_dim)) return e;
  SA2_REQUIRE(a->padded_tokens % kVTileTokens == 0 && a->padded_tokens >= a->x.tokens,
              "padded_tokens %lld must be a multiple of %d covering the tokens", (long long)a->padded_tokens,
              kVTileTokens);
  SA2_REQUIRE(a->inv && a->out, "null V scale or output");
  VFp8Params p{{a->x.ptr, a->x.stride_b, a->x.stride_h, a->x.stride_n},
               static_cast<int>(a->x.heads),
               static_cast<int>(a->x.tokens),
               static_cast<int>(a->x.head_dim),
               static_cast<int>(a->padded_head_dim),
               a->padded_tokens,
               static_cast<const float*>(a->mean),
               static_cast<const float*>(a->inv),
               static_cast<uint8_t*>(a->out),
               vector_ok(a->x.ptr, static_cast<int>(a->x.head_dim), a->x.stride_b, a->x.stride_h, a->x.stride_n)};
  const dim3 grid(static_cast<unsigned>(a->padded_tokens / kVTileTokens), static_cast<unsigned>(a->x.heads),
                  static_cast<unsigned>(a->x.batch));
  const size_t smem = static_cast<size_t>(p.D) * kVTileTokens;
  SA2_DISPATCH_DTYPE(a->x.is_bf16, quantize_v_fp8_kernel,
                     <<<grid, kThreads, smem, static_cast<cudaStream_t>(a->stream)>>>(p));
  SA2_LAUNCH_CHECK();
  return 0;
}

SA2_EXPORT int sa2_smooth_v16(const Sa2SmoothV16Args* a) {
  SA2_REQUIRE(a != nullptr, "null arguments");
  if (int e = check_common(a->x.batch, a->x.heads, a->x.tokens, a->x.head_dim, a->padded_head_dim)) return e;
  SA2_REQUIRE(a->out && reinterpret_cast<uintptr_t>(a->out) % 16 == 0, "output must be 16-byte aligned");
  V16Params p{{a->x.ptr, a->x.stride_b, a->x.stride_h, a->x.stride_n},
              static_cast<int>(a->x.heads),
              static_cast<int>(a->x.tokens),
              static_cast<int>(a->x.head_dim),
              static_cast<int>(a->padded_head_dim),
              static_cast<const float*>(a->mean),
              a->out,
              vector_ok(a->x.ptr, static_cast<int>(a->x.head_dim), a->x.stride_b, a->x.stride_h, a->x.stride_n)};
  const int64_t vecs = a->x.tokens * (a->padded_head_dim / 8);
  const unsigned blocks_x = static_cast<unsigned>(std::min<int64_t>(sa2::ceil_div<int64_t>(vecs, kThreads), 1024));
  const dim3 grid(blocks_x, static_cast<unsigned>(a->x.heads), static_cast<unsigned>(a->x.batch));
  SA2_DISPATCH_DTYPE(a->x.is_bf16, smooth_v16_kernel, <<<grid, kThreads, 0, static_cast<cudaStream_t>(a->stream)>>>(p));
  SA2_LAUNCH_CHECK();
  return 0;
}

// One Q or K rows job of sa2_quantize_qkv (the groups as in Sa2QuantizeRowsArgs).
struct Sa2QkvRows {
  int64_t padded_tokens, block_rows, slice_rows, mod_groups, mod_div;
  void* out;    // int8 (B, H, padded_tokens, D or D/2)
  void* scale;  // f32 (B, H, padded_tokens / block_rows * groups per block)
};

struct Sa2QuantizeQkvArgs {
  Sa2Input q, k, v;  // same batch and dtype; k, v same heads and tokens; one head dim
  int64_t padded_head_dim, int4;
  Sa2QkvRows q_rows, k_rows;
  void* kbar;        // f32 (B, Hkv, D): K smoothing (the mean is written here and subtracted), or null
  void* q_dot_kbar;  // f32 (B, Hq, q padded_tokens): q . kbar for the lse, or null (needs kbar)
  void* vbar;        // f32 (B, Hkv, D): V mean (V smoothing), or null
  void* v_out;       // u8 (B, Hkv, D, v_padded_tokens) FP8 V^T, or null (V is not quantized here)
  int64_t v_padded_tokens;
  void* v_scale;     // f32 (B, Hkv, D), with v_out
  void* v_inv;       // f32 (B, Hkv, D), with v_out
  void* workspace;   // f32: sa2_column_stats_workspace_floats(B, Hkv, Nk, D) per reduced tensor
  int64_t workspace_floats;
  void* counters;    // u32 (2 * B * Hkv), zero on entry and left zero (one set per stream)
  int64_t counter_slots;
  void* stream;
};

namespace {

int rows_job(const Sa2Input& x, const Sa2QkvRows& r, int64_t D, int int4, RowsJob* job, int64_t* ctas) {
  const int64_t R = r.block_rows, rows_per_pass = kThreads * 8 / D;
  SA2_REQUIRE(R >= 8 && R <= 256 && R % rows_per_pass == 0 && R / rows_per_pass <= kMaxRowPasses &&
                  r.padded_tokens % R == 0 && r.padded_tokens >= x.tokens,
              "bad block_rows %lld / padded_tokens %lld for head dim %lld", (long long)R,
              (long long)r.padded_tokens, (long long)D);
  SA2_REQUIRE(r.slice_rows >= 8 && R % r.slice_rows == 0 && r.mod_groups >= 1 && r.mod_groups <= 8 &&
                  r.mod_div >= 1,
              "bad group rule");
  SA2_REQUIRE(r.out && r.scale, "null rows output");
  const GroupRule rule{static_cast<int>(r.slice_rows), static_cast<int>(r.mod_groups), static_cast<int>(r.mod_div)};
  *job = RowsJob{};
  job->x = {x.ptr, x.stride_b, x.stride_h, x.stride_n};
  job->heads = static_cast<int>(x.heads);
  job->n = static_cast<int>(x.tokens);
  job->block_rows = static_cast<int>(R);
  job->blocks_per_head = static_cast<int>(r.padded_tokens / R);
  job->groups_per_block = rule.groups_per_block(static_cast<int>(R));
  job->n_pad = r.padded_tokens;
  job->rule = rule;
  job->out = static_cast<int8_t*>(r.out);
  job->scale = static_cast<float*>(r.scale);
  job->vec = vector_ok(x.ptr, static_cast<int>(x.head_dim), x.stride_b, x.stride_h, x.stride_n);
  *ctas = x.batch * x.heads * job->blocks_per_head;
  (void)int4;
  return 0;
}

}  // namespace

// Quantizes Q and K (INT8/INT4 rows, no Q smoothing) and optionally V (FP8 V^T) in at most two
// launches: the K / V column statistics (k-bar, v-bar, FP8 V scales), then every quantizer CTA
// in one grid. Results equal sa2_column_stats + sa2_quantize_rows + sa2_quantize_v_fp8 bit for bit.
SA2_EXPORT int sa2_quantize_qkv(const Sa2QuantizeQkvArgs* a) {
  SA2_REQUIRE(a != nullptr, "null arguments");
  const Sa2Input &q = a->q, &k = a->k, &v = a->v;
  const int64_t D = a->padded_head_dim;
  for (const Sa2Input* x : {&q, &k, &v})
    if (int e = check_common(x->batch, x->heads, x->tokens, x->head_dim, D)) return e;
  SA2_REQUIRE(q.batch == k.batch && k.batch == v.batch && k.heads == v.heads && k.tokens == v.tokens &&
                  q.head_dim == k.head_dim && k.head_dim == v.head_dim && q.is_bf16 == k.is_bf16 &&
                  k.is_bf16 == v.is_bf16 && q.heads % k.heads == 0,
              "q, k, v shapes or dtypes disagree");
  SA2_REQUIRE(!a->q_dot_kbar || a->kbar, "q . kbar needs K smoothing");
  const int int4 = a->int4 != 0;
  QkvParams qp{};
  if (int e = rows_job(q, a->q_rows, D, int4, &qp.rows[0], &qp.ctas[0])) return e;
  if (int e = rows_job(k, a->k_rows, D, int4, &qp.rows[1], &qp.ctas[1])) return e;
  qp.d = static_cast<int>(q.head_dim);
  qp.D = static_cast<int>(D);
  qp.int4 = int4;
  qp.rows[0].dot_vec = static_cast<const float*>(a->q_dot_kbar ? a->kbar : nullptr);
  qp.rows[0].dot_heads = static_cast<int>(k.heads);
  qp.rows[0].dot_out = static_cast<float*>(a->q_dot_kbar);
  qp.rows[1].mean = static_cast<const float*>(a->kbar);
  if (a->v_out) {
    SA2_REQUIRE(a->v_padded_tokens % kVTileTokens == 0 && a->v_padded_tokens >= v.tokens,
                "v_padded_tokens %lld must be a multiple of %d covering the tokens", (long long)a->v_padded_tokens,
                kVTileTokens);
    SA2_REQUIRE(a->v_scale && a->v_inv, "null V scale");
    VJob& vj = qp.v;
    vj.x = {v.ptr, v.stride_b, v.stride_h, v.stride_n};
    vj.heads = static_cast<int>(v.heads);
    vj.n = static_cast<int>(v.tokens);
    vj.tiles_per_head = static_cast<int>(a->v_padded_tokens / kVTileTokens);
    vj.n_pad = a->v_padded_tokens;
    vj.mean = static_cast<const float*>(a->vbar);
    vj.inv = static_cast<const float*>(a->v_inv);
    vj.out = static_cast<uint8_t*>(a->v_out);
    vj.vec = vector_ok(v.ptr, static_cast<int>(v.head_dim), v.stride_b, v.stride_h, v.stride_n);
    qp.ctas[2] = v.batch * v.heads * vj.tiles_per_head;
  }
  const cudaStream_t stream = static_cast<cudaStream_t>(a->stream);

  // 1. Column statistics of K (k-bar) and V (v-bar, FP8 scales), one grid, finalized in place.
  FusedStatsParams sp{};
  int jobs = 0;
  if (a->kbar) {
    sp.job[jobs] = StatsJob{{k.ptr, k.stride_b, k.stride_h, k.stride_n}, nullptr, static_cast<float*>(a->kbar),
                            nullptr, nullptr, nullptr};
    sp.vec[jobs++] = vector_ok(k.ptr, static_cast<int>(k.head_dim), k.stride_b, k.stride_h, k.stride_n);
  }
  if (a->vbar || a->v_out) {
    sp.job[jobs] = StatsJob{{v.ptr, v.stride_b, v.stride_h, v.stride_n}, nullptr, static_cast<float*>(a->vbar),
                            static_cast<float*>(a->v_out ? a->v_scale : nullptr),
                            static_cast<float*>(a->v_out ? a->v_inv : nullptr), nullptr};
    sp.vec[jobs++] = vector_ok(v.ptr, static_cast<int>(v.head_dim), v.stride_b, v.stride_h, v.stride_n);
  }
  if (jobs > 0) {
    const int64_t per_job = sa2_column_stats_workspace_floats(k.batch, k.heads, k.tokens, D);
    const int64_t slots = k.batch * k.heads;
    SA2_REQUIRE(a->workspace && a->workspace_floats >= jobs * per_job,
                "quantize_qkv workspace too small (%lld < %lld floats)", (long long)a->workspace_floats,
                (long long)(jobs * per_job));
    SA2_REQUIRE(a->counters && a->counter_slots >= jobs * slots, "quantize_qkv counters too small");
    sp.heads = static_cast<int>(k.heads);
    sp.n = static_cast<int>(k.tokens);
    sp.d = static_cast<int>(k.head_dim);
    sp.D = static_cast<int>(D);
    sp.chunks = static_cast<int>(sa2::ceil_div<int64_t>(k.tokens, kStatsChunkRows));
    for (int i = 0; i < jobs; ++i) {
      sp.job[i].partial = static_cast<float*>(a->workspace) + i * per_job;
      sp.job[i].counter = static_cast<unsigned*>(a->counters) + i * slots;
    }
    const dim3 grid(static_cast<unsigned>(sp.chunks * jobs), static_cast<unsigned>(k.heads),
                    static_cast<unsigned>(k.batch));
    SA2_DISPATCH_DTYPE(q.is_bf16, column_stats_fused_kernel, <<<grid, kThreads, 0, stream>>>(sp));
    SA2_LAUNCH_CHECK();
  }

  // 2. Every quantizer CTA in one grid: Q rows, K rows, V^T tiles.
  const int64_t ctas = qp.ctas[0] + qp.ctas[1] + qp.ctas[2];
  SA2_REQUIRE(ctas < (int64_t(1) << 31), "input too large for one grid");
  const size_t smem = std::max<size_t>(a->v_out ? static_cast<size_t>(D) * kVTileTokens : 0,
                                       2 * sizeof(float) * std::max(qp.rows[0].groups_per_block,
                                                                    qp.rows[1].groups_per_block));
  SA2_REQUIRE(smem <= 48 * 1024, "quantize_qkv needs %zu bytes of shared memory", smem);
  SA2_DISPATCH_DTYPE(q.is_bf16, quantize_qkv_kernel,
                     <<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(qp));
  SA2_LAUNCH_CHECK();
  return 0;
}
