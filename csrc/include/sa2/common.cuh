// Basics every kernel header shares. Device code only, and no CUDA header: the kernels are
// compiled by NVRTC from sources held in memory (sageattn2/kernels.py), and torch's CUDA wheels
// do not reliably ship cuda_fp16.h & co. NVRTC provides the vector types (uint4, float2, ...),
// size_t and the math functions; the fixed-width integers and INFINITY are defined here.
#pragma once

#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>  // nvcc (developer reports only, tools/nvcc_report.py)
#endif

#ifndef INFINITY
// A constant the front end folds, spelt so that no code computes it. __int_as_float(0x7f800000)
// kept the masking (`x = cond ? -INFINITY : x`) from becoming selects (twice nvcc's branches in
// the PTX); __builtin_bit_cast gives 5 % more SASS in the wgmma d128 kernel; (1.0f / 0.0f)
// became an IEEE division with its slow-path subroutine at every use. A double beyond float's
// range folds to +inf; NVRTC 12.8 and 13.0 warn (221) at each use, which says nothing here.
#pragma nv_diag_suppress 221
#define INFINITY (static_cast<float>(1e300))
#endif

namespace sa2 {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// A bool as a type (std::bool_constant without <type_traits>): lets a generic lambda compile
// one body per value.
template <bool kValue>
struct BoolConstant {
  static constexpr bool value = kValue;
};

}  // namespace sa2
