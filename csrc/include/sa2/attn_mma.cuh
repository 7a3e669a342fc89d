// The mma.sync attention kernel (sm80/86/89/120, and sm90 through emulation of INT4/FP8):
// one template, specialised by AttnMmaTraits<head dim, QK type, PV type, PV accumulator>.
//
// Inputs come from the fused quantizers (quant_kernels.cuh), all zero-padded:
//   Q_hat (B, Hq, Nq_pad, QB) and K_hat (B, Hkv, Nk_pad, QB) int8, QB = D (INT8) or D/2 (INT4,
//   low nibble = even channel), with their per-group fp32 scales (config.py groups);
//   V: FP8 V^T (B, Hkv, D, Nv_pad) in the token order of quant::v_stored_position, or the
//   16-bit V itself (any batch/head/token strides, d % 8 == 0, 16-byte aligned rows).
// Per CTA: kCtaQ query rows of one (batch, q head), kWarps warps of kWarpQ rows each; the
// K/V tiles of kKTile keys stream through cp.async (K two stages, V two or one: kVStages).
// Numerics follow
// docs/numerics.md §2-3 step by step; the comments name the steps.
#pragma once
#include "sa2/abi.cuh"
#include "sa2/mma.cuh"
#include "sa2/quant.cuh"
#include "sa2/softmax.cuh"

// Experiment switches for device A/B runs (tests/gpu/rtx_round.sh MMA_VARIANTS, through
// SAGEATTN2_NVRTC_FLAGS); each goes once a winner is measured.
#ifndef SA2_MMA_TWO_BARRIERS
#define SA2_MMA_TWO_BARRIERS 0  // 1: one V stage with two barriers per tile (V_j issued at the top of tile j)
#endif
#ifndef SA2_MMA_MIN_CTAS_D64
#define SA2_MMA_MIN_CTAS_D64 0  // 0: AttnMmaTraits decides; n: __launch_bounds__ minimum n for every D <= 64 kernel
#endif
#ifndef SA2_MMA_INT_ROW_MAX
#define SA2_MMA_INT_ROW_MAX 0  // 1: steady-state row maxima from the int32 scores (three-input integer max)
#endif
#ifndef SA2_MMA_KSCALE_AHEAD
#define SA2_MMA_KSCALE_AHEAD 0  // 1: the lane's K scale of tile j+1 is read during tile j
#endif
#ifndef SA2_MMA_TILE_UNROLL
#define SA2_MMA_TILE_UNROLL 1  // n > 1: the loop over full key tiles unrolled n times
#endif
// An explicit minimum of 1 changes ptxas's schedule at D=128: kernels that want more than one
// CTA per SM name it, the others keep the plain bound.
#define SA2_MMA_LAUNCH_BOUNDS(T) __launch_bounds__(T::kThreads, T::kMinCtasPerSm)

namespace sa2 {

#if SA2_MMA_TILE_UNROLL > 1
constexpr int kMmaTileUnroll = SA2_MMA_TILE_UNROLL;  // `#pragma unroll` takes a constant, not a macro
#endif

template <int kHeadDim_, QKType kQK_, PVType kPV_, PVAccum kAcc_ = PVAccum::kFp32>
struct AttnMmaTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr QKType kQK = kQK_;
  static constexpr PVType kPV = kPV_;
  static constexpr PVAccum kAcc = kAcc_;
  static constexpr bool kF16Acc = kAcc == PVAccum::kFp16;
  // config.tile_shape(Family.MMA, D): (128, 32, 64) up to 128, (64, 16, 64) at 256 where a
  // 32-row warp's fp32 O fragment (256 registers) would not fit.
  static constexpr int kCtaQ = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kWarpQ = kHeadDim <= 128 ? 32 : 16;
  static constexpr int kKTile = 64;
  static constexpr int kWarps = kCtaQ / kWarpQ;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = kWarpQ / 16;
  static constexpr int kSTiles = kKTile / 8;                             // n8 tiles of S
  static constexpr int kOTiles = kHeadDim / 8;                           // n8 tiles of O
  static constexpr int kQKBytes = kQK == QKType::kInt4 ? kHeadDim / 2 : kHeadDim;  // bytes per Q/K row
  static constexpr int kQKSteps = kQKBytes / 32;                         // MMAs along the head dim
  static constexpr bool kFp8PV = kPV == PVType::kFp8;
  static constexpr int kPSteps = kFp8PV ? kSTiles / 4 : kSTiles / 2;  // P fragments (PV k-steps) per m16 tile
  // P = exp2(x - m + kPLog2Max) lies in [0, 2^kPLog2Max] (config.AttnConfig.p_log2_max):
  // the E4M3 range for FP8; 2^-7 for 16-bit PV into an fp16 accumulator, so that 64 products
  // with any fp16 V stay far below 65504 (numerics.md §2.6; FP8 bounds V instead).
  static constexpr float kPLog2Max = kFp8PV ? quant::kLog2Fp8Max : kF16Acc ? -7.0f : 0.0f;
  // V tile in shared memory: V^T rows of kKTile bytes (FP8) or kKTile rows of 2*D bytes.
  static constexpr int kVRowBytes = kFp8PV ? kKTile : 2 * kHeadDim;
  static constexpr int kVRows = kFp8PV ? kHeadDim : kKTile;
  static constexpr int kKTileBytes = kKTile * kQKBytes;
  static constexpr int kVTileBytes = kVRows * kVRowBytes;
  static constexpr int kQTileBytes = kCtaQ * kQKBytes;
  // K is double-buffered, V too for FP8 and D=64. With two V stages a tile needs one barrier
  // (at its top K_j and V_j have landed, every warp is done with tile j-1, and tile j+1's K and
  // V are issued into j-1's stages); with one it needs three (K_j landed; V_j landed; every warp
  // done with V_j before V_{j+1}). Above D=64 a 16-bit V tile is 32 KB: one stage keeps a D=128
  // CTA at 48 KB (two CTAs per SM on the 100 KB sm_86/89/120) and D=256 under 99 KB; SMs with
  // 160 KB or more (archs.Arch.smem_per_sm_kb) fit two D=128 CTAs of 64 KB with two V stages.
  static constexpr bool kLargeSmem = SA2_SMEM_PER_SM_KB >= 160;
  static constexpr int kVStages = kFp8PV || kHeadDim <= 64 || (kHeadDim <= 128 && kLargeSmem) ? 2 : 1;
  static constexpr bool kOneBarrier = kVStages == 2;
  // One V stage with two barriers: the barrier at the top of tile j also says every warp is done
  // with V_{j-1}, so V_j is issued there (it still lands during QK_j and the softmax).
  static constexpr bool kTwoBarriers = SA2_MMA_TWO_BARRIERS && !kOneBarrier;
  // Three CTAs per SM for INT8 Q . K^T with 16-bit P . V into fp32 at D <= 64 (168 registers, 12 warps)
  // where the SM's shared memory holds them with room to spare: on H100 that kernel ran 7-8 %
  // faster than at two CTAs (255 registers), though it issues more instructions and spills a
  // little. GeForce SMs (100 KB) fit a third CTA only without Q smoothing, and their levels are
  // tensor-bound; INT4 spills three times as much. Neither was measured, nor the fp16
  // accumulator, so none of them takes it.
  static constexpr int kMinCtasPerSm =
      kHeadDim > 64                ? 0
      : SA2_MMA_MIN_CTAS_D64 > 0   ? SA2_MMA_MIN_CTAS_D64
      : kLargeSmem && !kFp8PV && !kF16Acc && kQK == QKType::kInt8 ? 3
                                   : 0;
  // The exponentials after O's rescale, in one basic block with P . V, so that those of the
  // second m16 tile overlap the first one's MMAs. FP8 P . V at D >= 128 keeps them before the rescale:
  // there the overlap makes ptxas spill on sm_89/sm_120 (4-8 spill loads per tile).
  static constexpr bool kExpWithPV = !(kFp8PV && kHeadDim >= 128);
  // The row sums l from the tensor cores (P against a ones column: 2 * kMTiles MMAs per 16 keys
  // instead of a FADD per score) where fp32-accumulating 16-bit MMAs run at full rate
  // (archs.Arch.fp32_accum_full_rate); l then sums P as rounded for P . V (numerics.md step 5).
  static constexpr bool kRowSumsByMma = SA2_FP32_ACCUM_FULL_RATE && !kFp8PV && !kF16Acc;
  // Row maxima of unmasked tiles without Q smoothing taken on the int32 scores
  // (softmax::lane_row_max): the same maxima in fewer instructions where the integer max takes
  // three inputs (sm_90: VIMNMX3; its float max takes two).
  static constexpr bool kIntRowMax = SA2_MMA_INT_ROW_MAX;
  // The lane's K scale of tile j+1 read at tile j, so that its load latency has a whole tile.
  static constexpr bool kKScaleAhead = SA2_MMA_KSCALE_AHEAD;
  // Q stays in shared memory and is re-read per tile: holding it in registers (32 per lane)
  // on top of O (128) and S (64) made ptxas spill at D=128.
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQTileBytes;
  static constexpr int kVOffset = kKOffset + 2 * kKTileBytes;
  static constexpr int kQbarOffset = kVOffset + kVStages * kVTileBytes;  // per-warp q-bar (INT8)
  static constexpr int kDsOffset = kQbarOffset + kWarps * kHeadDim;      // per-warp Delta-S row
  static constexpr int kSmemBytes = kDsOffset + kWarps * kKTile * 4;  // with Q smoothing; kQbarOffset without

  static_assert(kQKBytes % 32 == 0, "head dim must fill whole QK k-steps");
  static_assert(kWarpQ % 16 == 0 && kCtaQ % kWarpQ == 0, "warp rows are whole m16 tiles");
  static_assert(kOTiles % 2 == 0 && kSTiles % 4 == 0, "fragments are loaded in pairs");
  static_assert(kSmemBytes <= 99 * 1024, "must fit the 99 KB of sm_86/89/120");
  static_assert(!kF16Acc || kPV != PVType::kBf16, "an fp16 accumulator takes fp16 or FP8 operands, not bf16");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kRowBytes-byte rows,
// XOR-swizzled so that the 8 row addresses of one ldmatrix (same chunk, 8 consecutive rows)
// fall in 8 different 16-byte bank groups.
template <int kRowBytes>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  constexpr int kChunks = kRowBytes / 16;
  static_assert(kChunks >= 2 && (kChunks & (kChunks - 1)) == 0, "row must be a power-of-two number of chunks");
  if constexpr (kChunks >= 8) {
    return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
  } else {
    constexpr int kRowsPerLine = 8 / kChunks;  // rows sharing one 128-byte line
    return row * kRowBytes + ((chunk ^ ((row / kRowsPerLine) & (kChunks - 1))) << 4);
  }
}

// Per-lane part of the swizzled ldmatrix addresses into one tile. A lane's row is
// row_base + lane_row (row_base a compile-time multiple of 8, lane_row < 16) and its chunk is
// an even compile-time chunk plus lane_chunk (0/1). Since row_base % 8 == 0 the XOR term
// depends on the lane only: ((even | lane_chunk) ^ f(row)) == even ^ x with x = lane_chunk ^
// f(lane_row), so every address is row offset + ((even ^ x) << 4) + an immediate.
// The tile loop rebuilds these from %laneid (volatile, so the compiler cannot hoist them
// out of the loop and hold them in registers across it; 2 instructions per tile).
__device__ __forceinline__ int lane_id_in_loop() {
  int lane;
  asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(lane));
  return lane;
}

__device__ __forceinline__ int thread_id_in_loop() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  return tid;
}

template <int kRowBytes>
struct FragOffsets {
  uint32_t row_off;  // lane_row * kRowBytes
  uint32_t x16;      // x << 4

  __device__ __forceinline__ FragOffsets(int lane_row, int lane_chunk)
      : row_off(lane_row * kRowBytes),
        x16(static_cast<uint32_t>(swizzle<kRowBytes>(lane_row, lane_chunk) - lane_row * kRowBytes)) {}
  // Byte offset of (row_base + lane_row, even_chunk + lane_chunk).
  __device__ __forceinline__ uint32_t at(int row_base, int even_chunk) const {
    return row_off + ((static_cast<uint32_t>(even_chunk & 7) << 4) ^ x16) + row_base * kRowBytes +
           (even_chunk & ~7) * 16;
  }
};

// Lane parts of the ldmatrix addresses of one key tile. Q (A operand): matrices = rows 0-7/8-15 x
// chunk 0/1. K and FP8 V^T (B operands, rows = keys / channels): rows 0-7 x chunk 0/1, then rows
// 8-15. 16-bit V (B operand through .trans, rows = keys): keys 0-7/8-15 x channel chunk 0/1.
template <class T>
struct MmaTileOffsets {
  FragOffsets<T::kQKBytes> q, k;
  FragOffsets<T::kVRowBytes> v;
  __device__ __forceinline__ explicit MmaTileOffsets(int ln)
      : q(ln & 15, ln >> 4),
        k((ln & 7) + (ln >> 4) * 8, (ln >> 3) & 1),
        v(T::kFp8PV ? FragOffsets<T::kVRowBytes>((ln & 7) + (ln >> 4) * 8, (ln >> 3) & 1)
                    : FragOffsets<T::kVRowBytes>((ln & 7) + ((ln >> 3) & 1) * 8, ln >> 4)) {}
};

// Copies kRows rows of kRowBytes bytes (global rows `src_stride` bytes apart) into a swizzled
// shared tile; rows >= valid_rows and chunks >= valid_chunks are zero-filled. A thread copies
// one chunk column, every kRowsPerPass-th row; where kRowsPerPass is a multiple of 8 (the period
// of the swizzle) its shared offsets differ by constants, so the index arithmetic runs once per
// tile, not once per chunk. Offsets inside one tile fit in 32 bits (a tile is < 2^31 bytes of
// its source); the thread index comes from thread_id_in_loop() so ptxas recomputes them per
// tile instead of keeping hoisted registers alive through the main loop.
// kAllRows (every row of the tile is valid: K and FP8 V^T, which are padded, and 16-bit V
// before its last tile) drops the per-row tests, and the source of row pass `it` is one 64-bit
// multiply-add from the thread's first row (an immediate offset where the stride is a
// compile-time constant) instead of a bounds-selected 32-bit offset widened per chunk.
template <int kRowBytes, int kRows, int kThreads, bool kAllRows = false>
__device__ __forceinline__ void load_tile_async(uint8_t* dst, const uint8_t* src, int64_t src_stride, int valid_rows,
                                                int valid_chunks) {
  constexpr int kChunks = kRowBytes / 16;
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowsPerPass == 0, "every thread copies one chunk column");
  const uint32_t tid = static_cast<uint32_t>(thread_id_in_loop()) % kThreads;
  const int row0 = static_cast<int>(tid / kChunks), chunk = static_cast<int>(tid % kChunks);
  const uint32_t dst_addr = mma::smem_addr(dst);
  const uint32_t dst0 = dst_addr + swizzle<kRowBytes>(row0, chunk);
  const int stride = static_cast<int>(src_stride);
  const bool chunk_valid = chunk < valid_chunks;
  // A chunk past valid_chunks reads nothing but still needs a mapped address: its row's first.
  const uint8_t* row0_src =
      kAllRows ? src + (static_cast<int64_t>(row0) * stride + (chunk_valid ? chunk * 16 : 0)) : src;
#pragma unroll
  for (int it = 0; it < kRows / kRowsPerPass; ++it) {
    const int row = row0 + it * kRowsPerPass;
    const bool valid = chunk_valid && (kAllRows || row < valid_rows);
    const uint8_t* p = kAllRows ? row0_src + static_cast<int64_t>(kRowsPerPass * stride) * it
                                : src + (valid ? static_cast<uint32_t>(row * stride + chunk * 16) : 0u);
    const uint32_t d = kRowsPerPass % 8 == 0 ? dst0 + it * kRowsPerPass * kRowBytes
                                             : dst_addr + swizzle<kRowBytes>(row, chunk);
    mma::cp_async_16(d, p, valid);
  }
}

template <class T>
__global__ void SA2_MMA_LAUNCH_BOUNDS(T) attn_mma_kernel(const MmaAttnParams a) {
  using namespace sa2::mma;
  constexpr int M = T::kMTiles, NS = T::kSTiles, NO = T::kOTiles, QB = T::kQKBytes;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* q_smem = smem + T::kQOffset;
  const uint32_t q_addr = smem_addr(q_smem);
  uint8_t* k_smem = smem + T::kKOffset;  // stage s at + s * kKTileBytes
  uint8_t* v_smem = smem + T::kVOffset;  // stage s at + s * kVTileBytes
  int8_t* qbar_smem = reinterpret_cast<int8_t*>(smem + T::kQbarOffset);
  float* ds_smem = reinterpret_cast<float*>(smem + T::kDsOffset);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const bool causal = a.causal != 0;
  // Causal CTAs with more rows do more work: start them first.
  const int q_block = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / static_cast<int>(a.heads_q / a.heads_kv);  // GQA: no K/V copies
  const int64_t bh = static_cast<int64_t>(batch) * a.heads_q + head;
  const int64_t bkv = static_cast<int64_t>(batch) * a.heads_kv + kv_head;
  const int row0 = q_block * T::kCtaQ;            // first query row of the CTA
  const int warp_row0 = row0 + warp * T::kWarpQ;  // first query row of this warp
  const int nq = static_cast<int>(a.nq), nk = static_cast<int>(a.nk);

  // ---- Q tile -> shared memory (its own commit group, completed with K0).
  const uint8_t* q_src = static_cast<const uint8_t*>(a.q) + (bh * a.nq_pad + row0) * QB;
  load_tile_async<QB, T::kCtaQ, T::kThreads>(q_smem, q_src, QB, T::kCtaQ, QB / 16);
  cp_async_commit();

  // Q smoothing: this warp's q-bar block (every warp lies inside one q_mean_rows block).
  const bool smooth_q = a.smooth_q != 0;
  float qbar_scale = 0.0f;
  if (smooth_q) {
    const int qbar_blocks = static_cast<int>(a.nq_pad / a.q_mean_rows);
    const int64_t block = bh * qbar_blocks + warp_row0 / a.q_mean_rows;
    const int8_t* src = static_cast<const int8_t*>(a.qbar) + block * T::kHeadDim;
    int8_t* dst = qbar_smem + warp * T::kHeadDim;
    for (int c = lane; c < T::kHeadDim; c += 32) {
      // INT4 K is unpacked as even/odd channel halves: store q-bar split the same way.
      const int pos = T::kQK == QKType::kInt4 ? (c & 1) * (T::kHeadDim / 2) + c / 2 : c;
      dst[pos] = src[c];
    }
    qbar_scale = static_cast<const float*>(a.qbar_scale)[block];
  }

  // Scale groups (config.q_group_of_row / k_group_of_key): one Q scale per lane for any
  // granularity, since a lane's rows {g, g+8, ...} of its warp slice share one group.
  const int gran = static_cast<int>(a.granularity);
  const int q_groups = static_cast<int>(a.nq_pad / T::kCtaQ) *
                       (gran == kPerBlock ? 1 : (T::kCtaQ / T::kWarpQ) * (gran == kPerThread ? 8 : 1));
  const int q_group = gran == kPerBlock ? q_block
                      : gran == kPerWarp ? warp_row0 / T::kWarpQ
                                         : (warp_row0 / T::kWarpQ) * 8 + g;
  const float q_scale = static_cast<const float*>(a.q_scale)[bh * q_groups + q_group];
  const int k_groups_per_tile = gran == kPerThread ? 4 : 1;
  const int k_groups = static_cast<int>(a.nk_pad / T::kKTile) * k_groups_per_tile;
  const float* k_scale = static_cast<const float*>(a.k_scale) + bkv * k_groups;
  const float c_log2 = static_cast<float>(a.sm_scale) * quant::kLog2e;

  // ---- K/V tile loaders.
  const uint8_t* k_src = static_cast<const uint8_t*>(a.k) + bkv * a.nk_pad * QB;
  auto load_k = [&](int tile, int stage) {
    load_tile_async<QB, T::kKTile, T::kThreads, true>(k_smem + stage * T::kKTileBytes,
                                                     k_src + static_cast<int64_t>(tile) * T::kKTile * QB, QB, T::kKTile,
                                                     QB / 16);
  };
  auto load_v = [&](int tile, int stage) {
    if constexpr (T::kFp8PV) {
      const uint8_t* src = static_cast<const uint8_t*>(a.v) + bkv * T::kHeadDim * a.v_pad +
                           static_cast<int64_t>(tile) * T::kKTile;
      load_tile_async<T::kVRowBytes, T::kVRows, T::kThreads, true>(v_smem + stage * T::kVTileBytes, src, a.v_pad,
                                                                  T::kVRows, T::kVRowBytes / 16);
    } else {
      const int key0 = tile * T::kKTile;
      const uint8_t* src = static_cast<const uint8_t*>(a.v) +
                           2 * (batch * a.v_stride_b + kv_head * a.v_stride_h + key0 * a.v_stride_n);
      uint8_t* dst = v_smem + stage * T::kVTileBytes;
      const int chunks = static_cast<int>((a.head_dim + 7) / 8);
      if (key0 + T::kKTile <= nk) {
        load_tile_async<T::kVRowBytes, T::kVRows, T::kThreads, true>(dst, src, 2 * a.v_stride_n, T::kVRows, chunks);
      } else {
        load_tile_async<T::kVRowBytes, T::kVRows, T::kThreads>(dst, src, 2 * a.v_stride_n, nk - key0, chunks);
      }
    }
  };

  const int k_tiles_all = (nk + T::kKTile - 1) / T::kKTile;
  // Causal (top-left): the CTA's last row sees keys up to row0 + kCtaQ - 1.
  const int k_tiles = causal ? min(k_tiles_all, (row0 + T::kCtaQ + T::kKTile - 1) / T::kKTile) : k_tiles_all;

  float o[M][NO][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][n][e] = 0.0f;
  softmax::RowState<M> rows;
  rows.init();
  // kRowSumsByMma: l as an m16n8 accumulator of P . ones; every column holds the row sum, so a
  // lane has row g's in elements 0-1 and row g+8's in 2-3.
  float l_frag[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) l_frag[m][e] = 0.0f;
  constexpr float kPOffset = T::kPLog2Max;

  // Commit order K0, V0, K1, V1, ... With three barriers: at the top of tile j wait_group 1
  // leaves only V_j in flight; after K_{j+1} is issued, wait_group 1 leaves only K_{j+1}.
  // With one: at the top of tile j wait_group 0 (K_j, V_j), then K_{j+1} and V_{j+1} go out.
  // With two: at the top of tile j wait_group 0 (K_j), V_j goes out; before P . V wait_group 1
  // leaves only K_{j+1}.
  load_k(0, 0);
  cp_async_commit();
  if constexpr (!T::kTwoBarriers) {
    load_v(0, 0);
    cp_async_commit();
  }

  // The parts of one key tile j, in the order the math runs them: scores (QK), softmax into P
  // (and O's rescale), O += P . V. Each reads its K or V stage `j & 1`. Their array parameters
  // are spelled with the traits (T::kMTiles, ...): NVRTC 13.0's front end crashes on local
  // constexprs in the parameter types of lambdas.
  using TileOffsets = MmaTileOffsets<T>;
  constexpr int kPSteps = T::kPSteps;

  // Step 2's Delta-S = q-bar_hat . K_hat^T on CUDA cores, per warp for its q-bar block, folded
  // with its scales into one additive term per key (ds_smem). Reads K_j from shared memory.
  auto delta_s = [&](const int j) {
    const uint8_t* ks_tile = k_smem + (j & 1) * T::kKTileBytes;
    const int8_t* qb = qbar_smem + warp * T::kHeadDim;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = lane + 32 * half;
      int acc = 0;
#pragma unroll
      for (int ch = 0; ch < QB / 16; ++ch) {
        const uint4 kv = *reinterpret_cast<const uint4*>(ks_tile + swizzle<QB>(key, ch));
        const uint32_t kw[4] = {kv.x, kv.y, kv.z, kv.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          if constexpr (T::kQK == QKType::kInt8) {
            acc = __dp4a(static_cast<int>(kw[w]), *reinterpret_cast<const int*>(qb + ch * 16 + w * 4), acc);
          } else {
            // 8 nibbles = channels 8i..8i+7, i = 4ch + w. Each nibble moved to the top of its
            // byte reads as 16x its value: even channels from the low nibbles, odd from the high.
            const int i = ch * 4 + w;
            const int even = static_cast<int>((kw[w] << 4) & 0xF0F0F0F0u);
            const int odd = static_cast<int>(kw[w] & 0xF0F0F0F0u);
            acc = __dp4a(even, *reinterpret_cast<const int*>(qb + i * 4), acc);
            acc = __dp4a(odd, *reinterpret_cast<const int*>(qb + T::kHeadDim / 2 + i * 4), acc);
          }
        }
      }
      if constexpr (T::kQK == QKType::kInt4) acc >>= 4;  // exact: every term was a multiple of 16
      const float ks = k_scale[j * k_groups_per_tile + (gran == kPerThread ? (key % 8) / 2 : 0)];
      ds_smem[warp * T::kKTile + key] = static_cast<float>(acc) * (qbar_scale * ks * c_log2);
    }
    __syncwarp();
  };

  // Step 1: S = Q_hat . K_hat^T in int32, every m16 row tile of the warp at once: each K
  // fragment is read from shared memory once and feeds kMTiles MMAs.
  auto qk = [&](const int j, const TileOffsets& off, int32_t (&s)[T::kMTiles][T::kSTiles][4]) {
    const uint32_t ks_addr = smem_addr(k_smem + (j & 1) * T::kKTileBytes);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[m][n][e] = 0;
#pragma unroll
    for (int ks = 0; ks < T::kQKSteps; ++ks) {
      uint32_t q_frag[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m) ldmatrix_x4(q_frag[m], q_addr + off.q.at(warp * T::kWarpQ + m * 16, ks * 2));
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, ks_addr + off.k.at(np * 16, ks * 2));
#pragma unroll
        for (int m = 0; m < M; ++m) {
          mma_qk<T::kQK>(s[m][2 * np], q_frag[m], b[0], b[1]);
          mma_qk<T::kQK>(s[m][2 * np + 1], q_frag[m], b[2], b[3]);
        }
      }
    }
  };

  // Steps 2-5 on the warp's score tile, in two parts so that O's rescale can sit between them
  // and the exponentials of the second m16 row tile can overlap the first one's P . V MMAs:
  // - logits_and_max: steps 2-3 (logits into x, the new row maxima, alpha for O and l);
  // - probabilities: steps 4-5 (x -> P, the row sums) and P as A fragments of the PV MMA. FP8
  //   (k32): a step covers S tiles 4kk..4kk+3, in the order V^T is stored in
  //   (quant::v_stored_position). 16-bit (k16): S tiles 2kk, 2kk+1.
  // kMasked and kExactLogits (BoolConstants) compile one body per case:
  // - kMasked: only tiles that hold keys past nk or (causal) past a row of the CTA need the
  //   per-key mask (~3 instructions per score of predicated compares and selects).
  // - kExactLogits: with Q smoothing (Delta-S term) or c <= 0 the logits are finished before the
  //   softmax; otherwise the dequantization factor is left to the softmax's FFMA.
  // `kscale_lane` is this lane's K scale of tile j (read before the QK MMAs, whose ldmatrix
  // would otherwise keep the load from being issued early). Returns the factor that turns x
  // into logits.
  auto lane_k_scale = [&](const int j) { return k_scale[j * k_groups_per_tile + (gran == kPerThread ? t : 0)]; };
  // kKScaleAhead: this lane's K scale of the next tile to run.
  float kscale_ahead = T::kKScaleAhead ? lane_k_scale(0) : 0.0f;
  auto logits_and_max = [&](const int j, const float kscale_lane, const int32_t (&s)[T::kMTiles][T::kSTiles][4],
                            float (&x)[T::kMTiles][T::kSTiles][4], float (&alpha)[T::kMTiles][2], auto masked,
                            auto exact_logits) {
    constexpr bool kMasked = decltype(masked)::value;
    constexpr bool kExactLogits = decltype(exact_logits)::value;
    const float s_to_x = q_scale * kscale_lane * c_log2;
    const int key0 = j * T::kKTile;
    const bool need_mask = kMasked && (key0 + T::kKTile > nk || (causal && key0 + T::kKTile - 1 > warp_row0));
#pragma unroll
    for (int m = 0; m < M; ++m) {
      // Step 2: logits = s * (qscale * kscale * c) [+ Delta-S term], masked keys -> -inf. In the
      // steady state the factor is left to the softmax's FFMA: x = s, scale = s_to_x (c > 0, so
      // the row max of x * scale is (max x) * scale). kExactLogits: x is the finished logit and
      // scale = 1.
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[m][n][e] = static_cast<float>(s[m][n][e]);
      if constexpr (kExactLogits) {
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            x[m][n][e] = fmaf(x[m][n][e], s_to_x, smooth_q ? ds_smem[warp * T::kKTile + n * 8 + 2 * t + (e & 1)] : 0.0f);
      }
      if constexpr (kMasked) {
        if (need_mask) {
#pragma unroll
          for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = key0 + n * 8 + 2 * t + (e & 1);
              const int row = warp_row0 + m * 16 + g + (e >> 1) * 8;
              if (key >= nk || (causal && key > row)) x[m][n][e] = -INFINITY;
            }
        }
      }
      // Step 3, in base 2.
      if constexpr (kMasked || kExactLogits || !T::kIntRowMax) {
        softmax::update_row_max<NS>(x[m], kExactLogits ? 1.0f : s_to_x, rows.max[m], alpha[m]);
      } else {
        softmax::update_row_max<NS>(s[m], s_to_x, rows.max[m], alpha[m]);
      }
    }
    return kExactLogits ? 1.0f : s_to_x;
  };
  auto probabilities = [&](float (&x)[T::kMTiles][T::kSTiles][4], const float x_scale,
                           const float (&alpha)[T::kMTiles][2], uint32_t (&p_frag)[T::kMTiles][T::kPSteps][4]) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      softmax::exp_and_sum<NS, !T::kRowSumsByMma>(x[m], x_scale, rows.max[m], kPOffset, alpha[m], rows.sum_part[m]);
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
        if constexpr (T::kFp8PV) {
          const int n0 = 4 * kk;
          p_frag[m][kk][0] = pack_e4m3x4(x[m][n0][0], x[m][n0][1], x[m][n0 + 1][0], x[m][n0 + 1][1]);
          p_frag[m][kk][1] = pack_e4m3x4(x[m][n0][2], x[m][n0][3], x[m][n0 + 1][2], x[m][n0 + 1][3]);
          p_frag[m][kk][2] = pack_e4m3x4(x[m][n0 + 2][0], x[m][n0 + 2][1], x[m][n0 + 3][0], x[m][n0 + 3][1]);
          p_frag[m][kk][3] = pack_e4m3x4(x[m][n0 + 2][2], x[m][n0 + 2][3], x[m][n0 + 3][2], x[m][n0 + 3][3]);
        } else {
          // P rounded to the input dtype.
          p_frag[m][kk][0] = pack_16bit<T::kPV>(x[m][2 * kk][0], x[m][2 * kk][1]);
          p_frag[m][kk][1] = pack_16bit<T::kPV>(x[m][2 * kk][2], x[m][2 * kk][3]);
          p_frag[m][kk][2] = pack_16bit<T::kPV>(x[m][2 * kk + 1][0], x[m][2 * kk + 1][1]);
          p_frag[m][kk][3] = pack_16bit<T::kPV>(x[m][2 * kk + 1][2], x[m][2 * kk + 1][3]);
        }
      }
    }
  };

  // Rescale O (and l from the MMA) only when a row max of the warp moved (alpha == 1 makes it
  // the identity): once the maxima settle, most tiles skip these 4 * M * NO multiplies.
  auto rescale_o = [&](const float (&alpha)[T::kMTiles][2]) {
    bool moved = false;
#pragma unroll
    for (int m = 0; m < M; ++m) moved |= alpha[m][0] != 1.0f || alpha[m][1] != 1.0f;
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          o[m][n][0] *= alpha[m][0];
          o[m][n][1] *= alpha[m][0];
          o[m][n][2] *= alpha[m][1];
          o[m][n][3] *= alpha[m][1];
        }
      if constexpr (T::kRowSumsByMma) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e) l_frag[m][e] *= alpha[m][e >> 1];
      }
    }
  };

  // Step 6: O += P . V with V_j from stage j % kVStages.
  auto pv = [&](const int j, const TileOffsets& off, const uint32_t (&p_frag)[T::kMTiles][T::kPSteps][4]) {
    const uint32_t vs_addr = smem_addr(v_smem + ((j & 1) % T::kVStages) * T::kVTileBytes);
    const FragOffsets<T::kVRowBytes>& v_offsets = off.v;
    if constexpr (T::kFp8PV) {
#if SA2_HAS_FP8_MMA
      // Two-level accumulation: R = P_hat . V_hat over this tile from zero, then O += R in fp32.
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        uint32_t b[NS / 4][4];
#pragma unroll
        for (int kk = 0; kk < NS / 4; ++kk) {
          ldmatrix_x4(b[kk], vs_addr + v_offsets.at(np * 16, kk * 2));
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if constexpr (T::kF16Acc) {
            // fp16 tile accumulator (|P_hat| <= 448, |V_hat| <= 2: cannot overflow).
            uint32_t r0[2] = {0u, 0u}, r1[2] = {0u, 0u};
#pragma unroll
            for (int kk = 0; kk < NS / 4; ++kk) {
              mma_pv_e4m3_f16acc(r0, p_frag[m][kk], b[kk][0], b[kk][1]);
              mma_pv_e4m3_f16acc(r1, p_frag[m][kk], b[kk][2], b[kk][3]);
            }
            add_f16_fragment(o[m][2 * np], r0);
            add_f16_fragment(o[m][2 * np + 1], r1);
          } else {
            float r0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, r1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int kk = 0; kk < NS / 4; ++kk) {
              mma_pv_e4m3(r0, p_frag[m][kk], b[kk][0], b[kk][1]);
              mma_pv_e4m3(r1, p_frag[m][kk], b[kk][2], b[kk][3]);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              o[m][2 * np][e] += r0[e];
              o[m][2 * np + 1][e] += r1[e];
            }
          }
        }
      }
#endif
    } else if constexpr (T::kF16Acc) {
      // fp16 tile accumulator per 16 channels (P <= 2^-7: cannot overflow), then into fp32 O.
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        uint32_t r[M][2][2];
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int i = 0; i < 2; ++i) r[m][i][0] = r[m][i][1] = 0u;
#pragma unroll
        for (int kk = 0; kk < NS / 2; ++kk) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vs_addr + v_offsets.at(kk * 16, np * 2));
#pragma unroll
          for (int m = 0; m < M; ++m) {
            mma_pv16_f16acc(r[m][0], p_frag[m][kk], b[0], b[1]);
            mma_pv16_f16acc(r[m][1], p_frag[m][kk], b[2], b[3]);
          }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          add_f16_fragment(o[m][2 * np], r[m][0]);
          add_f16_fragment(o[m][2 * np + 1], r[m][1]);
        }
      }
    } else {
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
#pragma unroll
        for (int kk = 0; kk < NS / 2; ++kk) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vs_addr + v_offsets.at(kk * 16, np * 2));
#pragma unroll
          for (int m = 0; m < M; ++m) {
            mma_pv16<T::kPV>(o[m][2 * np], p_frag[m][kk], b[0], b[1]);
            mma_pv16<T::kPV>(o[m][2 * np + 1], p_frag[m][kk], b[2], b[3]);
          }
        }
      }
      if constexpr (T::kRowSumsByMma) {
        constexpr uint32_t kOnes = ones_word<T::kPV>();
#pragma unroll
        for (int kk = 0; kk < kPSteps; ++kk)
#pragma unroll
          for (int m = 0; m < M; ++m) mma_pv16<T::kPV>(l_frag[m], p_frag[m][kk], kOnes, kOnes);
      }
    }
  };

  // One key tile, every part in order (the sequential schedule).
  auto key_tile = [&](const int j, auto masked, auto exact_logits) {
    constexpr bool kExactLogits = decltype(exact_logits)::value;
    const int stage = j & 1;
    if constexpr (T::kOneBarrier) {
      cp_async_wait<0>();
      __syncthreads();
      if (j + 1 < k_tiles) {
        load_k(j + 1, stage ^ 1);
        load_v(j + 1, stage ^ 1);
      }
      cp_async_commit();
      // Causal: a warp whose rows all lie above the tile's first key has nothing to add (the
      // CTA's loads and barriers above still need it). The early exit also moves ptxas's
      // schedule of the unmasked loop, so it is only where that was measured or checked: with
      // 16-bit P . V at D=128 (H100 +1..3 %). At D <= 64 the kernel lost 2-3 % on H100; with
      // FP8 P . V ptxas spills on sm_89 (25 local accesses per tile at D=128).
      if constexpr (decltype(masked)::value && T::kHeadDim > 64 && !T::kFp8PV) {
        if (causal && j * T::kKTile > warp_row0 + T::kWarpQ - 1) return;
      }
    } else if constexpr (T::kTwoBarriers) {
      cp_async_wait<0>();
      __syncthreads();
      load_v(j, 0);
      cp_async_commit();
    } else {
      cp_async_wait<1>();
      __syncthreads();
    }
    const TileOffsets off(lane_id_in_loop());
    if (kExactLogits && smooth_q) delta_s(j);
    float kscale;
    if constexpr (T::kKScaleAhead) {
      // A warp that left a causal tile early above leaves every later one too, so the scale it
      // skipped reading is never used.
      kscale = kscale_ahead;
      if (j + 1 < k_tiles) kscale_ahead = lane_k_scale(j + 1);
    } else {
      kscale = lane_k_scale(j);
    }
    int32_t s[M][NS][4];
    qk(j, off, s);
    float x[M][NS][4];
    float alpha[M][2];
    const float x_scale = logits_and_max(j, kscale, s, x, alpha, masked, exact_logits);
    uint32_t p_frag[M][kPSteps][4];
    if constexpr (!T::kExpWithPV) probabilities(x, x_scale, alpha, p_frag);
    if constexpr (!T::kOneBarrier) {
      // The next K tile streams in during P . V.
      if (j + 1 < k_tiles) load_k(j + 1, stage ^ 1);
      cp_async_commit();
    }
    rescale_o(alpha);
    if constexpr (!T::kOneBarrier) {
      cp_async_wait<1>();
      __syncthreads();
    }
    if constexpr (T::kExpWithPV) probabilities(x, x_scale, alpha, p_frag);  // one basic block with P . V
    pv(j, off, p_frag);
    if constexpr (!T::kOneBarrier && !T::kTwoBarriers) {
      if constexpr (T::kVStages == 1) __syncthreads();  // every warp is done with the one V buffer
      if (j + 1 < k_tiles) load_v(j + 1, (stage ^ 1) % T::kVStages);
      cp_async_commit();
    }
  };
  // Tiles every row of the CTA sees in full: all keys < nk and (causal) key0 + kKTile - 1 <= row0.
  const int full_tiles = min(k_tiles, causal ? min(nk / T::kKTile, (row0 + 1) / T::kKTile) : nk / T::kKTile);

  auto key_tiles = [&](auto exact_logits) {
#if SA2_MMA_TILE_UNROLL > 1
#pragma unroll kMmaTileUnroll
#endif
    for (int j = 0; j < full_tiles; ++j) key_tile(j, BoolConstant<false>{}, exact_logits);
    for (int j = full_tiles; j < k_tiles; ++j) key_tile(j, BoolConstant<true>{}, exact_logits);
  };
  if (smooth_q || !(c_log2 > 0.0f)) {
    key_tiles(BoolConstant<true>{});
  } else {
    key_tiles(BoolConstant<false>{});
  }
  cp_async_wait<0>();

  // ---- Epilogue (§3): O / l (* vscale) + vbar in the caller's dtype and layout; lse.
  const int d = static_cast<int>(a.head_dim);
  const float* v_scale = T::kFp8PV ? static_cast<const float*>(a.v_scale) + bkv * T::kHeadDim : nullptr;
  const float* v_mean = a.v_mean ? static_cast<const float*>(a.v_mean) + bkv * T::kHeadDim : nullptr;
  const bool out_bf16 = a.out_bf16 != 0;
  const bool paired_store = (d % 2 == 0) && (a.o_stride_n % 2 == 0) && (a.o_stride_h % 2 == 0) &&
                            (a.o_stride_b % 2 == 0) && (reinterpret_cast<uintptr_t>(a.out) % 4 == 0);
  uint16_t* out = static_cast<uint16_t*>(a.out) + batch * a.o_stride_b + head * a.o_stride_h;
  // The per-channel V scale and mean, staged once per CTA in shared memory: read from global
  // memory between the output stores (which may alias them for the compiler), every column
  // pair waits out a load latency; held in registers they add spills here.
  float* vcol = reinterpret_cast<float*>(k_smem);  // [0, D): V scale, [D, 2D): V mean
  __syncthreads();                                 // every warp is done with the K/V tiles
  for (int i = threadIdx.x; i < T::kHeadDim; i += T::kThreads) {
    vcol[i] = v_scale != nullptr ? v_scale[i] : 1.0f;
    vcol[T::kHeadDim + i] = v_mean != nullptr ? v_mean[i] : 0.0f;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = T::kRowSumsByMma ? l_frag[m][2 * h] : softmax::quad_sum(rows.sum_part[m][h]);
      const int row = warp_row0 + m * 16 + g + 8 * h;
      if (row >= nq) continue;
      const float inv_l = 1.0f / l;
      uint16_t* out_row = out + row * a.o_stride_n;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        const int c = n * 8 + 2 * t;
        if (c >= d) continue;
        float v0 = o[m][n][2 * h] * inv_l, v1 = o[m][n][2 * h + 1] * inv_l;
        if constexpr (T::kFp8PV) {
          v0 *= vcol[c];
          v1 *= vcol[c + 1];
        }
        if (v_mean) {
          v0 += vcol[T::kHeadDim + c];
          v1 += vcol[T::kHeadDim + c + 1];
        }
        const uint32_t packed = out_bf16 ? pack_16bit<PVType::kBf16>(v0, v1) : pack_16bit<PVType::kFp16>(v0, v1);
        if (paired_store) {
          *reinterpret_cast<uint32_t*>(out_row + c) = packed;
        } else {
          out_row[c] = static_cast<uint16_t>(packed & 0xFFFFu);
          if (c + 1 < d) out_row[c + 1] = static_cast<uint16_t>(packed >> 16);
        }
      }
      if (a.lse && t == 0) {
        // lse = (m + log2 l - kPLog2Max) ln 2 + sm_scale (q . kbar).
        float lse2 = rows.max[m][h] + log2f(l) - kPOffset;
        float lse = lse2 * quant::kLn2;
        if (a.q_dot_kbar)
          lse += static_cast<float>(a.sm_scale) * static_cast<const float*>(a.q_dot_kbar)[bh * a.nq_pad + row];
        static_cast<float*>(a.lse)[bh * nq + row] = lse;
      }
    }
}

}  // namespace sa2
