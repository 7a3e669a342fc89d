// Online softmax in base 2 on mma.sync accumulator fragments (docs/numerics.md §2, steps 3-5).
//
// A warp's score tile is x[M][N][4]: M m16 tiles of rows, N n8 tiles of keys. Lane 4g+t owns
// rows g (elements 0,1) and g+8 (elements 2,3) of each m16 tile, so it tracks 2*M rows; the
// four lanes of a quad share a row and combine their row maxima with two shuffles. The row
// sums stay per lane (they are linear in p, every lane rescales by the same alpha) and are
// combined once in the epilogue, unless the kernel takes them from an MMA (exp_and_sum<N, false>).
#pragma once
#include "sa2/common.cuh"

namespace sa2::softmax {

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Running state of the 2*M rows one lane touches.
template <int M>
struct RowState {
  float max[M][2];      // m: running max of x (base-2 logits), -inf before the first tile
  float sum_part[M][2];  // this lane's share of l

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        max[m][h] = -INFINITY;
        sum_part[m][h] = 0.0f;
      }
  }
};

// One key tile of one m16 row tile, in two steps so that the caller can rescale O between them
// and let the exponentials of one row tile overlap the P . V MMAs of another. The logits are
// x * scale with scale > 0, so the caller can pass the integer scores converted to float and their
// per-lane dequantization factor: the row max of x * scale is (max x) * scale exactly (rounding is
// monotone), and each p costs one FFMA and one ex2.
//
// Step 3: the new row maxima, and alpha[h] = exp2(m_old - m_new) for rescaling O and l. The first
// tile processed must give every row a finite max (key 0 is always visible), so alpha =
// exp2(-inf) = 0 there.
__device__ __forceinline__ void advance_row_max(float lane_max, float& row_max, float& alpha) {
  const float m_new = fmaxf(row_max, quad_max(lane_max));
  alpha = exp2_approx(row_max - m_new);
  row_max = m_new;
}

// This lane's raw maximum of row half h (elements 2h, 2h+1 of each n8 tile).
template <int N>
__device__ __forceinline__ float lane_row_max(const float (&x)[N][4], int h) {
  float v = fmaxf(x[0][2 * h], x[0][2 * h + 1]);
#pragma unroll
  for (int n = 1; n < N; ++n) v = fmaxf(v, fmaxf(x[n][2 * h], x[n][2 * h + 1]));
  return v;
}

// The same on the int32 scores, converted once: int -> float is exact here (|s| < 2^24) and
// monotone, so the result equals the float path's bit for bit. sm_90 has a three-input integer
// max (VIMNMX3) but only a two-input float one, so this takes N instructions instead of 2N - 1.
template <int N>
__device__ __forceinline__ float lane_row_max(const int32_t (&s)[N][4], int h) {
  int v = max(s[0][2 * h], s[0][2 * h + 1]);
#pragma unroll
  for (int n = 1; n < N; ++n) v = __vimax3_s32(v, s[n][2 * h], s[n][2 * h + 1]);
  return static_cast<float>(v);
}

// `scores` are x (float) or the integer scores whose conversion is x; scale > 0 turns x into
// logits, so the row max of x * scale is (max x) * scale.
template <int N, class Score>
__device__ __forceinline__ void update_row_max(const Score (&scores)[N][4], float scale, float (&row_max)[2],
                                               float (&alpha)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) advance_row_max(lane_row_max(scores, h) * scale, row_max[h], alpha[h]);
}

// Steps 4-5: x -> p = exp2(x * scale - m + p_offset) in place, and with kSum l = alpha * l + sum(p).
template <int N, bool kSum = true>
__device__ __forceinline__ void exp_and_sum(float (&x)[N][4], float scale, const float (&row_max)[2],
                                            float p_offset, const float (&alpha)[2], float (&row_sum)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float neg_shift = p_offset - row_max[h];
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      x[n][2 * h] = exp2_approx(fmaf(x[n][2 * h], scale, neg_shift));
      x[n][2 * h + 1] = exp2_approx(fmaf(x[n][2 * h + 1], scale, neg_shift));
      if constexpr (kSum) sum += x[n][2 * h] + x[n][2 * h + 1];
    }
    if constexpr (kSum) row_sum[h] = row_sum[h] * alpha[h] + sum;
  }
}

}  // namespace sa2::softmax
