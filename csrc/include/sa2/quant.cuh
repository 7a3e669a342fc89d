// Quantization rules shared by every kernel family (docs/numerics.md §1), plus the layout
// facts the fused quantizers (csrc/quant.cu) and the attention kernels must agree on.
//
// Family-neutral: nothing here depends on mma.sync or wgmma. The constants mirror
// sageattn2/config.py; the reference (sageattn2/reference.py) implements the same rules.
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>

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

// E4M3, round to nearest even, saturating to +-448 (hardware cvt on sm_89+, exact software
// conversion before that).
__device__ __forceinline__ uint8_t to_e4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// Two signed 4-bit values in one byte: low nibble = even channel, high nibble = odd channel.
__device__ __forceinline__ uint32_t pack_int4_pair(int even, int odd) {
  return (static_cast<uint32_t>(even) & 0xFu) | ((static_cast<uint32_t>(odd) & 0xFu) << 4);
}

// Which scale a row (token) of a `block_rows`-row block uses, for every family and
// granularity (config.q_group_of_row / k_group_of_key inside one block):
//   local_group(r) = (r / slice_rows) * mod_groups + (r % 8) / mod_div
//   Q per_thread: slice warp_q,  mod_groups 8, mod_div 1  -> rows {g, g+8, g+16, ...} of a warp slice
//   Q per_warp:   slice warp_q,  mod_groups 1, mod_div 8
//   Q per_block:  slice cta_q,   mod_groups 1, mod_div 8
//   K per_thread: slice k_tile,  mod_groups 4, mod_div 2  -> keys {8n + 2t, 8n + 2t + 1} of a tile
//   K per_warp / per_block: slice k_tile, mod_groups 1, mod_div 8
// slice_rows and mod_div are powers of two in every tile shape, so the divisions are shifts
// (the quantizer evaluates this for every row it stores).
struct GroupRule {
  int slice_shift;  // log2(slice_rows)
  int mod_groups;
  int div_shift;    // log2(mod_div)

  // slice_rows and mod_div must be powers of two.
  static GroupRule make(int slice_rows, int mod_groups, int mod_div) {
    int s = 0, m = 0;
    while ((1 << s) < slice_rows) ++s;
    while ((1 << m) < mod_div) ++m;
    return {s, mod_groups, m};
  }

  __host__ __device__ int local_group(int r) const { return (r >> slice_shift) * mod_groups + ((r & 7) >> div_shift); }
  __host__ __device__ int groups_per_block(int block_rows) const { return (block_rows >> slice_shift) * mod_groups; }
};

// FP8 V^T layout shared by both families: (B, Hkv, D, Nk_pad), keys contiguous, and inside
// every 16 keys the stored order is 0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15. With this order a
// lane's fp32 score accumulators (keys 8n+2t, 8n+2t+1) are, after conversion, exactly its
// 8-bit A fragment of the P.V MMA (bytes 4t..4t+3 and 16+4t..), so P needs no shuffle.
__host__ __device__ constexpr int v_stored_position(int key) {
  const int k16 = key & 15;
  return (key & ~15) + 4 * ((k16 & 7) >> 1) + (k16 & 1) + 2 * (k16 >> 3);
}

}  // namespace sa2::quant
