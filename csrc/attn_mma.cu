// SA2_FAMILIES: mma
// SA2_SHARDS: 6
// The mma.sync attention family: the instantiation list, and the C entry point that picks
// one instantiation per call. The kernel itself is csrc/include/sa2/attn_mma.cuh.
//
// Shards: every object file compiles the entries of the list whose shard number equals its
// SA2_SHARD (ninja builds them in parallel); shard 0 also holds the dispatcher, which only
// declares the instantiations (extern template) and links against the other objects.
#include "sa2/attn_mma.cuh"

#ifndef SA2_SHARD
#define SA2_SHARD 0
#define SA2_NUM_SHARDS 1
#endif

namespace sa2 {

// The one list: X(head dim, QK type, PV type, PV accumulator, shard). FP8 PV only where e4m3
// mma.sync exists; the fp16 accumulator only for fp16 and FP8 operands.
// Shards are assigned by hand so each object holds 2-4 kernels of similar cost.
#define SA2_MMA_KERNELS_16BIT(X)  \
  X(64, kInt8, kFp16, kFp32, 0)          \
  X(64, kInt8, kBf16, kFp32, 1)          \
  X(128, kInt8, kFp16, kFp32, 2)         \
  X(128, kInt8, kBf16, kFp32, 3)         \
  X(256, kInt8, kFp16, kFp32, 4)         \
  X(256, kInt8, kBf16, kFp32, 5)         \
  X(64, kInt4, kFp16, kFp32, 0)          \
  X(64, kInt4, kBf16, kFp32, 1)          \
  X(128, kInt4, kFp16, kFp32, 2)         \
  X(128, kInt4, kBf16, kFp32, 3)         \
  X(256, kInt4, kFp16, kFp32, 4)         \
  X(256, kInt4, kBf16, kFp32, 5)

#define SA2_MMA_KERNELS_FP8(X)    \
  X(64, kInt8, kFp8, kFp32, 0)           \
  X(128, kInt8, kFp8, kFp32, 1)          \
  X(256, kInt8, kFp8, kFp32, 2)          \
  X(64, kInt4, kFp8, kFp32, 3)           \
  X(128, kInt4, kFp8, kFp32, 4)          \
  X(256, kInt4, kFp8, kFp32, 5)

#define SA2_MMA_KERNELS_16BIT_F16ACC(X) \
  X(64, kInt8, kFp16, kFp16, 2)          \
  X(128, kInt8, kFp16, kFp16, 4)         \
  X(256, kInt8, kFp16, kFp16, 0)         \
  X(64, kInt4, kFp16, kFp16, 3)          \
  X(128, kInt4, kFp16, kFp16, 5)         \
  X(256, kInt4, kFp16, kFp16, 1)

#define SA2_MMA_KERNELS_FP8_F16ACC(X) \
  X(64, kInt8, kFp8, kFp16, 4)         \
  X(128, kInt8, kFp8, kFp16, 5)        \
  X(256, kInt8, kFp8, kFp16, 3)        \
  X(64, kInt4, kFp8, kFp16, 2)         \
  X(128, kInt4, kFp8, kFp16, 0)        \
  X(256, kInt4, kFp8, kFp16, 1)

#if SA2_HAS_FP8_MMA
#define SA2_MMA_KERNELS(X) \
  SA2_MMA_KERNELS_16BIT(X) SA2_MMA_KERNELS_FP8(X) SA2_MMA_KERNELS_16BIT_F16ACC(X) SA2_MMA_KERNELS_FP8_F16ACC(X)
#else
#define SA2_MMA_KERNELS(X) SA2_MMA_KERNELS_16BIT(X) SA2_MMA_KERNELS_16BIT_F16ACC(X)
#endif

// SA2_IN_SHARD_<s>(...) expands to its arguments only in the object that owns shard s
// (s modulo the shard count, so a build with fewer shards still instantiates everything).
#if 0 % SA2_NUM_SHARDS == SA2_SHARD
#define SA2_IN_SHARD_0(...) __VA_ARGS__
#else
#define SA2_IN_SHARD_0(...)
#endif
#if 1 % SA2_NUM_SHARDS == SA2_SHARD
#define SA2_IN_SHARD_1(...) __VA_ARGS__
#else
#define SA2_IN_SHARD_1(...)
#endif
#if 2 % SA2_NUM_SHARDS == SA2_SHARD
#define SA2_IN_SHARD_2(...) __VA_ARGS__
#else
#define SA2_IN_SHARD_2(...)
#endif
#if 3 % SA2_NUM_SHARDS == SA2_SHARD
#define SA2_IN_SHARD_3(...) __VA_ARGS__
#else
#define SA2_IN_SHARD_3(...)
#endif
#if 4 % SA2_NUM_SHARDS == SA2_SHARD
#define SA2_IN_SHARD_4(...) __VA_ARGS__
#else
#define SA2_IN_SHARD_4(...)
#endif
#if 5 % SA2_NUM_SHARDS == SA2_SHARD
#define SA2_IN_SHARD_5(...) __VA_ARGS__
#else
#define SA2_IN_SHARD_5(...)
#endif

// Every object declares every instantiation (so none is instantiated implicitly)...
#define SA2_DECLARE_INSTANCE(D, QK, PV, ACC, S) \
  extern template int launch_attn_mma<D, QKType::QK, PVType::PV, PVAccum::ACC>(const AttnMmaArgs&);
SA2_MMA_KERNELS(SA2_DECLARE_INSTANCE)

// ...and defines those of its shard.
#define SA2_DEFINE_INSTANCE(D, QK, PV, ACC, S) \
  SA2_IN_SHARD_##S(template int launch_attn_mma<D, QKType::QK, PVType::PV, PVAccum::ACC>(const AttnMmaArgs&);)
SA2_MMA_KERNELS(SA2_DEFINE_INSTANCE)

}  // namespace sa2

#if SA2_SHARD == 0

namespace {

using Launcher = int (*)(const sa2::AttnMmaArgs&);

Launcher find_launcher(int64_t head_dim, sa2::QKType qk, sa2::PVType pv, sa2::PVAccum acc) {
#define SA2_MATCH_INSTANCE(D, QK, PV, ACC, S)                                                          \
  if (head_dim == D && qk == sa2::QKType::QK && pv == sa2::PVType::PV && acc == sa2::PVAccum::ACC) \
    return &sa2::launch_attn_mma<D, sa2::QKType::QK, sa2::PVType::PV, sa2::PVAccum::ACC>;
  using namespace sa2;
  SA2_MMA_KERNELS(SA2_MATCH_INSTANCE)
  return nullptr;
}

}  // namespace

// Whether this library's mma family has the FP8 PV kernels (e4m3 mma.sync, sm_89+).
SA2_EXPORT int sa2_mma_has_fp8_pv(void) { return SA2_HAS_FP8_MMA; }

// Attention over pre-quantized Q/K (and FP8 V^T or 16-bit V) for one call; returns 0 or an
// error code with the message in sa2_last_error(). Runs on args->stream, never synchronizes.
SA2_EXPORT int sa2_mma_attention(const sa2::AttnMmaArgs* args) {
  SA2_REQUIRE(args != nullptr, "sa2_mma_attention: null arguments");
  const sa2::AttnMmaArgs& a = *args;
  SA2_REQUIRE(a.batch >= 1 && a.heads_q >= 1 && a.heads_kv >= 1 && a.nq >= 1 && a.nk >= 1,
              "empty problem: batch %lld heads %lld/%lld nq %lld nk %lld", (long long)a.batch,
              (long long)a.heads_q, (long long)a.heads_kv, (long long)a.nq, (long long)a.nk);
  SA2_REQUIRE(a.heads_q % a.heads_kv == 0, "heads_q %lld is not a multiple of heads_kv %lld",
              (long long)a.heads_q, (long long)a.heads_kv);
  SA2_REQUIRE(a.batch <= 65535 && a.heads_q <= 65535, "batch and heads must be <= 65535");
  SA2_REQUIRE(a.nq < (1ll << 31) && a.nk < (1ll << 31), "sequence lengths must fit in 31 bits");
  SA2_REQUIRE(a.head_dim >= 1 && a.head_dim <= a.padded_head_dim, "head_dim %lld > padded %lld",
              (long long)a.head_dim, (long long)a.padded_head_dim);
  SA2_REQUIRE(a.granularity >= 0 && a.granularity <= 2, "bad granularity %lld", (long long)a.granularity);
  SA2_REQUIRE(a.q && a.k && a.q_scale && a.k_scale && a.v && a.out, "null tensor pointer");
  SA2_REQUIRE(!a.smooth_q || (a.qbar && a.qbar_scale), "smooth_q needs qbar and qbar_scale");
  SA2_REQUIRE(a.pv_type >= 0 && a.pv_type <= 2, "bad pv_type %lld", (long long)a.pv_type);
  SA2_REQUIRE(a.pv_accum == 0 || a.pv_accum == 1, "bad pv_accum %lld", (long long)a.pv_accum);
  SA2_REQUIRE(!(a.pv_accum == 1 && a.pv_type == 1), "an fp16 P.V accumulator needs fp16 or FP8 operands, not bf16");
  const auto pv = static_cast<sa2::PVType>(a.pv_type);
  if (pv == sa2::PVType::kFp8) {
#if SA2_HAS_FP8_MMA
    SA2_REQUIRE(a.v_scale != nullptr && a.v_pad % 64 == 0 && a.v_pad >= a.nk_pad, "FP8 V^T needs v_scale and v_pad");
    SA2_REQUIRE(a.padded_head_dim * a.v_pad < (1ll << 31), "FP8 V^T tile offsets must fit in 31 bits");
#else
    return sa2::set_error(-1, "FP8 PV needs e4m3 mma.sync (sm_89 or newer); this library is built for sm_%d",
                          SA2_ARCH);
#endif
  } else {
    // Rows are read in whole 16-byte chunks: d % 8 == 0, or a padded copy whose rows hold them.
    const bool aligned = (a.head_dim % 8 == 0 || a.v_stride_n >= (a.head_dim + 7) / 8 * 8) &&
                         a.v_stride_n % 8 == 0 && a.v_stride_h % 8 == 0 && a.v_stride_b % 8 == 0 &&
                         reinterpret_cast<uintptr_t>(a.v) % 16 == 0;
    SA2_REQUIRE(aligned, "16-bit V needs head_dim %% 8 == 0, strides %% 8 == 0 and a 16-byte aligned pointer");
    SA2_REQUIRE(2 * 64 * a.v_stride_n < (1ll << 31), "V token stride too large for 32-bit tile offsets");
  }
  const Launcher launch = find_launcher(a.padded_head_dim, a.qk_int4 ? sa2::QKType::kInt4 : sa2::QKType::kInt8, pv,
                                        static_cast<sa2::PVAccum>(a.pv_accum));
  SA2_REQUIRE(launch != nullptr, "no mma kernel for padded head dim %lld", (long long)a.padded_head_dim);
  return launch(a);
}

#endif  // SA2_SHARD == 0
