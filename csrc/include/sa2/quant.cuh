// Quantization rules shared by every kernel family (docs/numerics.md §1), plus the layout
// facts the fused quantizers (quant_kernels.cuh) and the attention kernels must agree on.
//
// Family-neutral: nothing here depends on mma.sync or wgmma. The constants mirror
// sageattn2/config.py; the reference (sageattn2/reference.py) implements the same rules.
#pragma once
#include "sa2/abi.cuh"

namespace sa2::quant {

// config.py: INT8_MAX, INT4_MAX, FP8_MAX, ABSMAX_EPS.
constexpr float kInt8Max = 127.0f;
constexpr float kInt4Max = 7.0f;
constexpr float kFp8Max = 448.0f;
constexpr float kAbsmaxEps = 1e-6f;
// log2(448): P is produced as exp2(x - m + kLog2Fp8Max), i.e. already scaled to [0, 448].
constexpr float kLog2Fp8Max = 8.807354922057604f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One symmetric absmax group: scale = amax / qmax (stored), inv = qmax / amax (applied).
struct GroupScale {
  float scale;
  float inv;
};

__host__ __device__ inline GroupScale group_scale(float absmax, float qmax) {
  const float amax = fmaxf(absmax, kAbsmaxEps);
  return {amax / qmax, qmax / amax};
}

// x_hat = round_half_away_from_zero(x * inv) with x * inv one fp32 multiply (never an FMA).
__device__ __forceinline__ int quantize_int(float x, float inv) {
  return static_cast<int>(roundf(__fmul_rn(x, inv)));
}

// A channel mean on the input's grid (numerics.md §1.5): rounded, half to even, to a multiple
// of the input dtype's spacing at amax = max|x| of the channel (`mantissa_bits` 7 for bf16, 10
// for fp16). Every x of the channel is then a multiple of a finer or equal spacing, so x - mean
// needs no rounding back to that dtype unless it grows into a higher binade. A mean below the
// spacing becomes 0: subtracting it could only be rounded away, the same way for most keys.
__device__ __forceinline__ float mean_on_grid(float mean, float amax, int mantissa_bits) {
  if (!(amax > 0.0f && amax < INFINITY)) return mean;
  const float spacing = ldexpf(1.0f, ilogbf(amax) - mantissa_bits);
  return __fmul_rn(rintf(__fdiv_rn(mean, spacing)), spacing);
}

// Two signed 4-bit values in one byte: low nibble = even channel, high nibble = odd channel.
__device__ __forceinline__ uint32_t pack_int4_pair(int even, int odd) {
  return (static_cast<uint32_t>(even) & 0xFu) | ((static_cast<uint32_t>(odd) & 0xFu) << 4);
}

// FP8 V^T layout shared by both families: (B, Hkv, D, Nk_pad), keys contiguous, and inside
// every 16 keys the stored order is 0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15. With this order a
// lane's fp32 score accumulators (keys 8n+2t, 8n+2t+1) are, after conversion, exactly its
// 8-bit A fragment of the P.V MMA (bytes 4t..4t+3 and 16+4t..), so P needs no shuffle.
__host__ __device__ constexpr int v_stored_position(int key) {
  const int k16 = key & 15;
  return (key & ~15) + 4 * ((k16 & 7) >> 1) + (k16 & 1) + 2 * (k16 >> 3);
}

}  // namespace sa2::quant
