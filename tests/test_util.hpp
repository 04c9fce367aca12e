#pragma once
// Helpers shared by every test file.

#include <string>

#include <lexico/base/error.hpp>

namespace lexico_test {

// The message of the lexico::error that `f` throws ("" when it throws none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const lexico::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace lexico_test
