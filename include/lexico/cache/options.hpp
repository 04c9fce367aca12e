#pragma once
// Cache settings as text, "key=value,key=value" (what lexico-eval takes on its command
// line), read back through typed getters. Every malformed value raises lexico::error
// naming the key and the text it held, so a bad setting never becomes a silent default.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <map>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "../base/error.hpp"

namespace lexico {

class CacheOptions {
 public:
  CacheOptions() = default;
  CacheOptions(std::initializer_list<std::pair<const std::string, std::string>> values) {
    for (const auto& [key, value] : values) set(key, value);
  }

  // Parses "key=value,key=value"; blanks around keys and values are ignored, an empty
  // text gives no options. A repeated key, a missing '=' or an empty key or value raise.
  static CacheOptions parse(const std::string& text) {
    CacheOptions options;
    if (trim(text).empty()) return options;
    for (std::size_t begin = 0; begin <= text.size();) {
      const std::size_t end = std::min(text.find(',', begin), text.size());
      const std::string item = trim(text.substr(begin, end - begin));
      begin = end + 1;
      const std::size_t equals = item.find('=');
      require(equals != std::string::npos, "CacheOptions: '", item, "' in \"", text, "\" is not key=value");
      const std::string key = trim(item.substr(0, equals));
      require(!options.values_.count(key), "CacheOptions: key '", key, "' given twice in \"", text, "\"");
      options.set(key, trim(item.substr(equals + 1)));
    }
    return options;
  }

  CacheOptions& set(const std::string& key, const std::string& value) {
    require(!key.empty(), "CacheOptions: empty key (value '", value, "')");
    require(!value.empty(), "CacheOptions: option '", key, "' has no value");
    values_[key] = value;
    return *this;
  }

  bool has(const std::string& key) const { return values_.count(key) != 0; }
  const std::map<std::string, std::string>& values() const { return values_; }

  // "key=value,key=value" in key order; parse(to_string()) gives the same options.
  std::string to_string() const {
    std::string text;
    for (const auto& [key, value] : values_) text += (text.empty() ? "" : ",") + key + "=" + value;
    return text;
  }

  std::string get(const std::string& key) const {
    const auto found = values_.find(key);
    require(found != values_.end(), "CacheOptions: option '", key, "' is required");
    return found->second;
  }

  // A whole-text integer in [low, high].
  long long get_integer(const std::string& key, long long low = std::numeric_limits<long long>::min(),
                        long long high = std::numeric_limits<long long>::max()) const {
    return parsed<long long>(key, "an integer", low, high);
  }
  int get_int(const std::string& key, int low = std::numeric_limits<int>::min(),
              int high = std::numeric_limits<int>::max()) const {
    return static_cast<int>(get_integer(key, low, high));
  }

  // A whole-text finite number in [low, high].
  double get_number(const std::string& key, double low = std::numeric_limits<double>::lowest(),
                    double high = std::numeric_limits<double>::max()) const {
    return parsed<double>(key, "a finite number", low, high);
  }

  // Whole-text integers in [low, high] separated by ':' ("4:8:12"), one or more.
  std::vector<int> get_int_list(const std::string& key, int low = std::numeric_limits<int>::min(),
                                int high = std::numeric_limits<int>::max()) const {
    const std::string text = get(key);
    std::vector<int> list;
    for (std::size_t begin = 0; begin <= text.size();) {
      const std::size_t end = std::min(text.find(':', begin), text.size());
      const std::string item = text.substr(begin, end - begin);
      begin = end + 1;
      int value = 0;
      require(whole_number(item, value) && value >= low && value <= high,
              "CacheOptions: option '", key, "' must be integers in [", low, ", ", high, "] separated by ':' (got '",
              text, "', item '", item, "')");
      list.push_back(value);
    }
    return list;
  }

  // One of the listed words.
  std::string get_choice(const std::string& key, std::initializer_list<const char*> choices) const {
    const std::string value = get(key);
    std::string listed;
    for (const char* choice : choices) {
      if (value == choice) return value;
      listed += (listed.empty() ? "" : "|") + std::string(choice);
    }
    throw error(detail::concat("CacheOptions: option '", key, "' must be ", listed, " (got '", value, "')"));
  }

 private:
  static std::string trim(const std::string& text) {
    const auto first = text.find_first_not_of(" \t");
    if (first == std::string::npos) return {};
    return text.substr(first, text.find_last_not_of(" \t") - first + 1);
  }

  // Whether all of `text` is one number of type T (finite, for floating point).
  template <typename T>
  static bool whole_number(const std::string& text, T& value) {
    const char* end = text.data() + text.size();
    const auto [stop, status] = std::from_chars(text.data(), end, value);
    bool good = !text.empty() && status == std::errc() && stop == end;
    if constexpr (std::is_floating_point_v<T>) good = good && std::isfinite(value);
    return good;
  }

  template <typename T>
  T parsed(const std::string& key, const char* what, T low, T high) const {
    const std::string text = get(key);
    T value{};
    const bool good = whole_number(text, value);
    const bool bounded = low != std::numeric_limits<T>::lowest() || high != std::numeric_limits<T>::max();
    require(good && value >= low && value <= high, "CacheOptions: option '", key, "' must be ", what,
            bounded ? detail::concat(" in [", low, ", ", high, "]") : std::string(), " (got '", text, "')");
    return value;
  }

  std::map<std::string, std::string> values_;
};

}  // namespace lexico
