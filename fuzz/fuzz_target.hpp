#pragma once
// One fuzz target per parser of outside bytes. A target is written once, as
//
//   LEXICO_FUZZ_TARGET(json) { lexico::json::parse(bytes); }
//
// and feeds `bytes` to the parser as a user's file would reach it. A clear rejection is a
// lexico::error, which the target lets through; anything else (another exception, a
// crash, a sanitizer report, a hang, a huge allocation) is a finding. `require_sane`
// turns a wrong result that is not a crash (NaN logits from a file that loaded) into one.
//
// Built with LEXICO_LIBFUZZER (fuzz/CMakeLists.txt, clang), the macro also defines
// libFuzzer's entry point; otherwise it registers the target so that
// tests/test_fuzz_inputs.cpp replays the committed inputs of fuzz/corpus/<name> and
// fuzz/regressions/<name> through the same function in every build of the suite.

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>

#include <lexico/base/error.hpp>

namespace lexico {
namespace fuzz {

using Target = void (*)(std::string_view bytes);

inline std::map<std::string, Target>& targets() {
  static std::map<std::string, Target> registry;
  return registry;
}

inline bool register_target(const char* name, Target target) {
  targets()[name] = target;
  return true;
}

// Not a lexico::error on purpose: the fuzzer and the replay test report it as a finding.
inline void require_sane(bool condition, const std::string& what) {
  if (!condition) throw std::logic_error("fuzz finding: " + what);
}

}  // namespace fuzz
}  // namespace lexico

#ifdef LEXICO_LIBFUZZER
#define LEXICO_FUZZ_ENTRY(name)                                                                  \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {            \
    try {                                                                                        \
      lexico_fuzz_##name(std::string_view(reinterpret_cast<const char*>(data), size));           \
    } catch (const lexico::error&) {                                                             \
    }                                                                                            \
    return 0;                                                                                    \
  }
#else
#define LEXICO_FUZZ_ENTRY(name) \
  static const bool lexico_fuzz_registered_##name = lexico::fuzz::register_target(#name, &lexico_fuzz_##name);
#endif

#define LEXICO_FUZZ_TARGET(name)                     \
  static void lexico_fuzz_##name(std::string_view); \
  LEXICO_FUZZ_ENTRY(name)                            \
  static void lexico_fuzz_##name(std::string_view bytes)
