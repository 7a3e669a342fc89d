// SA2_FAMILIES: all
// Quantizers for Q, K and V (docs/numerics.md §1), shared by every kernel family.
//
//   sa2_quantize_qkv  Q and K -> INT8/INT4 rows with group absmax scales (K minus its mean;
//                     Q optionally minus the mean of each q_mean_rows block, whose q-bar is
//                     quantized to INT8 too; optionally q_row . kbar for the lse), and V ->
//                     FP8 E4M3 V^T (B, H, D, N_pad) in quant::v_stored_position order. The
//                     per-channel K / V statistics (k-bar, v-bar, FP8 V scales) need every
//                     token first, so this is two launches (one when nothing needs them).
//   sa2_smooth_v16    V - vbar rounded to V's dtype, (B, H, N, D) contiguous and zero-padded
//                     (FP16 PV with V smoothing, or a V whose rows are not 16-byte aligned).
// Inputs: fp16/bf16 (B, H, N, d) through batch/head/token strides in elements (the last dim
// contiguous), so HND and NHD both arrive without a copy. Offsets are 64-bit.
//
// Speed: the quantizer only moves bytes (~2 B read, ~1 B written per element), so every CTA
// stages its whole input block in shared memory with 16-byte cp.async and computes from there.
// Registers stay low and the many CTAs resident per SM keep enough loads in flight to run
// near HBM bandwidth; a CTA's serial phases (load, absmax, scales, quantize) overlap with the
// other CTAs' loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <initializer_list>

#include "sa2/common.cuh"
#include "sa2/quant.cuh"

namespace {

using sa2::quant::GroupRule;
using sa2::quant::GroupScale;

constexpr int kThreads = 256;
// Tokens per statistics partial: fixes the summation order of the means (workspace size too).
constexpr int kStatsChunkRows = 256;
// Shared memory a statistics CTA stages one piece of its chunk in (its partials reuse it).
constexpr int kStatsStageBytes = 32 * 1024;
// Tokens per FP8 V^T CTA (the V^T token padding is a multiple of it).
constexpr int kVTileTokens = 64;

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

  template <class T>
  __device__ const T* head(int64_t bh, int heads) const {
    return static_cast<const T*>(ptr) + (bh / heads) * stride_b + (bh % heads) * stride_h;
  }
};

// Eight 16-bit values of one token (channels >= d read as 0), kept packed in T. `vec` says the
// 16-byte load is legal (d % 8 == 0, strides % 8 == 0, 16-byte aligned base).
template <class T>
__device__ __forceinline__ uint4 load_raw8(const T* row, int c, int d, bool vec) {
  if (vec && c + 8 <= d) return *reinterpret_cast<const uint4*>(row + c);
  alignas(16) T e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = c + i < d ? row[c + i] : from_float<T>(0.0f);
  return *reinterpret_cast<const uint4*>(e);
}

// The two 16-bit values of a word (element 0 in the low half) as floats, exactly. Bit
// operations on whole words: reading a uint4 through a T* makes the compiler split a 16-byte
// load into eight 2-byte ones.
template <class T>
__device__ __forceinline__ float2 word_to_float2(uint32_t w);
template <>
__device__ __forceinline__ float2 word_to_float2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 word_to_float2<__half>(uint32_t w) {
  return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu))),
                     __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
}

template <class T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&v)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = word_to_float2<T>(w[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

// Eight 16-bit values from 16-byte aligned shared memory, as floats.
template <class T>
__device__ __forceinline__ void read8(const T* src, float (&v)[8]) {
  unpack8<T>(*reinterpret_cast<const uint4*>(src), v);
}

// Eight floats from 16-byte aligned shared memory.
__device__ __forceinline__ void read8(const float* src, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// 16-byte global -> shared copy that bypasses L1 (every byte is read once); `fill` false
// writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(fill ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Stages tokens [first, first + rows) of one head into `tile` (rows x D, T): tokens >= n and
// channels >= d become 0. 16-byte cp.async when `vec` (one group, committed; the caller waits),
// else plain loads (d % 8 != 0 or unaligned rows: rare).
template <class T, int D>
__device__ __forceinline__ void stage_rows(T* tile, const T* head, int64_t stride_n, int first, int rows, int n,
                                           int d, bool vec) {
  constexpr unsigned kVecs = D / 8;
  const unsigned total = static_cast<unsigned>(rows) * kVecs;
  if (vec) {
    for (unsigned i = threadIdx.x; i < total; i += kThreads) {
      const int r = static_cast<int>(i / kVecs), c = static_cast<int>(i % kVecs) * 8;
      const bool real = first + r < n && c < d;
      cp_async16(tile + r * D + c, real ? head + (first + r) * stride_n + c : head, real);
    }
    cp_async_commit();
  } else {
    for (unsigned i = threadIdx.x; i < total; i += kThreads) {
      const int r = static_cast<int>(i / kVecs), c = static_cast<int>(i % kVecs) * 8;
      *reinterpret_cast<uint4*>(tile + r * D + c) =
          first + r < n ? load_raw8(head + (first + r) * stride_n, c, d, false) : make_uint4(0, 0, 0, 0);
    }
  }
}

// One 8-byte global store (a plain uint2 store gets split in two when the compiler merges it
// with the INT4 path's 4-byte store).
__device__ __forceinline__ void store_8bytes(void* dst, uint32_t lo, uint32_t hi) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};\n" ::"l"(dst), "r"(lo), "r"(hi) : "memory");
}

// Four INT8 codes -> one word, channel k in byte k.
__device__ __forceinline__ uint32_t pack_int8x4(int a, int b, int c, int d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// ---------------------------------------------------------------------------------------
// Jobs. One kernel runs every kind of CTA; the CTA index picks the job (see Segment).

// Column statistics of K or V: per (batch, head, channel) the sum, max and min over all tokens,
// as partials of kStatsChunkRows tokens; the last CTA of each (tensor, batch, head) finalizes
// the mean and max|x - mean| / 448 (ticket counter, reset to 0 by that CTA). Deterministic:
// a thread sums its tokens in order, the phases of a chunk and then the chunks are added in
// index order.
struct StatsJob {
  StridedInput x;
  float* partial;     // (B, H, chunks, 3, D)
  float* mean;        // (B, H, D) or null
  float* fp8_scale;   // (B, H, D) or null: max|x - mean| / fp8_max (mean = 0 if `mean` is null)
  float* fp8_inv;     // (B, H, D) or null: fp8_max / max|x - mean|
  unsigned* counter;  // (B * H) tickets, 0 between calls
  int vec;
  float fp8_max;      // largest |V_hat|: 448, or 2 for an fp16 P.V accumulator (numerics.md §1.5)
};

struct StatsParams {
  StatsJob job[2];
  int jobs, heads, n, chunks;
};

// Thread -> (8-channel vector, token phase): D / 8 vectors per token, 2048 / D phases; phase p
// sums the chunk's tokens p, p + phases, ... The chunk arrives in stages of kStatsStageBytes.
template <class T, int D>
__device__ __forceinline__ void stats_job(const StatsParams& p, int which, int chunk, int64_t bh, int d,
                                          uint8_t* smem) {
  constexpr int kVecs = D / 8, kPhases = kThreads / kVecs, kStageTokens = kStatsStageBytes / (2 * D);
  static_assert(kStageTokens % kPhases == 0 && kStatsChunkRows % kStageTokens == 0, "stage / phase mismatch");
  static_assert(3 * kThreads * 8 * sizeof(float) <= kStatsStageBytes, "partials must fit the stage");
  const StatsJob& job = p.job[which];
  const T* head = job.x.head<T>(bh, p.heads);
  const int t0 = chunk * kStatsChunkRows, t1 = min(p.n, t0 + kStatsChunkRows);
  const int c = (threadIdx.x % kVecs) * 8, phase = threadIdx.x / kVecs;
  T* stage = reinterpret_cast<T*>(smem);
  float sum[8], mx[8], mn[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) sum[k] = 0.0f, mx[k] = -INFINITY, mn[k] = INFINITY;
  for (int s0 = t0; s0 < t1; s0 += kStageTokens) {
    const int rows = min(kStageTokens, t1 - s0);
    stage_rows<T, D>(stage, head, job.x.stride_n, s0, rows, p.n, d, job.vec != 0);
    cp_async_wait_all();
    __syncthreads();
#pragma unroll 1
    for (int r = phase; r < rows; r += kPhases) {
      float v[8];
      read8(stage + r * D + c, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        sum[k] += v[k];
        mx[k] = fmaxf(mx[k], v[k]);
        mn[k] = fminf(mn[k], v[k]);
      }
    }
    __syncthreads();  // the stage is refilled (or becomes the partials)
  }
  float* part = reinterpret_cast<float*>(smem);  // [3][phases * D]
  constexpr int kPart = kThreads * 8;
  for (int h = 0; h < 2; ++h) {
    const int at = phase * D + c + 4 * h;
    *reinterpret_cast<float4*>(part + at) = make_float4(sum[4 * h], sum[4 * h + 1], sum[4 * h + 2], sum[4 * h + 3]);
    *reinterpret_cast<float4*>(part + kPart + at) = make_float4(mx[4 * h], mx[4 * h + 1], mx[4 * h + 2], mx[4 * h + 3]);
    *reinterpret_cast<float4*>(part + 2 * kPart + at) =
        make_float4(mn[4 * h], mn[4 * h + 1], mn[4 * h + 2], mn[4 * h + 3]);
  }
  __syncthreads();
  float* out = job.partial + (bh * p.chunks + chunk) * 3 * D;
  for (int ch = threadIdx.x; ch < D; ch += kThreads) {
    float s = 0.0f, hi = -INFINITY, lo = INFINITY;
    for (int ph = 0; ph < kPhases; ++ph) {
      s += part[ph * D + ch];
      hi = fmaxf(hi, part[kPart + ph * D + ch]);
      lo = fminf(lo, part[2 * kPart + ph * D + ch]);
    }
    out[ch] = s;
    out[D + ch] = hi;
    out[2 * D + ch] = lo;
  }
  // Publish this partial, then take a ticket; the CTA that draws the last one finalizes.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&job.counter[bh], 1u) == static_cast<unsigned>(p.chunks - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* partial = job.partial + bh * p.chunks * 3 * D;
  for (int ch = threadIdx.x; ch < D; ch += kThreads) {
    float s = 0.0f, hi = -INFINITY, lo = INFINITY;
    if (ch < d) {
#pragma unroll 4
      for (int k = 0; k < p.chunks; ++k) {  // chunk order
        const float* pk = partial + k * 3 * D;
        s += __ldcg(pk + ch);
        hi = fmaxf(hi, __ldcg(pk + D + ch));
        lo = fminf(lo, __ldcg(pk + 2 * D + ch));
      }
    } else {
      hi = lo = 0.0f;  // padding channels are zero
    }
    const float mean = job.mean && ch < d ? s / static_cast<float>(p.n) : 0.0f;
    if (job.mean) job.mean[bh * D + ch] = mean;
    if (job.fp8_scale) {
      // max_t |x_t - mean| = max(max x - mean, mean - min x) exactly: rounding is monotone.
      const float amax = fmaxf(__fsub_rn(hi, mean), __fsub_rn(mean, lo));
      const GroupScale g = sa2::quant::group_scale(amax, job.fp8_max);
      job.fp8_scale[bh * D + ch] = g.scale;
      if (job.fp8_inv) job.fp8_inv[bh * D + ch] = g.inv;
    }
  }
  if (threadIdx.x == 0) job.counter[bh] = 0;  // ready for the next call on this stream
}

// Q or K rows: one CTA quantizes a block of block_rows rows of one head.
struct RowsJob {
  StridedInput x;
  int heads, n, block_rows, blocks_per_head, groups_per_block;
  int64_t n_pad;
  GroupRule rule;
  int8_t* out;           // (B, H, n_pad, D or D/2)
  float* scale;          // (B, H, blocks_per_head * groups_per_block)
  const float* mean;     // (B, H, D) or null: subtracted (K smoothing)
  int mean_shift;        // Q smoothing: rows share a q-bar in blocks of 1 << mean_shift; 0: off
  int8_t* qbar;          // (B, H, n_pad >> mean_shift, D): q-bar quantized to INT8
  float* qbar_scale;     // (B, H, n_pad >> mean_shift)
  const float* dot_vec;  // (B, dot_heads, D) or null: writes dot_out = x_row . dot_vec
  int dot_heads;
  float* dot_out;        // (B, H, n_pad)
  int vec;
};

// Shared memory of a rows CTA: the raw block, the means it subtracts, dot_vec, group absmax
// and group inverse scales.
inline size_t rows_smem_bytes(int R, int D, int mean_blocks, int groups) {
  return 2 * static_cast<size_t>(R) * D + sizeof(float) * (static_cast<size_t>(mean_blocks + 1) * D + 2 * groups);
}

// Thread -> (row phase, 8-channel vector): rows r = rsub + s * rows_per_pass. A row is D / 8
// consecutive lanes, reduced with shuffles.
template <class T, int D>
__device__ __forceinline__ void rows_job(const RowsJob& j, int64_t bh, int blk, int d, int int4, uint8_t* smem) {
  constexpr int kVecs = D / 8, kRowsPerPass = kThreads / kVecs;
  const int R = j.block_rows, row0 = blk * R, rows_real = max(0, min(R, j.n - row0));
  const int mean_rows = j.mean_shift ? 1 << j.mean_shift : R;
  const int mean_blocks = R / mean_rows;
  // Row r uses mean row r >> shift: the given K mean (or zeros) is one row for the block.
  const int shift = j.mean_shift ? j.mean_shift : 30;
  T* tile = reinterpret_cast<T*>(smem);                          // R x D
  float* mean = reinterpret_cast<float*>(tile + R * D);          // mean_blocks x D
  float* dot_vec = mean + mean_blocks * D;                       // D
  int* group_amax = reinterpret_cast<int*>(dot_vec + D);         // groups_per_block
  float* group_inv = reinterpret_cast<float*>(group_amax + j.groups_per_block);
  const T* head = j.x.head<T>(bh, j.heads);
  const bool dot = j.dot_vec != nullptr;

  stage_rows<T, D>(tile, head, j.x.stride_n, row0, R, j.n, d, j.vec != 0);
  // Group absmax as int bits: for non-negative floats the int order is the float order, so
  // rows fold into their group with one shared-memory atomicMax.
  for (int gi = threadIdx.x; gi < j.groups_per_block; gi += kThreads) group_amax[gi] = 0;
  if (!j.mean_shift)
    for (int c = threadIdx.x; c < D; c += kThreads) mean[c] = j.mean ? __ldg(j.mean + bh * D + c) : 0.0f;
  if (dot) {
    const float* src = j.dot_vec + ((bh / j.heads) * j.dot_heads + (bh % j.heads) / (j.heads / j.dot_heads)) * D;
    for (int c = threadIdx.x; c < D; c += kThreads) dot_vec[c] = __ldg(src + c);
  }
  cp_async_wait_all();
  __syncthreads();

  // Q smoothing: the mean of each q_mean_rows block over its real rows, summed in row order.
  if (j.mean_shift) {
    for (int i = threadIdx.x; i < mean_blocks * D; i += kThreads) {
      const int c = i % D, r0 = (i / D) * mean_rows, r1 = min(r0 + mean_rows, rows_real);
      float sum = 0.0f;
      for (int r = r0; r < r1; ++r) sum += to_float(tile[r * D + c]);
      mean[i] = r1 > r0 ? sum / static_cast<float>(r1 - r0) : 0.0f;
    }
    __syncthreads();
  }

  // Row absmax of x - mean (and x . dot_vec of the raw row).
  const int c = (threadIdx.x % kVecs) * 8, rsub = threadIdx.x / kVecs, passes = R / kRowsPerPass;
  for (int s = 0; s < passes; ++s) {
    const int r = rsub + s * kRowsPerPass;
    float x[8], m[8];
    read8(tile + r * D + c, x);
    read8(mean + (r >> shift) * D + c, m);
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(__fsub_rn(x[k], m[k])));
#pragma unroll
    for (int off = kVecs / 2; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    float dsum = 0.0f;
    if (dot) {
      float dv[8];
      read8(dot_vec + c, dv);
#pragma unroll
      for (int k = 0; k < 8; ++k) dsum = fmaf(x[k], dv[k], dsum);
#pragma unroll
      for (int off = kVecs / 2; off > 0; off /= 2) dsum += __shfl_xor_sync(0xffffffffu, dsum, off);
    }
    if (threadIdx.x % kVecs == 0) {
      if (r < rows_real) atomicMax(&group_amax[j.rule.local_group(r)], __float_as_int(amax));
      if (dot) j.dot_out[bh * j.n_pad + row0 + r] = r < rows_real ? dsum : 0.0f;
    }
  }
  __syncthreads();

  // Group scales; q-bar (INT8, one scale per mean block).
  const float qmax = int4 ? sa2::quant::kInt4Max : sa2::quant::kInt8Max;
  const int64_t groups_per_head = static_cast<int64_t>(j.blocks_per_head) * j.groups_per_block;
  for (int gi = threadIdx.x; gi < j.groups_per_block; gi += kThreads) {
    const GroupScale g = sa2::quant::group_scale(__int_as_float(group_amax[gi]), qmax);
    group_inv[gi] = g.inv;
    j.scale[bh * groups_per_head + static_cast<int64_t>(blk) * j.groups_per_block + gi] = g.scale;
  }
  if (j.mean_shift) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t blocks_per_head = j.n_pad >> j.mean_shift;
    for (int b = warp; b < mean_blocks; b += kThreads / 32) {
      float amax = 0.0f;
      for (int ch = lane; ch < D; ch += 32) amax = fmaxf(amax, fabsf(mean[b * D + ch]));
      for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      const GroupScale g = sa2::quant::group_scale(amax, sa2::quant::kInt8Max);
      const int64_t gb = bh * blocks_per_head + static_cast<int64_t>(blk) * mean_blocks + b;
      for (int ch = lane; ch < D; ch += 32)
        j.qbar[gb * D + ch] = static_cast<int8_t>(sa2::quant::quantize_int(mean[b * D + ch], g.inv));
      if (lane == 0) j.qbar_scale[gb] = g.scale;
    }
  }
  __syncthreads();

  // Quantize and store: 8 channels -> 8 bytes (INT8) or 4 bytes (INT4). Rows past n get
  // inverse scale 0, i.e. code 0.
  const int row_bytes = int4 ? D / 2 : D;
  int8_t* out = j.out + (bh * j.n_pad + row0) * row_bytes;
  for (int s = 0; s < passes; ++s) {
    const int r = rsub + s * kRowsPerPass;
    const float inv = r < rows_real ? group_inv[j.rule.local_group(r)] : 0.0f;
    float x[8], m[8];
    read8(tile + r * D + c, x);
    read8(mean + (r >> shift) * D + c, m);
    int q[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) q[k] = sa2::quant::quantize_int(__fsub_rn(x[k], m[k]), inv);
    if (int4) {
      uint32_t w = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) w |= sa2::quant::pack_int4_pair(q[2 * k], q[2 * k + 1]) << (8 * k);
      *reinterpret_cast<uint32_t*>(out + r * row_bytes + c / 2) = w;
    } else {
      store_8bytes(out + r * row_bytes + c, pack_int8x4(q[0], q[1], q[2], q[3]), pack_int8x4(q[4], q[5], q[6], q[7]));
    }
  }
}

// FP8 V^T: one CTA converts kVTileTokens tokens of one head.
struct VJob {
  StridedInput x;
  int heads, n, tiles_per_head;
  int64_t n_pad;
  const float* mean;  // (B, H, D) or null
  const float* inv;   // (B, H, D): 448 / max|V - mean|
  uint8_t* out;       // (B, H, D, n_pad)
  int vec;
};

// Word slot of stored quad `quad` (bytes 4q..4q+3 of a 64-key row) in channel row `ch` of
// the V^T staging tile: XOR-swizzled so that the 32 lanes of a warp write 32 different banks
// (lanes differ in channel vector; odd vectors also write their channels in k ^ 1 order, so
// the two bank halves, i.e. even and odd channel rows, are both used).
template <int D>
__device__ __forceinline__ int v_slot_swizzle(int ch) { return ((ch >> 4) * (256 / D)) & 15; }

// Thread -> (quad, 8-channel vector): a quad is the 4 keys that land in one 32-bit word of the
// stored order (keys 2a, 2a+1, 2a+8, 2a+9 of a 16-key group, quant::v_stored_position), so the
// transpose writes whole words. The raw tile is converted to registers, then the same shared
// memory holds the transposed bytes.
template <class T, int D>
__device__ __forceinline__ void v_job(const VJob& j, int64_t bh, int tile, int d, uint8_t* smem) {
  constexpr int kVecs = D / 8, kItems = (kVTileTokens / 4) * kVecs;
  constexpr int kPerThread = (kItems + kThreads - 1) / kThreads;
  static_assert(kThreads % kVecs == 0, "a thread keeps one channel vector");
  const int tok0 = tile * kVTileTokens;
  T* raw = reinterpret_cast<T*>(smem);                // kVTileTokens x D
  uint32_t* words = reinterpret_cast<uint32_t*>(smem);  // D x 16 words, after the raw tile is read
  float* mean = reinterpret_cast<float*>(raw + kVTileTokens * D);  // D
  float* inv = mean + D;                                           // D
  stage_rows<T, D>(raw, j.x.head<T>(bh, j.heads), j.x.stride_n, tok0, kVTileTokens, j.n, d, j.vec != 0);
  for (int ch = threadIdx.x; ch < D; ch += kThreads) {
    mean[ch] = j.mean ? __ldg(j.mean + bh * D + ch) : 0.0f;
    inv[ch] = __ldg(j.inv + bh * D + ch);
  }
  const int cv = threadIdx.x % kVecs, c = cv * 8;
  cp_async_wait_all();
  __syncthreads();

  uint32_t packed[kPerThread][8];  // per item and channel: the quad's 4 bytes
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    const int i = threadIdx.x + it * kThreads;
    if (i >= kItems) break;
    const int quad = i / kVecs, key0 = (quad / 4) * 16 + 2 * (quad % 4);
    // Bytes 0..3 of a word: keys key0, key0 + 1, key0 + 8, key0 + 9; padding tokens are 0.
    // Two keys at a time (e4m3x2 conversions): the low then the high half of each word.
#pragma unroll
    for (int k = 0; k < 8; ++k) packed[it][k] = 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key0 + 8 * half;
      float x0[8], x1[8];
      read8(raw + key * D + c, x0);
      read8(raw + (key + 1) * D + c, x1);
      const uint32_t mask = (tok0 + key < j.n ? 0xFFu : 0u) | (tok0 + key + 1 < j.n ? 0xFF00u : 0u);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float mk = mean[c + k], ik = inv[c + k];
        const float2 f = make_float2(__fmul_rn(j.mean ? __fsub_rn(x0[k], mk) : x0[k], ik),
                                     __fmul_rn(j.mean ? __fsub_rn(x1[k], mk) : x1[k], ik));
        const uint32_t pair = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3) & mask;
        packed[it][k] |= c + k < d ? pair << (16 * half) : 0u;
      }
    }
  }
  __syncthreads();  // every thread has read the raw tile
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    const int i = threadIdx.x + it * kThreads;
    if (i < kItems) {
      const int quad = i / kVecs;
      const bool odd = cv & 1;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int ch = c + (k ^ static_cast<int>(odd));
        words[ch * 16 + (quad ^ v_slot_swizzle<D>(ch))] = odd ? packed[it][k ^ 1] : packed[it][k];
      }
    }
  }
  __syncthreads();
  uint8_t* out = j.out + bh * D * j.n_pad + tok0;
  for (int i = threadIdx.x; i < D * 4; i += kThreads) {
    const int ch = i / 4, chunk = i % 4, h = v_slot_swizzle<D>(ch);
    const uint4 w = *reinterpret_cast<const uint4*>(words + ch * 16 + 4 * (chunk ^ (h >> 2)));
    // Undo the swizzle's low two bits inside the 16-byte chunk: out word a = stored word a ^ (h & 3).
    const bool x1 = h & 1, x2 = h & 2;
    const uint32_t a0 = x1 ? w.y : w.x, a1 = x1 ? w.x : w.y, a2 = x1 ? w.w : w.z, a3 = x1 ? w.z : w.w;
    *reinterpret_cast<uint4*>(out + ch * j.n_pad + chunk * 16) =
        make_uint4(x2 ? a2 : a0, x2 ? a3 : a1, x2 ? a0 : a2, x2 ? a1 : a3);
  }
}

// A launch is a list of segments, each a run of CTAs of one kind:
//   kStats  CTA = ((batch * H + head) * jobs + job) * chunks + chunk
//   kQ      CTA = (batch * Hq + head) * blocks + block
//   kKV     the K rows blocks and V^T tiles of one kv head together, heads in descending order:
//           the statistics launch just read them in ascending order, so the heads it read
//           last are read again first, while they are likely still in L2.
enum SegmentKind { kStats = 0, kQ = 1, kKV = 2 };

struct Segment {
  int kind;
  int64_t ctas;
};

struct QkvParams {
  StatsParams stats;
  RowsJob rows[2];   // Q, K
  VJob v;            // tiles_per_head 0: V is not quantized here
  int64_t kv_heads;  // B * Hkv
  int d, int4, segments;
  Segment segment[2];
};

// CTAs per SM that shared memory allows (about 33 KB each): the register budget follows.
// Hopper: 6 (40 registers), but a V CTA at D = 256 converts two items per thread and needs 48.
template <int D, int kKinds>
constexpr int min_ctas_per_sm() {
#if SA2_ARCH == 90
  return D == 256 && (kKinds & (1 << kKV)) ? 5 : 6;
#elif SA2_ARCH == 80 || SA2_ARCH == 87
  return 4;
#else
  return 2;  // ~100 KB of shared memory per SM
#endif
}

// kKinds: bit mask of the segment kinds this instantiation runs (each kind's registers only
// where a launch needs it).
template <class T, int D, int kKinds>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<D, kKinds>()) quantize_qkv_kernel(const QkvParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  int64_t cta = blockIdx.x;
  for (int s = 0; s < p.segments; ++s) {
    const Segment seg = p.segment[s];
    if (cta >= seg.ctas) {
      cta -= seg.ctas;
      continue;
    }
    if ((kKinds & (1 << kStats)) && seg.kind == kStats) {
      const int chunk = static_cast<int>(cta % p.stats.chunks);
      const int64_t rest = cta / p.stats.chunks;
      stats_job<T, D>(p.stats, static_cast<int>(rest % p.stats.jobs), chunk, rest / p.stats.jobs, p.d, smem);
    } else if ((kKinds & (1 << kQ)) && seg.kind == kQ) {
      const RowsJob& q = p.rows[0];
      rows_job<T, D>(q, cta / q.blocks_per_head, static_cast<int>(cta % q.blocks_per_head), p.d, p.int4, smem);
    } else if (kKinds & (1 << kKV)) {
      const int k_blocks = p.rows[1].blocks_per_head, per_head = k_blocks + p.v.tiles_per_head;
      const int64_t bh = p.kv_heads - 1 - cta / per_head;
      const int w = static_cast<int>(cta % per_head);
      if (w < k_blocks) {
        rows_job<T, D>(p.rows[1], bh, w, p.d, p.int4, smem);
      } else {
        v_job<T, D>(p.v, bh, w - k_blocks, p.d, smem);
      }
    }
    return;
  }
}

// ---------------------------------------------------------------------------------------
// V for 16-bit PV

struct V16Params {
  StridedInput x;
  int heads, n, d, D;
  const float* mean;  // (B, H, D) or null (plain zero-padded copy)
  void* out;          // (B, H, n, D) contiguous, x's dtype
  int vec;
};

template <class T>
__global__ void __launch_bounds__(kThreads) smooth_v16_kernel(const V16Params p) {
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  const T* head = p.x.head<T>(bh, p.heads);
  const float* mean = p.mean ? p.mean + bh * p.D : nullptr;
  T* out = static_cast<T*>(p.out) + bh * p.n * p.D;
  const int vecs_per_row = p.D / 8;
  const int64_t total = static_cast<int64_t>(p.n) * vecs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t tok = i / vecs_per_row;
    const int c = static_cast<int>(i % vecs_per_row) * 8;
    float v[8];
    unpack8<T>(load_raw8(head + tok * p.x.stride_n, c, p.d, p.vec != 0), v);
    alignas(16) T r[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) r[k] = from_float<T>(c + k < p.d && mean ? __fsub_rn(v[k], mean[c + k]) : v[k]);
    *reinterpret_cast<uint4*>(out + tok * p.D + c) = *reinterpret_cast<const uint4*>(r);
  }
}

// ---------------------------------------------------------------------------------------
// Host helpers

bool vector_ok(const void* ptr, int64_t d, int64_t sb, int64_t sh, int64_t sn) {
  return d % 8 == 0 && sb % 8 == 0 && sh % 8 == 0 && sn % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

bool power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

int log2_exact(int64_t x) {
  int s = 0;
  while ((int64_t(1) << s) < x) ++s;
  return s;
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
  if (bytes <= 48 * 1024) return 0;
  int dev = 0;
  SA2_CUDA_TRY(cudaGetDevice(&dev));
  if (dev < kMaxDevices && raised[dev] >= bytes) return 0;
  SA2_CUDA_TRY(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (dev < kMaxDevices) raised[dev] = bytes;
  return 0;
}

// The segment mixes sa2_quantize_qkv launches: Q + statistics, statistics alone, K / V (+ Q).
constexpr int kQStats = (1 << kQ) | (1 << kStats), kStatsOnly = 1 << kStats, kKVQ = (1 << kKV) | (1 << kQ);

template <class T, int D, int kKinds>
int launch_qkv(const QkvParams& p, size_t smem, cudaStream_t stream) {
  int64_t ctas = 0;
  for (int s = 0; s < p.segments; ++s) ctas += p.segment[s].ctas;
  if (ctas == 0) return 0;
  SA2_REQUIRE(ctas < (int64_t(1) << 31), "input too large for one grid");
  if (int e = raise_smem_limit<quantize_qkv_kernel<T, D, kKinds>>(smem)) return e;
  quantize_qkv_kernel<T, D, kKinds><<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(p);
  SA2_LAUNCH_CHECK();
  return 0;
}

template <class T, int D>
int launch_qkv(const QkvParams& p, size_t smem, cudaStream_t stream) {
  int kinds = 0;
  for (int s = 0; s < p.segments; ++s) kinds |= 1 << p.segment[s].kind;
  if (kinds == kStatsOnly) return launch_qkv<T, D, kStatsOnly>(p, smem, stream);
  if (kinds & (1 << kStats)) return launch_qkv<T, D, kQStats>(p, smem, stream);
  return launch_qkv<T, D, kKVQ>(p, smem, stream);
}

template <class T>
int launch_qkv(const QkvParams& p, int D, size_t smem, cudaStream_t stream) {
  switch (D) {
    case 64: return launch_qkv<T, 64>(p, smem, stream);
    case 128: return launch_qkv<T, 128>(p, smem, stream);
    default: return launch_qkv<T, 256>(p, smem, stream);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// C entry points. Every argument struct has only 8-byte fields, mirrored by ctypes
// Structures in sageattn2/backends/mma.py (same order).

struct Sa2Input {
  const void* ptr;
  int64_t batch, heads, tokens, head_dim, stride_b, stride_h, stride_n, is_bf16;
};

struct Sa2SmoothV16Args {
  Sa2Input x;
  int64_t padded_head_dim;
  const void* mean;  // f32 (B, H, D) or null
  void* out;         // (B, H, tokens, D) contiguous, x's dtype
  void* stream;
};

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
              vector_ok(a->x.ptr, a->x.head_dim, a->x.stride_b, a->x.stride_h, a->x.stride_n)};
  const int64_t vecs = a->x.tokens * (a->padded_head_dim / 8);
  const unsigned blocks_x = static_cast<unsigned>(std::min<int64_t>(sa2::ceil_div<int64_t>(vecs, kThreads), 1024));
  const dim3 grid(blocks_x, static_cast<unsigned>(a->x.heads), static_cast<unsigned>(a->x.batch));
  SA2_DISPATCH_DTYPE(a->x.is_bf16, smooth_v16_kernel, <<<grid, kThreads, 0, static_cast<cudaStream_t>(a->stream)>>>(p));
  SA2_LAUNCH_CHECK();
  return 0;
}

// One Q or K rows job of sa2_quantize_qkv. The scale of row r of a block_rows-row block is
// group (r / slice_rows) * mod_groups + (r % 8) / mod_div of the block (quant::GroupRule).
struct Sa2QkvRows {
  int64_t padded_tokens, block_rows, slice_rows, mod_groups, mod_div;
  void* out;    // int8 (B, H, padded_tokens, D or D/2)
  void* scale;  // f32 (B, H, padded_tokens / block_rows * groups per block)
};

struct Sa2QuantizeQkvArgs {
  Sa2Input q, k, v;  // same batch and dtype; k, v same heads and tokens; one head dim
  int64_t padded_head_dim, int4;
  Sa2QkvRows q_rows, k_rows;
  int64_t q_mean_rows;  // Q smoothing: rows per q-bar block (a power of two dividing block_rows), or 0
  void* qbar;           // int8 (B, Hq, q padded_tokens / q_mean_rows, D), with q_mean_rows
  void* qbar_scale;     // f32 (B, Hq, q padded_tokens / q_mean_rows), with q_mean_rows
  void* kbar;        // f32 (B, Hkv, D): K smoothing (the mean is written here and subtracted), or null
  void* q_dot_kbar;  // f32 (B, Hq, q padded_tokens): q . kbar for the lse, or null (needs kbar)
  void* vbar;        // f32 (B, Hkv, D): V mean (V smoothing), or null
  void* v_out;       // u8 (B, Hkv, D, v_padded_tokens) FP8 V^T, or null (V is not quantized here)
  int64_t v_padded_tokens;
  void* v_scale;     // f32 (B, Hkv, D), with v_out
  void* v_inv;       // f32 (B, Hkv, D), with v_out
  int64_t v_fp8_max;  // with v_out: largest |V_hat|, 448 or 2 (fp16 P.V accumulation, numerics.md §1.5)
  void* workspace;   // f32: B * Hkv * ceil(Nk / 256) * 3 * D per reduced tensor (K if kbar, V if vbar or v_out)
  int64_t workspace_floats;
  void* counters;    // u32 (2 * B * Hkv), zero on entry and left zero (one set per stream)
  int64_t counter_slots;
  void* stream;
};

namespace {

int rows_job_args(const Sa2Input& x, const Sa2QkvRows& r, int64_t D, RowsJob* job, size_t* smem) {
  const int64_t R = r.block_rows, rows_per_pass = kThreads * 8 / D;
  SA2_REQUIRE(R >= 8 && R <= 256 && R % rows_per_pass == 0 && r.padded_tokens % R == 0 &&
                  r.padded_tokens >= x.tokens,
              "bad block_rows %lld / padded_tokens %lld for head dim %lld", (long long)R,
              (long long)r.padded_tokens, (long long)D);
  SA2_REQUIRE(r.slice_rows >= 8 && power_of_two(r.slice_rows) && R % r.slice_rows == 0 && r.mod_groups >= 1 &&
                  r.mod_groups <= 8 && power_of_two(r.mod_div) && r.mod_div <= 8,
              "bad group rule");
  SA2_REQUIRE(r.out && r.scale, "null rows output");
  const GroupRule rule = GroupRule::make(static_cast<int>(r.slice_rows), static_cast<int>(r.mod_groups),
                                         static_cast<int>(r.mod_div));
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
  job->vec = vector_ok(x.ptr, x.head_dim, x.stride_b, x.stride_h, x.stride_n);
  *smem = rows_smem_bytes(static_cast<int>(R), static_cast<int>(D), 1, job->groups_per_block);
  return 0;
}

}  // namespace

// Quantizes Q and K (INT8/INT4 rows) and optionally V (FP8 V^T) in at most two launches:
//   1. the K / V column statistics (k-bar, v-bar, FP8 V scales), with the Q blocks when they
//      do not need k-bar (q . kbar);
//   2. the K blocks and V^T tiles (and the Q blocks that need k-bar).
// Without statistics everything is one launch.
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
  QkvParams p{};
  size_t q_smem = 0, k_smem = 0;
  if (int e = rows_job_args(q, a->q_rows, D, &p.rows[0], &q_smem)) return e;
  if (int e = rows_job_args(k, a->k_rows, D, &p.rows[1], &k_smem)) return e;
  p.d = static_cast<int>(q.head_dim);
  p.int4 = a->int4 != 0;
  p.kv_heads = k.batch * k.heads;
  RowsJob& qj = p.rows[0];
  if (a->q_mean_rows) {
    const int64_t m = a->q_mean_rows;
    SA2_REQUIRE(m >= 8 && power_of_two(m) && a->q_rows.block_rows % m == 0,
                "q_mean_rows %lld must be a power of two dividing block_rows %lld", (long long)m,
                (long long)a->q_rows.block_rows);
    SA2_REQUIRE(a->qbar && a->qbar_scale, "null q-bar output");
    qj.mean_shift = log2_exact(m);
    qj.qbar = static_cast<int8_t*>(a->qbar);
    qj.qbar_scale = static_cast<float*>(a->qbar_scale);
    q_smem = rows_smem_bytes(qj.block_rows, static_cast<int>(D), static_cast<int>(qj.block_rows / m),
                             qj.groups_per_block);
  }
  qj.dot_vec = static_cast<const float*>(a->q_dot_kbar ? a->kbar : nullptr);
  qj.dot_heads = static_cast<int>(k.heads);
  qj.dot_out = static_cast<float*>(a->q_dot_kbar);
  p.rows[1].mean = static_cast<const float*>(a->kbar);
  size_t v_smem = 0;
  if (a->v_out) {
    SA2_REQUIRE(a->v_padded_tokens % kVTileTokens == 0 && a->v_padded_tokens >= v.tokens,
                "v_padded_tokens %lld must be a multiple of %d covering the tokens", (long long)a->v_padded_tokens,
                kVTileTokens);
    SA2_REQUIRE(a->v_scale && a->v_inv, "null V scale");
    SA2_REQUIRE(a->v_fp8_max == 448 || a->v_fp8_max == 2, "v_fp8_max must be 448 or 2, got %lld",
                (long long)a->v_fp8_max);
    VJob& vj = p.v;
    vj.x = {v.ptr, v.stride_b, v.stride_h, v.stride_n};
    vj.heads = static_cast<int>(v.heads);
    vj.n = static_cast<int>(v.tokens);
    vj.tiles_per_head = static_cast<int>(a->v_padded_tokens / kVTileTokens);
    vj.n_pad = a->v_padded_tokens;
    vj.mean = static_cast<const float*>(a->vbar);
    vj.inv = static_cast<const float*>(a->v_inv);
    vj.out = static_cast<uint8_t*>(a->v_out);
    vj.vec = vector_ok(v.ptr, v.head_dim, v.stride_b, v.stride_h, v.stride_n);
    v_smem = (2 * kVTileTokens + 2 * sizeof(float)) * static_cast<size_t>(D);
  }

  // Statistics jobs: K (k-bar), V (v-bar and / or FP8 scales).
  StatsParams& sp = p.stats;
  if (a->kbar) {
    sp.job[sp.jobs++] = StatsJob{{k.ptr, k.stride_b, k.stride_h, k.stride_n}, nullptr, static_cast<float*>(a->kbar),
                                 nullptr, nullptr, nullptr,
                                 vector_ok(k.ptr, k.head_dim, k.stride_b, k.stride_h, k.stride_n), 0.0f};
  }
  if (a->vbar || a->v_out) {
    sp.job[sp.jobs++] = StatsJob{{v.ptr, v.stride_b, v.stride_h, v.stride_n}, nullptr, static_cast<float*>(a->vbar),
                                 static_cast<float*>(a->v_out ? a->v_scale : nullptr),
                                 static_cast<float*>(a->v_out ? a->v_inv : nullptr), nullptr,
                                 vector_ok(v.ptr, v.head_dim, v.stride_b, v.stride_h, v.stride_n),
                                 static_cast<float>(a->v_fp8_max)};
  }
  sp.heads = static_cast<int>(k.heads);
  sp.n = static_cast<int>(k.tokens);
  sp.chunks = static_cast<int>(sa2::ceil_div<int64_t>(k.tokens, kStatsChunkRows));
  const int64_t slots = k.batch * k.heads;
  if (sp.jobs > 0) {
    const int64_t per_job = slots * sp.chunks * 3 * D;
    SA2_REQUIRE(a->workspace && a->workspace_floats >= sp.jobs * per_job,
                "quantize_qkv workspace too small (%lld < %lld floats)", (long long)a->workspace_floats,
                (long long)(sp.jobs * per_job));
    SA2_REQUIRE(a->counters && a->counter_slots >= sp.jobs * slots, "quantize_qkv counters too small");
    for (int i = 0; i < sp.jobs; ++i) {
      sp.job[i].partial = static_cast<float*>(a->workspace) + i * per_job;
      sp.job[i].counter = static_cast<unsigned*>(a->counters) + i * slots;
    }
  }

  const Segment q_seg{kQ, q.batch * q.heads * qj.blocks_per_head};
  const Segment kv_seg{kKV, slots * (p.rows[1].blocks_per_head + p.v.tiles_per_head)};
  const Segment stats_seg{kStats, slots * sp.jobs * sp.chunks};
  const size_t kv_smem = std::max(k_smem, v_smem);
  const bool is_bf16 = q.is_bf16 != 0;
  const cudaStream_t stream = static_cast<cudaStream_t>(a->stream);
  auto launch = [&](std::initializer_list<Segment> segments, size_t smem) {
    QkvParams lp = p;
    lp.segments = 0;
    for (const Segment& s : segments) lp.segment[lp.segments++] = s;
    SA2_REQUIRE(smem <= 96 * 1024, "quantize_qkv needs %zu bytes of shared memory", smem);
    return is_bf16 ? launch_qkv<__nv_bfloat16>(lp, static_cast<int>(D), smem, stream)
                   : launch_qkv<__half>(lp, static_cast<int>(D), smem, stream);
  };
  if (sp.jobs == 0) return launch({q_seg, kv_seg}, std::max(q_smem, kv_smem));
  // The Q blocks go first in launch 1 so that the statistics' K / V reads are the most recent
  // traffic when launch 2 reads them again.
  const bool q_needs_stats = qj.dot_vec != nullptr;
  if (q_needs_stats) {
    if (int e = launch({stats_seg}, kStatsStageBytes)) return e;
    return launch({kv_seg, q_seg}, std::max(q_smem, kv_smem));
  }
  if (int e = launch({q_seg, stats_seg}, std::max<size_t>(q_smem, kStatsStageBytes))) return e;
  return launch({kv_seg}, kv_smem);
}
