// The kernel boundary: the one parameter struct of every kernel entry point, and the enums the
// host passes. Python mirrors each struct with a ctypes.Structure (sageattn2/abi.py); every
// compiled unit static_asserts the offsets and sizes Python computed (sageattn2/kernels.py), so
// NVRTC refuses to build a kernel whose layout Python would fill differently.
//
// Kernels read these structs by value from the launch's parameter buffer: no host code, no
// stream, nothing but what the device needs.
#pragma once
#include "sa2/common.cuh"

// offsetof for the generated layout checks. NVRTC 13.0 has no __builtin_offsetof (13.5 and host
// compilers do); its front end's __INTADDR__ folds the classic null-pointer form to a constant.
#if defined(__has_builtin)
#  if __has_builtin(__builtin_offsetof)
#    define SA2_OFFSETOF(T, member) __builtin_offsetof(T, member)
#  endif
#endif
#ifndef SA2_OFFSETOF
#  define SA2_OFFSETOF(T, member) __INTADDR__(&(((T*)0)->member))
#endif

namespace sa2 {

// QK operand type, PV operand type (the 16-bit types are the input dtype), PV accumulator,
// quantization groups.
enum class QKType : int { kInt8 = 0, kInt4 = 1 };
enum class PVType : int { kFp16 = 0, kBf16 = 1, kFp8 = 2 };
// Accumulator of P.V inside one key tile (O is fp32 across tiles): fp32, or fp16 (twice the MMA
// rate on GeForce cards; FP8 operands, or fp16 P and V).
enum class PVAccum : int { kFp32 = 0, kFp16 = 1 };
enum Granularity : int { kPerThread = 0, kPerWarp = 1, kPerBlock = 2 };

// The NVIDIA driver's CUtensorMap (cuda.h): 128 opaque bytes, 64-byte aligned, filled on the host
// by cuTensorMapEncodeTiled.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

// ---------------------------------------------------------------------------------------------
// mma.sync attention (attn_mma.cuh): pre-quantized Q/K, FP8 V^T or 16-bit V.
struct MmaAttnParams {
  const void* q;            // int8 (B, Hq, nq_pad, QB)
  const void* k;            // int8 (B, Hkv, nk_pad, QB)
  const void* q_scale;      // f32 (B, Hq, q groups)
  const void* k_scale;      // f32 (B, Hkv, k groups)
  const void* qbar;         // int8 (B, Hq, nq_pad / q_mean_rows, D), Q smoothing only
  const void* qbar_scale;   // f32 (B, Hq, nq_pad / q_mean_rows)
  const void* q_dot_kbar;   // f32 (B, Hq, nq_pad): q_row . kbar, for the lse; may be null
  const void* v;            // FP8 V^T or 16-bit V
  const void* v_scale;      // f32 (B, Hkv, D), FP8 PV only
  const void* v_mean;       // f32 (B, Hkv, D) vbar, or null
  void* out;                // (B, Hq, Nq, d) in any strides, q's dtype
  void* lse;                // f32 (B, Hq, Nq) or null
  int64_t batch, heads_q, heads_kv, nq, nk, head_dim, padded_head_dim;
  int64_t nq_pad, nk_pad, v_pad;  // v_pad: row length of FP8 V^T
  int64_t v_stride_b, v_stride_h, v_stride_n;  // 16-bit V, elements
  int64_t o_stride_b, o_stride_h, o_stride_n;  // elements
  int64_t qk_int4, pv_type;
  int64_t pv_accum;  // PVAccum: the kernel's accumulator (fp16: FP8 V scaled to |V_hat| <= 2, or fp16 V)
  int64_t out_bf16, granularity, smooth_q, q_mean_rows, causal;
  double sm_scale;
};

// ---------------------------------------------------------------------------------------------
// wgmma attention (attn_wgmma.cuh): TMA maps of Q, K, V and the rest.
struct WgmmaAttnScalars {
  const float* q_scale;  // (B, Hq, num_q_groups)
  const float* k_scale;  // (B, Hkv, num_k_groups)
  const float* v_scale;  // (B, Hkv, D) fp8 PV only
  void* out;             // fp16/bf16, element strides below
  float* lse;            // (B, Hq, Nq) or null
  int64_t q_scale_stride_b, q_scale_stride_h;
  int64_t k_scale_stride_b, k_scale_stride_h;
  int64_t v_scale_stride_b, v_scale_stride_h;
  int64_t o_stride_b, o_stride_h, o_stride_n;
  int64_t lse_stride_b, lse_stride_h;
  int num_q, num_k, group_size, head_dim;  // head_dim: true d (<= padded D)
  int causal, out_bf16;
  int out_vec2;    // 4-byte aligned pair stores are legal
  int out_rows16;  // every output row is whole (head_dim == D) and 16-byte aligned
  float scale_log2;  // sm_scale * log2(e)
};

struct WgmmaAttnParams {
  TensorMap tm_q, tm_k, tm_v;
  WgmmaAttnScalars p;
};

// ---------------------------------------------------------------------------------------------
// Quantizers (quant_kernels.cuh).

// A (B, H, N, d) input with element strides; the last dim is contiguous.
struct StridedInput {
  const void* ptr;
  int64_t stride_b, stride_h, stride_n;

  template <class T>
  __device__ const T* head(int64_t bh, int heads) const {
    return static_cast<const T*>(ptr) + (bh / heads) * stride_b + (bh % heads) * stride_h;
  }
};

// Which scale a row (token) of a `block_rows`-row block uses, for every family and
// granularity (config.q_group_of_row / k_group_of_key inside one block):
//   local_group(r) = (r / slice_rows) * mod_groups + (r % 8) / mod_div
// slice_rows and mod_div are powers of two, passed as shifts.
struct GroupRule {
  int slice_shift;  // log2(slice_rows)
  int mod_groups;
  int div_shift;    // log2(mod_div)

  __device__ int local_group(int r) const { return (r >> slice_shift) * mod_groups + ((r & 7) >> div_shift); }
};

// Column statistics of K or V (see stats_job).
struct StatsJob {
  StridedInput x;
  float fp8_max;      // with fp8_scale: largest |V_hat|, 448 or 2 (fp16 P.V accumulator, numerics.md §1.5)
  int mean_grid_bits;  // > 0: the mean is taken on the input's grid of this many mantissa bits (V: 7 bf16, 10 fp16)
  float* partial;     // (B, H, chunks, 3, D)
  float* mean;        // (B, H, D) or null
  float* fp8_scale;   // (B, H, D) or null: max|x - mean| / fp8_max (mean = 0 if `mean` is null)
  float* fp8_inv;     // (B, H, D) or null: fp8_max / max|x - mean|
  unsigned* counter;  // (B * H) tickets, 0 between calls
  int vec;
};

struct StatsParams {
  StatsJob job[2];
  int jobs, heads, n, chunks;
};

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

// FP8 V^T: one CTA converts kVTileTokens tokens of one head.
struct VJob {
  StridedInput x;
  int heads, n, tiles_per_head;
  int64_t n_pad;
  const float* mean;  // (B, H, D) or null
  const float* inv;   // (B, H, D): fp8_max / max|V - mean| (StatsJob)
  uint8_t* out;       // (B, H, D, n_pad)
  int vec;
};

// A launch is a list of segments, each a run of CTAs of one kind:
//   kStats  CTA = ((batch * H + head) * jobs + job) * chunks + chunk
//   kQ      CTA = (batch * Hq + head) * blocks + block
//   kKV     the K rows blocks and V^T tiles of one kv head together, heads in descending order:
//           the statistics launch just read them in ascending order, so the heads it read
//           last are read again first, while they are likely still in L2.
enum SegmentKind : int { kStats = 0, kQ = 1, kKV = 2 };

struct Segment {
  int kind;
  int64_t ctas;
};

struct QuantizeParams {
  StatsParams stats;
  RowsJob rows[2];   // Q, K
  VJob v;            // tiles_per_head 0: V is not quantized here
  int64_t kv_heads;  // B * Hkv
  int d, int4, segments;
  Segment segment[2];
};

// V - vbar (or a plain zero-padded copy) for 16-bit PV.
struct SmoothV16Params {
  StridedInput x;
  int heads, n, d, D;
  const float* mean;  // (B, H, D) or null (plain zero-padded copy)
  void* out;          // (B, H, n, D) contiguous, x's dtype
  int vec;
};

}  // namespace sa2
