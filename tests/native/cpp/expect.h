// The checks of the native test programs (tests/native/test_host_programs.py builds and runs
// them): EXPECT(cond, printf-format, ...) counts a failure and prints the first 20 with their
// place; a program ends with `return expect_summary("what was checked");`, which prints "ok"
// (what the runner looks for) or the failure count. One translation unit per program.
#pragma once

#include <cstdio>

static int failures = 0;

#define EXPECT(cond, ...)                                \
  do {                                                   \
    if (!(cond)) {                                       \
      if (++failures <= 20) {                            \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
    }                                                    \
  } while (0)

inline int expect_summary(const char* checked) {
  std::printf("%s; %d failures\n", checked, failures);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
