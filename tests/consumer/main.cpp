// Built against the installed package: proves the exported target carries
// the include path, Eigen and the C++ standard.
#include <lexico/lexico.hpp>

#include <cstdio>

int main() {
  const float x = lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(1.5f));
  std::printf("lexico %s: fp8(1.5) = %g\n", lexico::version_string, x);
  return x == 1.5f ? 0 : 1;
}
