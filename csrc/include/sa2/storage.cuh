// 16-bit and 8-bit storage types and their conversions, in PTX: the kernels need no CUDA
// header (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h), which NVRTC does not carry and torch's wheels
// may not ship. Every conversion rounds to nearest even, as the header functions it replaces.
#pragma once
#include "sa2/abi.cuh"
#include "sa2/common.cuh"

namespace sa2 {

struct alignas(2) f16 {
  uint16_t bits;
};
struct alignas(2) bf16 {
  uint16_t bits;
};

__device__ __forceinline__ float to_float(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(static_cast<uint32_t>(x.bits) << 16); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ f16 from_float<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r.bits) : "f"(x));
  return r;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r.bits) : "f"(x));
  return r;
}

// Two floats -> one 32-bit word of two 16-bit values, `lo` in the low half. (In `cvt ... d, a,
// b` the value `a` lands in the upper half.)
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2_16bit(float lo, float hi) {
  uint32_t out;
  if constexpr (kBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %2, %1;\n" : "=r"(out) : "f"(lo), "f"(hi));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %2, %1;\n" : "=r"(out) : "f"(lo), "f"(hi));
  }
  return out;
}

// A 32-bit word of P . V operands of type kPV that are all 1.0 (e4m3 0x38, f16 0x3C00, bf16
// 0x3F80): the ones column against which P's rows sum on the tensor cores.
template <PVType kPV>
__device__ __forceinline__ constexpr uint32_t ones_word() {
  return kPV == PVType::kFp8 ? 0x38383838u : kPV == PVType::kBf16 ? 0x3F803F80u : 0x3C003C00u;
}

// Two floats -> two E4M3 bytes (saturating to +-448), `lo` in the low byte. The cvt exists from
// sm_89; the arch table (sageattn2/archs.py) never sends FP8 work to an older GPU, which traps.
__device__ __forceinline__ uint32_t pack2_e4m3(float lo, float hi) {
#if SA2_HAS_FP8_MMA
  uint16_t out;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;\n" : "=h"(out) : "f"(lo), "f"(hi));
  return out;
#else
  __trap();
  return 0;
#endif
}

}  // namespace sa2
