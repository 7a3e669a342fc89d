// Thin PTX wrappers for the mma.sync family: cp.async, ldmatrix and the tensor-core MMAs.
//
// Every inline-asm instruction of the family lives here, behind a typed function, so the
// kernel reads like the algorithm. Fragment layouts (PTX ISA, "Matrix fragments for
// mma.m16n8k*"), with lane = 4 * g + t:
//   accumulator C (16x8):      c0,c1 = row g, cols 2t, 2t+1;  c2,c3 = row g+8, same cols
//   A of an 8-bit k32 (or 4-bit k64) MMA, 4 registers of 4 bytes:
//                              a0 = row g,   bytes 4t..4t+3;   a1 = row g+8, bytes 4t..4t+3
//                              a2 = row g,   bytes 16+4t..;    a3 = row g+8, bytes 16+4t..
//   B (8 columns n = g):       b0 = bytes 4t..4t+3 of column g; b1 = bytes 16+4t..
//   A of a 16-bit k16 MMA:     a0 = row g, k 2t,2t+1; a1 = row g+8; a2 = row g, k 8+2t..; a3 = row g+8
//   B of a 16-bit k16 MMA:     b0 = k 2t,2t+1 of column g; b1 = k 8+2t, 8+2t+1
// A 4-bit k64 fragment has exactly the byte layout of an 8-bit k32 fragment (8 nibbles per
// register, lowest nibble first), so INT4 and INT8 share every load; only the MMA differs.
#pragma once
#include "sa2/abi.cuh"
#include "sa2/storage.cuh"

namespace sa2 {
namespace mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when `valid` is false nothing is read and the 16 bytes
// are zero-filled (tails and padding), but `src` must still be a mapped address.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(kPending >= 0 && kPending <= 7, "cp.async.wait_group takes 0..7");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 matrices of 16-bit elements (= 8 rows x 16 bytes); lanes 8i..8i+7 give the row
// addresses of matrix i, which lands in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Same, each 8x8 matrix transposed (lane 4g+t gets elements (2t, g) and (2t+1, g)).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// S(16x8, s32) += A(16 x 32 bytes) . B(32 bytes x 8): INT8 m16n8k32 or INT4 m16n8k64.
template <QKType kType>
__device__ __forceinline__ void mma_qk(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(kType == QKType::kInt8 || kType == QKType::kInt4, "QK MMA takes INT8 or INT4");
  if constexpr (kType == QKType::kInt8) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// O(16x8, f32) += P(16x16) . V(16x8) with 16-bit P and V (fp16 or bf16), fp32 accumulation.
template <PVType kType>
__device__ __forceinline__ void mma_pv16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(kType == PVType::kFp16 || kType == PVType::kBf16, "16-bit PV MMA takes fp16 or bf16");
  if constexpr (kType == PVType::kFp16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// R(16x8, f16) += P(16x16, f16) . V(16x8, f16): fp16 accumulator, two registers of two halves
// (c0 = row g, cols 2t, 2t+1; c1 = row g+8).
__device__ __forceinline__ void mma_pv16_f16acc(uint32_t (&c)[2], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0, %1}, {%2, %3, %4, %5}, {%6, %7}, {%0, %1};\n"
      : "+r"(c[0]), "+r"(c[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// o[0..3] += an fp16 accumulator fragment (the layout of mma_pv16_f16acc's c), in fp32.
__device__ __forceinline__ void add_f16_fragment(float (&o)[4], const uint32_t (&c)[2]) {
  o[0] += to_float(f16{static_cast<uint16_t>(c[0] & 0xffffu)});
  o[1] += to_float(f16{static_cast<uint16_t>(c[0] >> 16)});
  o[2] += to_float(f16{static_cast<uint16_t>(c[1] & 0xffffu)});
  o[3] += to_float(f16{static_cast<uint16_t>(c[1] >> 16)});
}

#if SA2_HAS_FP8_MMA
// R(16x8, f16) += P(16x32, e4m3) . V(32x8, e4m3) with an fp16 accumulator (sm_89+).
__device__ __forceinline__ void mma_pv_e4m3_f16acc(uint32_t (&c)[2], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f16.e4m3.e4m3.f16 {%0, %1}, {%2, %3, %4, %5}, {%6, %7}, {%0, %1};\n"
      : "+r"(c[0]), "+r"(c[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// R(16x8, f32) += P(16x32, e4m3) . V(32x8, e4m3). Exists from sm_89 (emulated through HMMA on sm_90).
__device__ __forceinline__ void mma_pv_e4m3(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half.
template <PVType kType>
__device__ __forceinline__ uint32_t pack_16bit(float lo, float hi) {
  static_assert(kType == PVType::kFp16 || kType == PVType::kBf16, "pack_16bit is for fp16/bf16");
  return pack2_16bit<kType == PVType::kBf16>(lo, hi);
}

// Four floats -> four E4M3 bytes (round to nearest even, saturating), x0 in the lowest byte.
__device__ __forceinline__ uint32_t pack_e4m3x4(float x0, float x1, float x2, float x3) {
  return pack2_e4m3(x0, x1) | (pack2_e4m3(x2, x3) << 16);
}

}  // namespace mma
}  // namespace sa2
