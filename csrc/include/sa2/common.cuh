// Shared by every translation unit: the C-ABI error channel and small helpers.
// The library is called from Python through ctypes, so nothing here may depend on torch.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#if defined(_WIN32)
#define SA2_EXPORT extern "C" __declspec(dllexport)
#else
#define SA2_EXPORT extern "C" __attribute__((visibility("default")))
#endif

namespace sa2 {

// Records a message for sa2_last_error(); returns `code` so callers can `return set_error(...)`.
int set_error(int code, const char* fmt, ...);

// Checks the launch (or any runtime call) that just ran; records where it failed.
#define SA2_CUDA_TRY(expr)                                                                  \
  do {                                                                                      \
    cudaError_t sa2_err_ = (expr);                                                          \
    if (sa2_err_ != cudaSuccess)                                                            \
      return ::sa2::set_error((int)sa2_err_, "%s:%d: %s: %s", __FILE__, __LINE__, #expr,   \
                              cudaGetErrorString(sa2_err_));                                \
  } while (0)

#define SA2_LAUNCH_CHECK() SA2_CUDA_TRY(cudaGetLastError())

// Argument errors reported to Python as ValueError-like failures (code -1).
#define SA2_REQUIRE(cond, ...)                                   \
  do {                                                           \
    if (!(cond)) return ::sa2::set_error(-1, __VA_ARGS__);       \
  } while (0)

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

}  // namespace sa2
