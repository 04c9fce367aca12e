#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lexico {

// The one exception type of the library. Messages say what was wrong and where.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

}  // namespace detail

// Throws lexico::error with the parts streamed together when the condition fails.
template <typename... Parts>
void require(bool condition, Parts&&... parts) {
  if (!condition) throw error(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace lexico
