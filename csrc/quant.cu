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
    SA2_CUDA_TRY(cudaFuncSetAttribute(quantize_rows_kernel<__nv_bfloat16>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    quantize_rows_kernel<__nv_bfloat16><<<grid, kThreads, smem, stream>>>(p);
  } else {
    SA2_CUDA_TRY(cudaFuncSetAttribute(quantize_rows_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
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
