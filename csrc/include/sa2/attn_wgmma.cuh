// Hopper (sm_90a) SageAttention2 forward kernel: INT8 QK^T and FP8 (or fp16/bf16) PV on wgmma.
//
// One CTA = 64 * kWGs query rows of one (batch, head): warpgroup 0 is the producer (one thread
// issues TMA loads of Q once and of K / V tiles into a multi-stage mbarrier ring), warpgroups
// 1..kWGs are consumers that own 64 rows each (kWGs = 2, or 3 for the sequential schedule). Numerics follow
// docs/numerics.md; the per-thread quantization groups mirror
// sageattn2.config.tile_shape(Family.WGMMA, D): warp_q 16, k_tile 128. Its cta_q (128) only sets
// the Q padding: a 192-row CTA reads Q scales for real rows only.
//   Q scale of a thread: rows {g, g+8} of its warp's 16-row slice -> index (row/16)*8 + g.
//   K scale of a thread: keys {8n+2t, 8n+2t+1} of a 128-key tile   -> index tile*4 + t.
// Inputs (all prepared by the quantizer):
//   Q, K  int8, row-major (B, H, N, D) with any 16-byte-multiple strides (TMA tensor maps);
//   V     fp8 PV: e4m3 V^T (B, Hkv, D, Nk_pad) with tokens of every 16 stored in the order
//         0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15 (so P packs straight from the S accumulator);
//         fp16/bf16 PV: the caller's V (B, Hkv, Nk, d) read through the wgmma transpose bit.
#pragma once
#include "sa2/abi.cuh"
#include "sa2/storage.cuh"
#include "sa2/wgmma.cuh"

namespace sa2::wgmma_attn {

// How a consumer warpgroup orders its GEMMs and softmax (a kernel instantiation; sageattn2/kernels.py names them).
//   kSequential: QK(j), wait, softmax(j), PV(j), wait; the two warpgroups interleave freely.
//   kPingPong:   PV(j-1) and QK(j) issued back to back, waited at once, then softmax(j); a
//                named-barrier ping-pong makes the warpgroups alternate GEMM phases, so one
//                warpgroup's softmax runs under the other's GEMMs.
//   kOverlap:    as kPingPong, but softmax(j) also runs while this warpgroup's own PV(j-1) is
//                in flight (intra-warpgroup overlap; needs S, R, P and O live at once).
// Three consumer warpgroups (the Traits' kWGs) run kSequential only.
enum class Schedule : int { kSequential = 0, kPingPong = 1, kOverlap = 2 };

// The scalar half of WgmmaAttnParams (abi.cuh).
using Params = WgmmaAttnScalars;

template <int kHeadDim_, PVType kPV_, Schedule kSchedule_, int kWGs_ = 2>
struct Traits {
  static constexpr int kHeadDim = kHeadDim_;  // padded D
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma family serves head dims 64 and 128");
  static constexpr PVType kPV = kPV_;
  static constexpr bool kFp8PV = kPV == PVType::kFp8;
  static constexpr bool kBf16PV = kPV == PVType::kBf16;
  static constexpr Schedule kSchedule = kSchedule_;
  static constexpr bool kPingPong =
      kSchedule == Schedule::kPingPong || kSchedule == Schedule::kOverlap;
  static constexpr bool kIntraOverlap = kSchedule == Schedule::kOverlap;
  static constexpr bool kIssueAhead = kSchedule != Schedule::kSequential;

  // Three consumer warpgroups (three warps per scheduler to hide the softmax latency) at 160
  // registers each: S (64) + O (D/2) + the fp8 partial R + P must fit. At head dim 128 the fp8
  // partial is taken in two N = 64 halves (R of 32 registers, each half folded into O before
  // the next is issued).
  static constexpr int kConsumerWGs = kWGs_;
  static_assert(kConsumerWGs == 2 || kConsumerWGs == 3, "two or three consumer warpgroups");
  static_assert(kConsumerWGs == 2 || kSchedule == Schedule::kSequential,
                "three warpgroups run the sequential schedule");
  static constexpr bool kSplitPV = kConsumerWGs == 3 && kFp8PV && kHeadDim == 128;
  // Softmax as two 64-key halves (max of one half under the exponentials of the other): the
  // instruction-level parallelism two warps per scheduler need (notes v4). With three, the
  // one-pass softmax (no rescale of the first half) is faster (notes v7).
  static constexpr bool kSplitSoftmax = kConsumerWGs == 2;
  // One-pass softmax: the row max on the int32 scores with three-input integer max (VIMNMX3)
  // before any conversion. +9-10 % at head dim 64; at 128 it spills (112 B) and loses 11 %
  // against the float max (notes v7).
  static constexpr bool kIntMax = !kSplitSoftmax && kHeadDim == 64;
  static constexpr int kPartialRegs = kFp8PV ? (kSplitPV ? 32 : kHeadDim / 2) : 1;
  static constexpr int kBlockM = 64 * kConsumerWGs;  // query rows per CTA
  static constexpr int kBlockN = 128;                // == tile_shape().k_tile
  static constexpr int kThreads = 128 * (kConsumerWGs + 1);
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kConsumerWGs == 2 ? 240 : 160;
  // Each tile's first QK / fp8-PV k-step writes its accumulator without reading it, so S and R
  // are dead between tiles: needed to fit 160 registers. At 240 registers the same change made
  // the fp8 head-dim-128 kernels 5-7 % slower (notes v5), so two-warpgroup kernels keep S and R
  // as read-write operands, zeroed once.
  static constexpr bool kFreshAccumulators = kConsumerWGs == 3;
  static_assert(128 * kProducerRegs + 128 * kConsumerWGs * kConsumerRegs <= 65536,
                "register reallocation exceeds the register file");

  // Q/K tiles: one swizzle atom per row (128 B rows at D 128, 64 B rows at D 64).
  static constexpr int kQKSwizzle = kHeadDim;
  static constexpr int kQBytes = kBlockM * kHeadDim;
  static constexpr int kKBytes = kBlockN * kHeadDim;
  // V tile: fp8 V^T is D rows of 128 keys (128 B); 16-bit V is 128 key rows of D channels,
  // loaded as D/64 column blocks of 128 B rows.
  static constexpr int kVBytes = kBlockN * kHeadDim * (kFp8PV ? 1 : 2);
  static constexpr int kVColumnBlockBytes = kBlockN * 128;
  static constexpr int kStages = kConsumerWGs == 3 && kHeadDim == 128
                                     ? (kFp8PV ? 6 : 4)
                                     : kFp8PV ? (kHeadDim == 128 ? 4 : 8) : (kHeadDim == 128 ? 4 : 6);
  static constexpr int kNumBarriers = 1 + 4 * kStages;
  // A tile of ones, the B operand of the row-sum wgmma: one 1024-byte swizzle atom (8 rows of
  // 128 B), which holds every k-step's operand (all values equal), so its descriptor never moves.
  static constexpr int kOnesBytes = 1024;
  static constexpr int kSmemBytes =
      1024 + kQBytes + kOnesBytes + kStages * (kKBytes + kVBytes) + kNumBarriers * 8;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 per-CTA limit");
  static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0,
                "tiles must keep 1024-byte swizzle-atom alignment");
};

// ---------------------------------------------------------------------------------------------
// GEMM issue helpers (one warpgroup, no waiting)

template <class T>
__device__ __forceinline__ void issue_qk(uint32_t (&s)[64], uint64_t desc_q, uint64_t desc_k) {
  if constexpr (T::kFreshAccumulators)
    sm90::wgmma_s8_ss_n128_zero(s, desc_q, desc_k);
  else
    sm90::wgmma_s8_ss_n128(s, desc_q, desc_k, 0);
#pragma unroll
  for (int kk = 1; kk < T::kHeadDim / 32; ++kk)
    sm90::wgmma_s8_ss_n128(s, sm90::desc_advance(desc_q, kk * 32),
                           sm90::desc_advance(desc_k, kk * 32), 1);
}

// fp8: R = P . V over one 128-key tile, starting from zero (the first level of two), and the
// tile's row sums of P (the same e4m3 values) into lsum. With kSplitPV, R holds the output
// channels [64 * half, 64 * half + 64) only and half 1 takes no row sums.
template <class T>
__device__ __forceinline__ void issue_pv_fp8(float (&r)[T::kPartialRegs], float (&lsum)[4],
                                             const uint32_t (&p)[16], uint64_t desc_v,
                                             uint64_t desc_ones, int half = 0) {
  constexpr bool kN64 = T::kHeadDim == 64 || T::kSplitPV;
  if constexpr (T::kSplitPV) desc_v = sm90::desc_advance(desc_v, half * 64 * 128);  // 64 V^T rows
  if constexpr (T::kFreshAccumulators) {
    static_assert(kN64, "output-only partials are N = 64");
    sm90::wgmma_e4m3_rs_n64_zero(r, p[0], p[1], p[2], p[3], desc_v);
  } else if constexpr (!kN64) {
    sm90::wgmma_e4m3_rs_n128(r, p[0], p[1], p[2], p[3], desc_v, 0);
  } else {
    sm90::wgmma_e4m3_rs_n64(r, p[0], p[1], p[2], p[3], desc_v, 0);
  }
#pragma unroll
  for (int kk = 1; kk < 4; ++kk) {
    const uint64_t d = sm90::desc_advance(desc_v, kk * 32);
    if constexpr (!kN64)
      sm90::wgmma_e4m3_rs_n128(r, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3], d, 1);
    else
      sm90::wgmma_e4m3_rs_n64(r, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3], d, 1);
  }
  if (half == 0) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      sm90::wgmma_e4m3_rs_n8(lsum, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                             desc_ones, kk > 0);
  }
}

// fp16/bf16: O += P . V and l += rowsum(P) (fp32 accumulators, no truncation: single level).
// V is N-major; the ones tile K-major.
template <class T>
__device__ __forceinline__ void issue_pv_16(float (&o)[T::kHeadDim / 2], float (&l)[4],
                                            const uint32_t (&p)[32], uint64_t desc_v,
                                            uint64_t desc_ones) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint64_t d = sm90::desc_advance(desc_v, kk * 16 * 128);  // 16 key rows of 128 B
    const uint32_t a0 = p[4 * kk], a1 = p[4 * kk + 1], a2 = p[4 * kk + 2], a3 = p[4 * kk + 3];
    if constexpr (T::kHeadDim == 128) {
      if constexpr (T::kBf16PV) sm90::wgmma_bf16_rs_n128_tb(o, a0, a1, a2, a3, d, 1);
      else sm90::wgmma_f16_rs_n128_tb(o, a0, a1, a2, a3, d, 1);
    } else {
      if constexpr (T::kBf16PV) sm90::wgmma_bf16_rs_n64_tb(o, a0, a1, a2, a3, d, 1);
      else sm90::wgmma_f16_rs_n64_tb(o, a0, a1, a2, a3, d, 1);
    }
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    sm90::wgmma_16_rs_n8<T::kBf16PV>(l, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                                     desc_ones);
}

// ---------------------------------------------------------------------------------------------
// Online softmax on one 64x128 score tile held as the wgmma accumulator (int32 bits in s).
// Leaves p = exp2(x - m_new) (times 448 for fp8) in s as floats; updates m and returns
// alpha = exp2(m_old - m_new) per row (2 rows per thread). The row sums of p are taken by the
// PV wgmma from the rounded operand (a ones column), so the softmax has no sum chains.

struct RowState {
  float m[2];
  float l[2];  // fp8: sum of the rounded p over the tiles folded so far (16-bit PV: in lsum)
};

template <class T, bool kMask>
__device__ __forceinline__ void softmax_tile(uint32_t (&s)[64], RowState& st, float (&alpha)[2],
                                             float dequant, int key0, int row0, int num_k,
                                             bool causal, int t) {
  // log2(448): p is produced in [0, 448] so the e4m3 conversion uses the full range.
  constexpr float kFp8Offset = T::kFp8PV ? 8.807354922057604f : 0.0f;
  // The tile is processed as two 64-key halves (registers 0-31 and 32-63) so that the max of
  // half 1 (ALU pipe) and the exponentials of half 0 (MUFU) are independent and issue
  // interleaved; half 0 is brought to the final max by one multiply per value at the end.
  // Within a half, the 16 values of a row are max-reduced in independent chains: 4, or 2 where
  // registers are short (three warpgroups at head dim 128: a third warp per scheduler hides
  // the longer dependency chains).
  constexpr int kChains = T::kConsumerWGs == 3 && T::kHeadDim == 128 ? 2 : 4;
  auto convert_and_max = [&](int i, float (&chain)[2][kChains]) {
    float x = static_cast<float>(static_cast<int32_t>(s[i]));
    if constexpr (kMask) {
      const int key = key0 + 8 * (i / 4) + 2 * t + (i % 2);
      const int row = row0 + 8 * ((i / 2) % 2);
      if (key >= num_k || (causal && key > row)) x = -INFINITY;
    }
    s[i] = __float_as_uint(x);
    float& m = chain[(i / 2) % 2][(i / 4) % kChains];
    m = fmaxf(m, x);
  };
  // Row max of a half: chains, then the quad (lanes of a quad have different K scales, so
  // the values are scaled before reducing).
  auto reduce_max = [&](float (&chain)[2][kChains], float (&mx)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = chain[r][0];
#pragma unroll
      for (int c = 1; c < kChains; ++c) m = fmaxf(m, chain[r][c]);
      m *= dequant;
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      mx[r] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    }
  };
  auto exp_one = [&](int i, const float (&shift)[2]) {
    const int r = (i / 2) % 2;
    s[i] = __float_as_uint(sm90::fast_exp2(fmaf(__uint_as_float(s[i]), dequant, -shift[r])));
  };

  float max0[2][kChains], max1[2][kChains];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < kChains; ++c) max0[r][c] = max1[r][c] = -INFINITY;

  if constexpr (!T::kSplitSoftmax) {
    // One pass: the whole tile's max, then its exponentials.
    float mx[2], shift[2];
    if constexpr (T::kIntMax && !kMask) {
      // The thread's scores of a row share one positive dequant factor, so their max is taken
      // on the int32 values (three-input VIMNMX3, 4 chains of 4) and only the max converted;
      // the scores are converted inside the exponential.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // Row r's values: s[4q + 2r + e], q < 16, e < 2; chain k takes q = k, k+4, k+8, k+12.
        const auto v = [&](int q, int e) { return static_cast<int32_t>(s[4 * q + 2 * r + e]); };
        int32_t c[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          c[k] = __vimax3_s32(v(k, 0), v(k, 1), v(k + 4, 0));
          c[k] = __vimax3_s32(c[k], v(k + 4, 1), v(k + 8, 0));
          c[k] = __vimax3_s32(c[k], v(k + 8, 1), v(k + 12, 0));
          c[k] = max(c[k], v(k + 12, 1));
        }
        float m = static_cast<float>(max(__vimax3_s32(c[0], c[1], c[2]), c[3])) * dequant;
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        mx[r] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      }
#pragma unroll
      for (int i = 0; i < 64; ++i)
        s[i] = __float_as_uint(static_cast<float>(static_cast<int32_t>(s[i])));
    } else {
#pragma unroll
      for (int i = 0; i < 64; ++i) convert_and_max(i, max0);
      reduce_max(max0, mx);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(st.m[r], mx[r]);
      const bool empty = m_new == -INFINITY;  // no visible key yet in this row
      alpha[r] = empty ? 1.0f : sm90::fast_exp2(st.m[r] - m_new);
      shift[r] = empty ? 0.0f : m_new - kFp8Offset;
      st.m[r] = m_new;
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) exp_one(i, shift);
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) convert_and_max(i, max0);
    float mx[2], m_half[2], shift[2];
    reduce_max(max0, mx);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_half[r] = fmaxf(st.m[r], mx[r]);
      shift[r] = m_half[r] == -INFINITY ? 0.0f : m_half[r] - kFp8Offset;
    }
    // exp of half 0 and max of half 1: independent, one basic block.
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      exp_one(i, shift);
      convert_and_max(32 + i, max1);
    }
    reduce_max(max1, mx);
    float beta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_half[r], mx[r]);
      const bool empty = m_new == -INFINITY;  // no visible key yet in this row
      alpha[r] = empty ? 1.0f : sm90::fast_exp2(st.m[r] - m_new);
      beta[r] = empty ? 1.0f : sm90::fast_exp2(m_half[r] - m_new);
      shift[r] = empty ? 0.0f : m_new - kFp8Offset;
      st.m[r] = m_new;
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      exp_one(32 + i, shift);
      s[i] = __float_as_uint(__uint_as_float(s[i]) * beta[(i / 2) % 2]);
    }
  }
}

// Per-channel constants (the V scales) of the output columns one thread stores: pairs
// (c, c + 1), c = 8 n + 2 t, n < kCols; `fill` where p is null or past d. Load them before the
// first output store: a store may alias them as far as the compiler knows, so loads placed
// between stores each wait out a full load latency (docs/notes-wgmma.md, session 5: most of a
// CTA's fixed cost on H100).
template <int kCols>
__device__ __forceinline__ void load_column_pairs(const float* p, int t, int d, float fill,
                                                  float2 (&out)[kCols]) {
#pragma unroll
  for (int n = 0; n < kCols; ++n) {
    const int c = 8 * n + 2 * t;
    out[n].x = p != nullptr && c < d ? p[c] : fill;
    out[n].y = p != nullptr && c + 1 < d ? p[c + 1] : fill;
  }
}

// P as the A operand of the PV wgmma, straight from the S accumulator registers.
// fp8 (k32 steps): slot 4t+j of each 16-key group holds key {2t, 2t+1, 2t+8, 2t+9}[j], which is
// the order V^T's tokens are stored in.
__device__ __forceinline__ void pack_p_fp8(const uint32_t (&s)[64], uint32_t (&p)[16]) {
  const auto f = [](uint32_t bits) { return __uint_as_float(bits); };
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = 8 * (2 * kk + h);  // 16-key chunk
      p[4 * kk + 2 * h] = sm90::pack_e4m3x4(f(s[c + 0]), f(s[c + 1]), f(s[c + 4]), f(s[c + 5]));
      p[4 * kk + 2 * h + 1] = sm90::pack_e4m3x4(f(s[c + 2]), f(s[c + 3]), f(s[c + 6]), f(s[c + 7]));
    }
  }
}

// 16-bit (k16 steps): the accumulator layout of 16 columns is the A layout of one k16 step.
template <bool kBf16>
__device__ __forceinline__ void pack_p_16(const uint32_t (&s)[64], uint32_t (&p)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) p[i] = pack2_16bit<kBf16>(__uint_as_float(s[2 * i]), __uint_as_float(s[2 * i + 1]));
}

// ---------------------------------------------------------------------------------------------

// How the kernel holds its Params: a copy or a reference into the grid-constant struct. The
// source is the same either way, but ptxas schedules the tile loop differently. Through the
// reference it re-reads p.causal and redoes the mask test every tile. On H100 the copy makes the
// 16-bit P.V kernels 1-4 % faster and the FP8 P.V kernels at D=128 2-3 % slower, so each kind
// takes the binding that measured faster.
template <bool kCopy>
struct ParamsBinding {
  using type = const Params;
};
template <>
struct ParamsBinding<false> {
  using type = const Params&;
};

template <class T>
__global__ void __launch_bounds__(T::kThreads, 1)
    attention_kernel(const __grid_constant__ WgmmaAttnParams args) {
  const TensorMap& tm_q = args.tm_q;
  const TensorMap& tm_k = args.tm_k;
  const TensorMap& tm_v = args.tm_v;
  typename ParamsBinding<!T::kFp8PV>::type p = args.p;
  constexpr int D = T::kHeadDim;
  constexpr int S = T::kStages;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  // Shared-window addresses (32 bits, sm90::make_smem_desc says why): Q, the ones tile, the K
  // and V stages, then the mbarriers (8 bytes each; stage s of an array at + 8 * s).
  const uint32_t s_q = sm90::smem_addr(smem);
  const uint32_t s_ones = s_q + T::kQBytes;
  const uint32_t s_k = s_ones + T::kOnesBytes;
  const uint32_t s_v = s_k + S * T::kKBytes;
  const uint32_t q_full = s_v + S * T::kVBytes;
  const uint32_t k_full = q_full + 8;
  const uint32_t k_empty = k_full + 8 * S;
  const uint32_t v_full = k_empty + 8 * S;
  const uint32_t v_empty = v_full + 8 * S;
  auto at = [](uint32_t bars, int stage) { return bars + 8u * static_cast<uint32_t>(stage); };

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  // Causal: heaviest query tiles first so the last wave is made of short ones.
  const int q_tile = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / p.group_size;
  int num_tiles = (p.num_k + T::kBlockN - 1) / T::kBlockN;
  if (p.causal) num_tiles = min(num_tiles, (q_tile * T::kBlockM + T::kBlockM - 1) / T::kBlockN + 1);

  if (tid == 0) {
    sm90::mbar_init(q_full, 1);
    for (int s = 0; s < S; ++s) {
      sm90::mbar_init(at(k_full, s), 1);
      sm90::mbar_init(at(v_full, s), 1);
      // one arrival per consumer warp, after its own wgmma.wait_group
      sm90::mbar_init(at(k_empty, s), 4 * T::kConsumerWGs);
      sm90::mbar_init(at(v_empty, s), 4 * T::kConsumerWGs);
    }
  }
  {
    // The ones tile in the PV operand's type.
    uint32_t* ones = reinterpret_cast<uint32_t*>(smem + T::kQBytes);
    for (int i = tid; i < T::kOnesBytes / 4; i += T::kThreads) ones[i] = ones_word<T::kPV>();
    sm90::mbar_init_fence();  // this thread's barrier / ones writes -> async proxy
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---------------- producer ----------------
    sm90::setmaxnreg_dec<T::kProducerRegs>();
    if (tid == 0) {
      sm90::tma_prefetch_desc(&tm_q);
      sm90::tma_prefetch_desc(&tm_k);
      sm90::tma_prefetch_desc(&tm_v);
      sm90::mbar_arrive_expect_tx(q_full, T::kQBytes);
      sm90::tma_load_4d(s_q, &tm_q, q_full, 0, q_tile * T::kBlockM, head, batch);
      for (int j = 0; j < num_tiles; ++j) {
        const int stage = j % S;
        const uint32_t phase = (j / S) & 1;
        sm90::mbar_wait(at(k_empty, stage), phase ^ 1);
        sm90::mbar_arrive_expect_tx(at(k_full, stage), T::kKBytes);
        sm90::tma_load_4d(s_k + stage * T::kKBytes, &tm_k, at(k_full, stage), 0, j * T::kBlockN,
                          kv_head, batch);
        sm90::mbar_wait(at(v_empty, stage), phase ^ 1);
        sm90::mbar_arrive_expect_tx(at(v_full, stage), T::kVBytes);
        const uint32_t dst = s_v + stage * T::kVBytes;
        if constexpr (T::kFp8PV) {
          sm90::tma_load_4d(dst, &tm_v, at(v_full, stage), j * T::kBlockN, 0, kv_head, batch);
        } else {
#pragma unroll
          for (int cb = 0; cb < D / 64; ++cb)
            sm90::tma_load_4d(dst + cb * T::kVColumnBlockBytes, &tm_v, at(v_full, stage), cb * 64,
                              j * T::kBlockN, kv_head, batch);
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  sm90::setmaxnreg_inc<T::kConsumerRegs>();
  const int wg = warpgroup - 1;
  const int ltid = tid % 128;
  const int warp = ltid / 32;
  const int lane = ltid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int slice = q_tile * (T::kBlockM / 16) + wg * 4 + warp;  // 16-row slice index
  const int row0 = slice * 16 + g;                                // rows row0 and row0 + 8

  // Q scales exist for the quantizer's padding (cta_q 128 rows); a 192-row CTA's last slices
  // may lie beyond it, and hold no real row.
  const float q_dequant =
      slice * 16 < p.num_q
          ? p.q_scale[batch * p.q_scale_stride_b + head * p.q_scale_stride_h + slice * 8 + g] *
                p.scale_log2
          : 0.0f;
  const float* k_scale = p.k_scale + batch * p.k_scale_stride_b + kv_head * p.k_scale_stride_h + t;

  const uint64_t desc_q =
      sm90::make_smem_desc<T::kQKSwizzle>(s_q + wg * 64 * D, 16, 8 * T::kQKSwizzle);
  auto desc_k = [&](int stage) {
    return sm90::make_smem_desc<T::kQKSwizzle>(s_k + stage * T::kKBytes, 16, 8 * T::kQKSwizzle);
  };
  // K-major ones operand: 8 rows of 128 B; the same descriptor serves every k-step.
  const uint64_t desc_ones = sm90::make_smem_desc<128>(s_ones, 16, 1024);
  auto desc_v = [&](int stage) {
    if constexpr (T::kFp8PV)  // K-major V^T: D rows of 128 B
      return sm90::make_smem_desc<128>(s_v + stage * T::kVBytes, 16, 1024);
    else  // N-major V: 64-channel column blocks kVColumnBlockBytes apart, 8 key rows = 1024 B
      return sm90::make_smem_desc<128>(s_v + stage * T::kVBytes, T::kVColumnBlockBytes, 1024);
  };
  // One arrival per warp once this warp's wgmmas reading the stage have retired.
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(bar);
  };
  // Tiles needing a mask: the key tail, and for causal the tiles reaching past this WG's first row.
  const int wg_first_row = q_tile * T::kBlockM + wg * 64;
  auto needs_mask = [&](int j) {
    return (j + 1) * T::kBlockN > p.num_k ||
           (p.causal && (j + 1) * T::kBlockN - 1 > wg_first_row);
  };
  // Ping-pong: named barriers 1 and 2, one per consumer warpgroup.
  auto pingpong_wait = [&]() {
    if constexpr (T::kPingPong) sm90::named_bar_sync<256>(1 + wg);
  };
  auto pingpong_pass = [&]() {
    if constexpr (T::kPingPong) sm90::named_bar_arrive<256>(1 + (wg ^ 1));
  };

  uint32_t s[64];  // QK accumulator (int32 bits), then scores, then p (fp32 bits)
  float o[D / 2];
  float r[T::kPartialRegs];  // fp8 tile partial
  // Row sums of p from the ones-column wgmma: fp8, the tile's (folded into st.l like R into O);
  // 16-bit, the running sums (rescaled with O). Registers {0, 1}: row row0, {2, 3}: row0 + 8.
  float lsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  if constexpr (!T::kFreshAccumulators) {
#pragma unroll
    for (int i = 0; i < T::kPartialRegs; ++i) r[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0;
  }
  uint32_t pk[T::kFp8PV ? 16 : 32];
  RowState st;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.0f;
  float alpha[2];
  // The mask costs several instructions per score: only boundary tiles take that path.
  auto softmax = [&](int j, float dequant) {
    if (needs_mask(j))
      softmax_tile<T, true>(s, st, alpha, dequant, j * T::kBlockN, row0, p.num_k, p.causal, t);
    else
      softmax_tile<T, false>(s, st, alpha, dequant, j * T::kBlockN, row0, p.num_k, p.causal, t);
  };

  auto pack = [&]() {
    if constexpr (T::kFp8PV) pack_p_fp8(s, pk);
    else pack_p_16<T::kBf16PV>(s, pk);
  };
  auto issue_pv = [&](int stage) {
    if constexpr (T::kFp8PV) issue_pv_fp8<T>(r, lsum, pk, desc_v(stage), desc_ones);
    else issue_pv_16<T>(o, lsum, pk, desc_v(stage), desc_ones);
  };
  // fp8, after a PV tile retired: the tile's row sums into l (second level).
  auto fold_l = [&](const float (&a)[2]) {
    if constexpr (T::kFp8PV) {
      st.l[0] = fmaf(st.l[0], a[0], lsum[0]);
      st.l[1] = fmaf(st.l[1], a[1], lsum[2]);
    }
  };
  // fp8, after a PV tile retired: the tile partial into fp32 O (second level), and l.
  auto fold_pv = [&](const float (&a)[2]) {
    if constexpr (T::kFp8PV && !T::kSplitPV) {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] = fmaf(o[i], a[(i / 2) % 2], r[i]);
      fold_l(a);
    }
  };
  // 16-bit PV accumulates in O and lsum: both are rescaled before the next PV is issued.
  // Skipped when no row max of the warp moved (most tiles past the first few): alpha is then
  // exactly 1 and the skip changes no bit. +3-4 % at 4K-32K (notes, session 6).
  auto rescale_o = [&](const float (&a)[2]) {
    if constexpr (!T::kFp8PV) {
      if (!__any_sync(0xffffffffu, a[0] != 1.0f || a[1] != 1.0f)) return;
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= a[(i / 2) % 2];
#pragma unroll
      for (int i = 0; i < 4; ++i) lsum[i] *= a[i / 2];
    }
  };

  // Waits for this warpgroup's PV of `stage`, releases the stage, folds the fp8 partial with
  // the alpha of the tile that PV belongs to.
  auto retire_pv = [&](int stage, const float (&a)[2]) {
    sm90::wgmma_wait<0>();
    sm90::fence_operands(o);
    sm90::fence_operands(lsum);
    sm90::fence_operands(pk);  // P stays live (the in-flight PV reads it) until here
    if constexpr (T::kFp8PV) sm90::fence_operands(r);
    release(at(v_empty, stage));
    fold_pv(a);
  };

  if (wg == 1 && T::kPingPong) sm90::named_bar_arrive<256>(1);  // consumer 0 goes first
  sm90::mbar_wait(q_full, 0);

  if constexpr (!T::kIssueAhead) {
    for (int j = 0; j < num_tiles; ++j) {
      const int stage = j % S;
      const uint32_t phase = (j / S) & 1;
      const float dequant = q_dequant * k_scale[j * 4];
      sm90::mbar_wait(at(k_full, stage), phase);
      sm90::wgmma_fence();
      issue_qk<T>(s, desc_q, desc_k(stage));
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_operands(s);
      release(at(k_empty, stage));
      softmax(j, dequant);
      rescale_o(alpha);
      pack();
      sm90::mbar_wait(at(v_full, stage), phase);
      if constexpr (T::kSplitPV) {
        // Two N = 64 halves through one 32-register partial: O's half h is folded before
        // half h + 1 is issued.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          sm90::wgmma_fence();
          issue_pv_fp8<T>(r, lsum, pk, desc_v(stage), desc_ones, half);
          sm90::wgmma_commit();
          sm90::wgmma_wait<0>();
          sm90::fence_operands(pk);  // P stays live (the in-flight PV reads it) until here
          sm90::fence_operands(r);
          if (half == 0) {
            sm90::fence_operands(lsum);
            fold_l(alpha);
          }
#pragma unroll
          for (int i = 0; i < 32; ++i)
            o[32 * half + i] = fmaf(o[32 * half + i], alpha[(i / 2) % 2], r[i]);
        }
        release(at(v_empty, stage));
      } else {
        sm90::wgmma_fence();
        issue_pv(stage);
        sm90::wgmma_commit();
        retire_pv(stage, alpha);
      }
    }
  } else {
    // Prologue: S(0) and its softmax.
    {
      const float dequant = q_dequant * k_scale[0];
      sm90::mbar_wait(at(k_full, 0), 0);
      pingpong_wait();
      sm90::wgmma_fence();
      issue_qk<T>(s, desc_q, desc_k(0));
      sm90::wgmma_commit();
      pingpong_pass();
      sm90::wgmma_wait<0>();
      sm90::fence_operands(s);
      release(at(k_empty, 0));
      softmax(0, dequant);
      pack();
    }
    float alpha_pending[2] = {alpha[0], alpha[1]};  // alpha of the tile whose PV is in flight
    for (int j = 1; j < num_tiles; ++j) {
      const int stage = j % S;
      const uint32_t phase = (j / S) & 1;
      const int prev = (j - 1) % S;
      const uint32_t prev_phase = ((j - 1) / S) & 1;
      const float dequant = q_dequant * k_scale[j * 4];
      sm90::mbar_wait(at(k_full, stage), phase);
      sm90::mbar_wait(at(v_full, prev), prev_phase);
      pingpong_wait();
      sm90::wgmma_fence();
      issue_qk<T>(s, desc_q, desc_k(stage));
      sm90::wgmma_commit();
      issue_pv(prev);
      sm90::wgmma_commit();
      pingpong_pass();
      if constexpr (T::kIntraOverlap) {
        sm90::wgmma_wait<1>();
      } else {
        retire_pv(prev, alpha_pending);
      }
      sm90::fence_operands(s);
      release(at(k_empty, stage));
      softmax(j, dequant);
      if constexpr (T::kIntraOverlap) retire_pv(prev, alpha_pending);
      rescale_o(alpha);
      alpha_pending[0] = alpha[0];
      alpha_pending[1] = alpha[1];
      pack();
    }
    // Epilogue: PV of the last tile.
    {
      const int last = (num_tiles - 1) % S;
      sm90::mbar_wait(at(v_full, last), ((num_tiles - 1) / S) & 1);
      pingpong_wait();
      sm90::wgmma_fence();
      issue_pv(last);
      sm90::wgmma_commit();
      if (wg == 0) pingpong_pass();  // consumer 1's last pass would have no matching wait
      retire_pv(last, alpha_pending);
    }
  }
  // ---------------- epilogue: O / l (* vscale), stores straight from registers ----------------
  float inv_l[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = T::kFp8PV ? st.l[rr] : lsum[2 * rr];  // whole-row sums already
    inv_l[rr] = 1.0f / l;
    const int row = row0 + 8 * rr;
    if (p.lse != nullptr && t == 0 && row < p.num_q) {
      constexpr float kOffset = T::kFp8PV ? 8.807354922057604f : 0.0f;  // log2(448)
      p.lse[batch * p.lse_stride_b + head * p.lse_stride_h + row] =
          (st.m[rr] + __log2f(l) - kOffset) * 0.69314718055994531f;
    }
  }
  const float* v_scale = T::kFp8PV ? p.v_scale + batch * p.v_scale_stride_b +
                                         kv_head * p.v_scale_stride_h
                                   : nullptr;
  const bool out_bf16 = T::kFp8PV ? p.out_bf16 != 0 : T::kBf16PV;
  const int64_t head_offset = batch * p.o_stride_b + head * p.o_stride_h;
  float2 vs[D / 8];
  load_column_pairs(v_scale, t, p.head_dim, 1.0f, vs);
  // Output columns (8 cb + 2 t, + 1) of row row0 + 8 rr, as both store paths write them.
  auto output_pair = [&](int cb, int rr) {
    return make_float2(o[4 * cb + 2 * rr] * inv_l[rr] * vs[cb].x,
                       o[4 * cb + 2 * rr + 1] * inv_l[rr] * vs[cb].y);
  };
  // Whole 16-byte-aligned rows (the usual case): each warp stages its 16 x D outputs, 8 rows at
  // a time, in its own slice of the Q tile (read for the last time by this warpgroup's last QK,
  // which has retired) and writes them as 16-byte stores, one full row per 8 or 16 lanes.
  // Straight from the accumulator layout every instruction would write 8 rows x 16 B, and a
  // warpgroup's 32 such stores per thread took most of a CTA's 3.9 us epilogue (notes, session 5).
  if (p.out_rows16) {
    constexpr int kChunks = D / 8;               // 16-byte chunks per output row
    constexpr int kRowsPerStore = 32 / kChunks;  // rows one warp-wide 16-byte store covers
    // Chunk c of staged row r sits at chunk c ^ r: conflict-free for both access patterns.
    uint32_t* staged = reinterpret_cast<uint32_t*>(smem + (wg * 64 + warp * 16) * D);  // Q tile
    uint16_t* out = static_cast<uint16_t*>(p.out) + head_offset;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
      for (int cb = 0; cb < D / 8; ++cb) {
        const float2 y = output_pair(cb, rr);
        staged[(g * kChunks + (cb ^ g)) * 4 + t] =
            out_bf16 ? pack2_16bit<true>(y.x, y.y) : pack2_16bit<false>(y.x, y.y);
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < 8 / kRowsPerStore; ++i) {
        const int r = i * kRowsPerStore + lane / kChunks, c = lane % kChunks;
        const uint4 v = reinterpret_cast<const uint4*>(staged)[r * kChunks + (c ^ r)];
        const int row = slice * 16 + 8 * rr + r;
        if (row < p.num_q)
          *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * p.o_stride_n + c * 8) = v;
      }
      __syncwarp();  // the next pass overwrites what these lanes just read
    }
    return;
  }
#pragma unroll
  for (int cb = 0; cb < D / 8; ++cb) {
    const int col = cb * 8 + 2 * t;
    if (col >= p.head_dim) continue;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = row0 + 8 * rr;
      if (row >= p.num_q) continue;
      const float2 y = output_pair(cb, rr);
      const float y0 = y.x, y1 = y.y;
      const int64_t off = head_offset + static_cast<int64_t>(row) * p.o_stride_n + col;
      const bool both = col + 1 < p.head_dim;
      uint16_t* out = static_cast<uint16_t*>(p.out) + off;
      const uint32_t packed = out_bf16 ? pack2_16bit<true>(y0, y1) : pack2_16bit<false>(y0, y1);
      if (both && p.out_vec2) {
        *reinterpret_cast<uint32_t*>(out) = packed;
      } else {
        out[0] = static_cast<uint16_t>(packed & 0xFFFFu);
        if (both) out[1] = static_cast<uint16_t>(packed >> 16);
      }
    }
  }
}

}  // namespace sa2::wgmma_attn
