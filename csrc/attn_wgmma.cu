// SA2_FAMILIES: wgmma
// SA2_SHARDS: 9
// Hopper attention launchers: TMA tensor maps built on the host (cuTensorMapEncodeTiled taken
// from the driver through the runtime, so libcuda is not linked), one kernel per
// (padded head dim, PV operand type, schedule), and the C entry point sa2_wgmma_attention.
#include <cuda.h>
#include <cudaTypedefs.h>

#include "sa2/attn_wgmma.cuh"
#include "sa2/common.cuh"

#ifndef SA2_SHARD
#define SA2_SHARD 0
#define SA2_NUM_SHARDS 1
#endif

namespace sa2::wgmma_attn {

struct LaunchArgs {
  CUtensorMap tm_q, tm_k, tm_v;
  Params params;
  int batch, heads_q;
  cudaStream_t stream;
};

template <class T>
int launch(const LaunchArgs& a) {
  auto* kernel = attention_kernel<T>;
  SA2_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    T::kSmemBytes));
  const dim3 grid(ceil_div(a.params.num_q, T::kBlockM), a.heads_q, a.batch);
  kernel<<<grid, T::kThreads, T::kSmemBytes, a.stream>>>(a.tm_q, a.tm_k, a.tm_v, a.params);
  SA2_LAUNCH_CHECK();
  return 0;
}

// The kernel list: every schedule at head dim 128; at head dim 64 the two sequential ones (the
// ping-pong and overlap schedules were 10-20 % slower there, notes-wgmma.md v5). Each index
// is compiled into object file index % SA2_NUM_SHARDS.
extern template int launch<Traits<128, PVMode::kFp8, Schedule::kSequential>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kFp8, Schedule::kPingPong>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kFp8, Schedule::kOverlap>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kFp8, Schedule::kSequential, 3>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kBf16, Schedule::kSequential>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kBf16, Schedule::kPingPong>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kBf16, Schedule::kOverlap>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kBf16, Schedule::kSequential, 3>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kF16, Schedule::kSequential>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kF16, Schedule::kPingPong>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kF16, Schedule::kOverlap>>(const LaunchArgs&);
extern template int launch<Traits<128, PVMode::kF16, Schedule::kSequential, 3>>(const LaunchArgs&);
extern template int launch<Traits<64, PVMode::kFp8, Schedule::kSequential>>(const LaunchArgs&);
extern template int launch<Traits<64, PVMode::kFp8, Schedule::kSequential, 3>>(const LaunchArgs&);
extern template int launch<Traits<64, PVMode::kBf16, Schedule::kSequential>>(const LaunchArgs&);
extern template int launch<Traits<64, PVMode::kBf16, Schedule::kSequential, 3>>(const LaunchArgs&);
extern template int launch<Traits<64, PVMode::kF16, Schedule::kSequential>>(const LaunchArgs&);
extern template int launch<Traits<64, PVMode::kF16, Schedule::kSequential, 3>>(const LaunchArgs&);

#if 0 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kFp8, Schedule::kSequential>>(const LaunchArgs&);
#endif
#if 1 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kFp8, Schedule::kPingPong>>(const LaunchArgs&);
#endif
#if 2 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kFp8, Schedule::kOverlap>>(const LaunchArgs&);
#endif
#if 3 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kFp8, Schedule::kSequential, 3>>(const LaunchArgs&);
#endif
#if 4 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kBf16, Schedule::kSequential>>(const LaunchArgs&);
#endif
#if 5 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kBf16, Schedule::kPingPong>>(const LaunchArgs&);
#endif
#if 6 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kBf16, Schedule::kOverlap>>(const LaunchArgs&);
#endif
#if 7 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kBf16, Schedule::kSequential, 3>>(const LaunchArgs&);
#endif
#if 8 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kF16, Schedule::kSequential>>(const LaunchArgs&);
#endif
#if 9 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kF16, Schedule::kPingPong>>(const LaunchArgs&);
#endif
#if 10 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kF16, Schedule::kOverlap>>(const LaunchArgs&);
#endif
#if 11 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<128, PVMode::kF16, Schedule::kSequential, 3>>(const LaunchArgs&);
#endif
#if 12 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<64, PVMode::kFp8, Schedule::kSequential>>(const LaunchArgs&);
#endif
#if 13 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<64, PVMode::kFp8, Schedule::kSequential, 3>>(const LaunchArgs&);
#endif
#if 14 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<64, PVMode::kBf16, Schedule::kSequential>>(const LaunchArgs&);
#endif
#if 15 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<64, PVMode::kBf16, Schedule::kSequential, 3>>(const LaunchArgs&);
#endif
#if 16 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<64, PVMode::kF16, Schedule::kSequential>>(const LaunchArgs&);
#endif
#if 17 % SA2_NUM_SHARDS == SA2_SHARD
template int launch<Traits<64, PVMode::kF16, Schedule::kSequential, 3>>(const LaunchArgs&);
#endif

}  // namespace sa2::wgmma_attn

#if SA2_SHARD == 0
namespace {

using sa2::wgmma_attn::LaunchArgs;
using sa2::wgmma_attn::PVMode;
using sa2::wgmma_attn::Schedule;
using sa2::wgmma_attn::Traits;

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// A 4-D tiled tensor map: dims innermost first, element strides of dims 1..3 (64-bit), and a
// 2-D box. Out-of-bound box elements are zero-filled by the copy engine.
int make_map(CUtensorMap* map, CUtensorMapDataType type, int elem_bytes, const void* base,
             const uint64_t (&dims)[4], const int64_t (&strides)[3], uint32_t box_inner,
             uint32_t box_outer, CUtensorMapSwizzle swizzle, const char* what) {
  const auto encode = tensor_map_encoder();
  SA2_REQUIRE(encode != nullptr, "cuTensorMapEncodeTiled is not available from the driver");
  SA2_REQUIRE(reinterpret_cast<uintptr_t>(base) % 16 == 0, "%s: base address not 16-byte aligned",
              what);
  cuuint64_t gdim[4];
  cuuint64_t gstride[3];
  for (int i = 0; i < 4; ++i) {
    SA2_REQUIRE(dims[i] >= 1 && dims[i] <= 0xFFFFFFFFull, "%s: dim %d out of range", what, i);
    gdim[i] = dims[i];
  }
  for (int i = 0; i < 3; ++i) {
    const int64_t bytes = strides[i] * elem_bytes;
    SA2_REQUIRE(bytes > 0 && bytes % 16 == 0 && bytes < (int64_t(1) << 40),
                "%s: stride %d (%lld bytes) must be a positive multiple of 16 below 2^40", what,
                i + 1, (long long)bytes);
    gstride[i] = static_cast<cuuint64_t>(bytes);
  }
  const cuuint32_t box[4] = {box_inner, box_outer, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, type, 4, const_cast<void*>(base), gdim, gstride, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  SA2_REQUIRE(r == CUDA_SUCCESS, "%s: cuTensorMapEncodeTiled failed with CUresult %d", what,
              (int)r);
  return 0;
}

template <int D, PVMode kPV>
int dispatch_schedule(const LaunchArgs& a, int schedule) {
  if (schedule == 3) return sa2::wgmma_attn::launch<Traits<D, kPV, Schedule::kSequential, 3>>(a);
  if (schedule == 0) return sa2::wgmma_attn::launch<Traits<D, kPV, Schedule::kSequential>>(a);
  if constexpr (D == 128) {
    if (schedule == 1) return sa2::wgmma_attn::launch<Traits<D, kPV, Schedule::kPingPong>>(a);
    if (schedule == 2) return sa2::wgmma_attn::launch<Traits<D, kPV, Schedule::kOverlap>>(a);
  }
  return sa2::set_error(-1, "schedule %d is not built at head dim %d", schedule, D);
}

template <int D>
int dispatch_pv(const LaunchArgs& a, int pv_mode, int schedule) {
  switch (pv_mode) {
    case 0: return dispatch_schedule<D, PVMode::kFp8>(a, schedule);
    case 1: return dispatch_schedule<D, PVMode::kF16>(a, schedule);
    default: return dispatch_schedule<D, PVMode::kBf16>(a, schedule);
  }
}

}  // namespace

// Quantized attention on Hopper. All pointers are device pointers; strides are in elements.
//   shape   [batch, heads_q, heads_kv, num_q, num_k, head_dim_padded (64|128), head_dim]
//   strides [q_b, q_h, q_n,  k_b, k_h, k_n,  v_b, v_h, v_n,  qs_b, qs_h,  ks_b, ks_h,
//            vs_b, vs_h,  o_b, o_h, o_n,  lse_b, lse_h]
//   q, k: int8 (.., N, head_dim_padded), channels contiguous, per-thread scales (config.py).
//   v: pv_mode 0 (fp8): e4m3 V^T (.., head_dim_padded, Nk_pad) with v_n the channel-row stride,
//      tokens permuted inside each 16 (see attn_wgmma.cuh), padding tokens up to Nk_pad (a
//      multiple of 16 at least) zero; v_scale per channel.
//      pv_mode 1 (fp16) / 2 (bf16): V (.., Nk, head_dim) in that dtype, v_scale unused.
//   out: fp16 (out_bf16 = 0) or bf16; for 16-bit PV it must match the PV dtype.
//   lse: fp32 (B, Hq, Nq) natural log without the K-smoothing term, or null.
//   schedule: 0 sequential, 1 ping-pong, 2 ping-pong + intra-warpgroup overlap (Schedule in
//   attn_wgmma.cuh), 3 sequential with three consumer warpgroups (192-row CTAs); head dim 64
//   builds 0 and 3 only.
SA2_EXPORT int sa2_wgmma_attention(const void* q, const void* k, const void* v,
                                   const float* q_scale, const float* k_scale,
                                   const float* v_scale, void* out, float* lse,
                                   const int64_t* shape, const int64_t* strides, int pv_mode,
                                   int out_bf16, int causal, int schedule, float sm_scale,
                                   void* stream) {
  const int64_t batch = shape[0], heads_q = shape[1], heads_kv = shape[2];
  const int64_t num_q = shape[3], num_k = shape[4], dpad = shape[5], head_dim = shape[6];
  SA2_REQUIRE(dpad == 64 || dpad == 128, "padded head dim must be 64 or 128, got %lld",
              (long long)dpad);
  SA2_REQUIRE(head_dim >= 1 && head_dim <= dpad, "head dim %lld does not fit padded %lld",
              (long long)head_dim, (long long)dpad);
  SA2_REQUIRE(batch >= 1 && batch <= 65535 && heads_q >= 1 && heads_q <= 65535,
              "batch/heads out of range");
  SA2_REQUIRE(heads_kv >= 1 && heads_q % heads_kv == 0, "heads_q %% heads_kv != 0");
  SA2_REQUIRE(num_q >= 1 && num_k >= 1 && num_q < (int64_t(1) << 31) &&
                  num_k < (int64_t(1) << 31) - 128,
              "sequence lengths out of range");
  SA2_REQUIRE(pv_mode >= 0 && pv_mode <= 2, "pv_mode must be 0, 1 or 2");
  SA2_REQUIRE(schedule >= 0 && schedule <= 3, "schedule must be 0..3");
  SA2_REQUIRE(pv_mode == 0 || out_bf16 == (pv_mode == 2), "16-bit PV writes its own dtype");
  SA2_REQUIRE(q && k && v && q_scale && k_scale && out && (pv_mode != 0 || v_scale),
              "null pointer argument");

  LaunchArgs a{};
  const int64_t* qs = strides;
  const int64_t* ks = strides + 3;
  const int64_t* vs = strides + 6;
  const CUtensorMapSwizzle qk_swizzle =
      dpad == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  const uint64_t d = static_cast<uint64_t>(dpad);
  const uint32_t q_rows = schedule == 3 ? 192 : 128;  // the kernel's kBlockM
  int rc = make_map(&a.tm_q, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, q,
                    {d, (uint64_t)num_q, (uint64_t)heads_q, (uint64_t)batch},
                    {qs[2], qs[1], qs[0]}, (uint32_t)dpad, q_rows, qk_swizzle, "q");
  if (rc) return rc;
  rc = make_map(&a.tm_k, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, k,
                {d, (uint64_t)num_k, (uint64_t)heads_kv, (uint64_t)batch}, {ks[2], ks[1], ks[0]},
                (uint32_t)dpad, 128, qk_swizzle, "k");
  if (rc) return rc;
  if (pv_mode == 0) {
    // Tokens are permuted inside each group of 16, so the map must cover whole groups: keys
    // [num_k, round_up(num_k, 16)) are read from the buffer (zeros by contract), not zero-filled.
    const uint64_t keys = static_cast<uint64_t>(sa2::ceil_div<int64_t>(num_k, 16) * 16);
    rc = make_map(&a.tm_v, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, v,
                  {keys, d, (uint64_t)heads_kv, (uint64_t)batch},
                  {vs[2], vs[1], vs[0]}, 128, (uint32_t)dpad, CU_TENSOR_MAP_SWIZZLE_128B, "v");
  } else {
    rc = make_map(&a.tm_v,
                  pv_mode == 2 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                  2, v, {(uint64_t)head_dim, (uint64_t)num_k, (uint64_t)heads_kv, (uint64_t)batch},
                  {vs[2], vs[1], vs[0]}, 64, 128, CU_TENSOR_MAP_SWIZZLE_128B, "v");
  }
  if (rc) return rc;

  sa2::wgmma_attn::Params& p = a.params;
  p.q_scale = q_scale;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.out = out;
  p.lse = lse;
  p.q_scale_stride_b = strides[9];
  p.q_scale_stride_h = strides[10];
  p.k_scale_stride_b = strides[11];
  p.k_scale_stride_h = strides[12];
  p.v_scale_stride_b = strides[13];
  p.v_scale_stride_h = strides[14];
  p.o_stride_b = strides[15];
  p.o_stride_h = strides[16];
  p.o_stride_n = strides[17];
  p.lse_stride_b = strides[18];
  p.lse_stride_h = strides[19];
  p.num_q = (int)num_q;
  p.num_k = (int)num_k;
  p.group_size = (int)(heads_q / heads_kv);
  p.head_dim = (int)head_dim;
  p.causal = causal != 0;
  p.out_bf16 = out_bf16 != 0;
  p.out_vec2 = reinterpret_cast<uintptr_t>(out) % 4 == 0 && p.o_stride_b % 2 == 0 &&
               p.o_stride_h % 2 == 0 && p.o_stride_n % 2 == 0;
  p.out_rows16 = head_dim == dpad && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                 p.o_stride_b % 8 == 0 && p.o_stride_h % 8 == 0 && p.o_stride_n % 8 == 0;
  p.scale_log2 = sm_scale * 1.4426950408889634f;
  a.batch = (int)batch;
  a.heads_q = (int)heads_q;
  a.stream = static_cast<cudaStream_t>(stream);

  return dpad == 128 ? dispatch_pv<128>(a, pv_mode, schedule) : dispatch_pv<64>(a, pv_mode, schedule);
}
#endif  // SA2_SHARD == 0
