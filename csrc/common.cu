// SA2_FAMILIES: all
// The C-ABI error channel and build information shared by all kernel families.
#include <stdarg.h>
#include <stdio.h>

#include "sa2/common.cuh"

namespace sa2 {

static thread_local char g_last_error[1024] = "";

int set_error(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return code;
}

}  // namespace sa2

// Message of the last failing call on this thread ("" if none failed yet).
SA2_EXPORT const char* sa2_last_error(void) { return sa2::g_last_error; }

// Bumped when the C ABI changes; the Python loader refuses a library with another value.
SA2_EXPORT int sa2_abi_version(void) { return 2; }
