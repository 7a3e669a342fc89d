// The quantizer kernels for Q, K and V (docs/numerics.md §1), shared by every kernel family.
//
//   quantize_qkv_kernel  Q and K -> INT8/INT4 rows with group absmax scales (K minus its mean;
//                        Q optionally minus the mean of each q_mean_rows block, whose q-bar is
//                        quantized to INT8 too; optionally q_row . kbar for the lse; with
//                        kHadamard, each smoothed row and q-bar rotated first), and V ->
//                        FP8 E4M3 V^T (B, H, D, N_pad) in quant::v_stored_position order. The
//                        per-channel K / V statistics (k-bar, v-bar, FP8 V scales) need every
//                        token first, so a call is two launches (one when nothing needs them);
//                        sageattn2/backends/quantize.py plans them.
//   smooth_v16_kernel    V - vbar rounded to V's dtype, (B, H, N, D) contiguous and zero-padded
//                        (FP16 PV with V smoothing, or a V whose rows are not 16-byte aligned).
// Inputs: fp16/bf16 (B, H, N, d) through batch/head/token strides in elements (the last dim
// contiguous), so HND and NHD both arrive without a copy. Offsets are 64-bit.
//
// Speed: the quantizer only moves bytes (~2 B read, ~1 B written per element), so every CTA
// stages its whole input block in shared memory with 16-byte cp.async and computes from there.
// Registers stay low and the many CTAs resident per SM keep enough loads in flight to run
// near HBM bandwidth; a CTA's serial phases (load, absmax, scales, quantize) overlap with the
// other CTAs' loads.
#pragma once
#include "sa2/abi.cuh"
#include "sa2/quant.cuh"
#include "sa2/storage.cuh"

namespace sa2::quantize {

using sa2::quant::GroupScale;

constexpr int kThreads = 256;
// Tokens per statistics partial: fixes the summation order of the means (workspace size too).
constexpr int kStatsChunkRows = 256;
// Shared memory a statistics CTA stages one piece of its chunk in (its partials reuse it).
constexpr int kStatsStageBytes = 32 * 1024;
// Tokens per FP8 V^T CTA (the V^T token padding is a multiple of it).
constexpr int kVTileTokens = 64;

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
__device__ __forceinline__ float2 word_to_float2<bf16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 word_to_float2<f16>(uint32_t w) {
  return make_float2(to_float(f16{static_cast<uint16_t>(w & 0xFFFFu)}), to_float(f16{static_cast<uint16_t>(w >> 16)}));
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

// 1 / sqrt(D) rounded to fp32 once, from the double, as the reference's `x * (1.0 / sqrt(d))`.
template <int D>
__host__ __device__ constexpr float hadamard_scale() {
  return static_cast<float>(D == 64 ? 0.125 : D == 128 ? 0.08838834764831843 : 0.0625);
}

// The orthonormal Walsh-Hadamard transform (Sylvester order, numerics.md §1.6) of a D-channel
// row held by D / 8 consecutive lanes (a group aligned to D / 8), channels 8 * (lane % (D / 8))
// + 0..7 in v: butterflies (a + b, a - b) over channel strides 1, 2, 4 in registers, 8 .. D / 2
// with lane ^ (stride / 8), then one multiply by 1 / sqrt(D). The same fp32 operations in the
// same order as reference.hadamard_rotate, so both round alike. Every lane of the warp calls it.
template <int D>
__device__ __forceinline__ void hadamard_row(float (&v)[8]) {
  static_assert((D & (D - 1)) == 0 && D >= 64 && D <= 256, "power-of-two head dims 64..256");
#pragma unroll
  for (int h = 1; h < 8; h *= 2)
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (!(k & h)) {
        const float a = v[k], b = v[k + h];
        v[k] = __fadd_rn(a, b);
        v[k + h] = __fsub_rn(a, b);
      }
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 1; m < D / 8; m *= 2) {
    const bool second = lane & m;  // this lane holds b of the pair (a, b)
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float other = __shfl_xor_sync(0xffffffffu, v[k], m);
      v[k] = second ? __fsub_rn(other, v[k]) : __fadd_rn(v[k], other);
    }
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = __fmul_rn(v[k], hadamard_scale<D>());
}

// ---------------------------------------------------------------------------------------
// Jobs. One kernel runs every kind of CTA; the CTA index picks the job (see Segment).

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
    float mean = job.mean && ch < d ? s / static_cast<float>(p.n) : 0.0f;
    if (job.mean_grid_bits > 0) mean = sa2::quant::mean_on_grid(mean, fmaxf(hi, -lo), job.mean_grid_bits);
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

// What a thread quantizes under kHadamard: x - m of its 8 channels, then the row's rotation
// (the whole row's lanes take part).
template <int D>
__device__ __forceinline__ void rotated_centred8(const float (&x)[8], const float (&m)[8], float (&y)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) y[k] = __fsub_rn(x[k], m[k]);
  hadamard_row<D>(y);
}

// Thread -> (row phase, 8-channel vector): rows r = rsub + s * rows_per_pass. A row is D / 8
// consecutive lanes, reduced with shuffles. kHadamard rotates each row after smoothing in both
// passes (recomputing is cheaper than keeping the rotated rows) and each q-bar.
template <class T, int D, bool kHadamard>
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

  // Row absmax of x - mean, rotated with kHadamard (and x . dot_vec of the raw row).
  const int c = (threadIdx.x % kVecs) * 8, rsub = threadIdx.x / kVecs, passes = R / kRowsPerPass;
  for (int s = 0; s < passes; ++s) {
    const int r = rsub + s * kRowsPerPass;
    float x[8], m[8];
    read8(tile + r * D + c, x);
    read8(mean + (r >> shift) * D + c, m);
    float amax = 0.0f;
    if constexpr (kHadamard) {
      float y[8];
      rotated_centred8<D>(x, m, y);
#pragma unroll
      for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(y[k]));
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(__fsub_rn(x[k], m[k])));
    }
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
      if constexpr (kHadamard) {
        // The rows' lane layout: every D / 8 lanes hold one copy of the rotated q-bar.
        float v[8];
        read8(mean + b * D + c, v);
        hadamard_row<D>(v);
        float amax = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(v[k]));
#pragma unroll
        for (int off = kVecs / 2; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const GroupScale g = sa2::quant::group_scale(amax, sa2::quant::kInt8Max);
        const int64_t gb = bh * blocks_per_head + static_cast<int64_t>(blk) * mean_blocks + b;
        const auto code = [&](int k) { return sa2::quant::quantize_int(v[k], g.inv); };
        if (lane < kVecs)
          store_8bytes(j.qbar + gb * D + c, pack_int8x4(code(0), code(1), code(2), code(3)),
                       pack_int8x4(code(4), code(5), code(6), code(7)));
        if (lane == 0) j.qbar_scale[gb] = g.scale;
      } else {
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
    if constexpr (kHadamard) {
      float y[8];
      rotated_centred8<D>(x, m, y);
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = sa2::quant::quantize_int(y[k], inv);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = sa2::quant::quantize_int(__fsub_rn(x[k], m[k]), inv);
    }
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
        const uint32_t pair = pack2_e4m3(f.x, f.y) & mask;
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

// CTAs per SM that shared memory allows (about 33 KB each): the register budget follows.
// Hopper: 6 (40 registers), but a V CTA at D = 256 converts two items per thread and needs 48.
template <int D, int kKinds>
__host__ __device__ constexpr int min_ctas_per_sm() {
#if SA2_ARCH == 90
  return D == 256 && (kKinds & (1 << kKV)) ? 5 : 6;
#elif SA2_ARCH == 80 || SA2_ARCH == 87
  return 4;
#else
  return 2;  // ~100 KB of shared memory per SM
#endif
}

// kKinds: bit mask of the segment kinds this instantiation runs (each kind's registers only
// where a launch needs it). kHadamard: Q and K rows rotated before quantization (§1.6).
template <class T, int D, int kKinds, bool kHadamard>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<D, kKinds>()) quantize_qkv_kernel(const QuantizeParams p) {
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
      rows_job<T, D, kHadamard>(q, cta / q.blocks_per_head, static_cast<int>(cta % q.blocks_per_head), p.d, p.int4, smem);
    } else if (kKinds & (1 << kKV)) {
      const int k_blocks = p.rows[1].blocks_per_head, per_head = k_blocks + p.v.tiles_per_head;
      const int64_t bh = p.kv_heads - 1 - cta / per_head;
      const int w = static_cast<int>(cta % per_head);
      if (w < k_blocks) {
        rows_job<T, D, kHadamard>(p.rows[1], bh, w, p.d, p.int4, smem);
      } else {
        v_job<T, D>(p.v, bh, w - k_blocks, p.d, smem);
      }
    }
    return;
  }
}

// ---------------------------------------------------------------------------------------
// V for 16-bit PV

template <class T>
__global__ void __launch_bounds__(kThreads) smooth_v16_kernel(const SmoothV16Params p) {
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

}  // namespace sa2::quantize
