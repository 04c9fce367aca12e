#pragma once
// What the command-line programs share: flag parsing, reading a corpus, a progress
// bar on stderr. Not part of the library.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include <lexico/training/kv_collect.hpp>
#include <lexico/model/llama.hpp>
#include <lexico/model/tokenizer.hpp>

namespace cli {

using Clock = std::chrono::steady_clock;

// A bad command line: main prints the message and exits with 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
T parse_number(const std::string& flag, const std::string& text, T low, T high) {
  std::istringstream in(text);
  T value{};
  in >> value;
  if (!in || !in.eof() || value < low || value > high) {
    std::ostringstream message;
    message << flag << " expects a number in [" << low << ", " << high << "], got '" << text << "'";
    throw usage_error(message.str());
  }
  return value;
}

// Flags that each take one value, except the `switches`, which take none (their
// handler gets ""); --help prints `usage`.
using FlagHandlers = std::map<std::string, std::function<void(const std::string&)>>;

inline void parse_flags(int argc, char** argv, const FlagHandlers& handlers, const char* usage,
                        const std::vector<std::string>& switches = {}) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(usage, stdout);
      std::exit(0);
    }
    const auto handler = handlers.find(flag);
    if (handler == handlers.end()) throw usage_error("unknown option '" + flag + "' (see --help)");
    if (std::find(switches.begin(), switches.end(), flag) != switches.end()) {
      handler->second("");
      continue;
    }
    if (i + 1 >= argc) throw usage_error(flag + " needs a value");
    handler->second(argv[++i]);
  }
}

inline void require_file(const std::string& path) {
  if (!path.empty() && !std::filesystem::exists(path)) throw usage_error("'" + path + "' does not exist");
}

inline std::string format_duration(double seconds) {
  char text[32];
  const long s = std::lround(std::max(0.0, seconds));
  if (s >= 3600) std::snprintf(text, sizeof text, "%ldh%02ldm", s / 3600, s / 60 % 60);
  else std::snprintf(text, sizeof text, "%ldm%02lds", s / 60, s % 60);
  return text;
}

// A progress line on stderr: redrawn in place four times a second on a terminal,
// one plain line every ten seconds in a log.
class ProgressBar {
 public:
  void show(const std::string& label, double fraction, double eta_seconds, const std::string& tail) {
    const auto now = Clock::now();
    if (fraction < 1 && now - last_ < (terminal_ ? std::chrono::milliseconds(250) : std::chrono::seconds(10))) return;
    last_ = now;
    constexpr int width = 30;
    const int filled = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * width);
    std::fprintf(stderr, "%s%-14s [%s%s] %5.1f%% ETA %s %s%s", terminal_ ? "\r" : "", label.c_str(),
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), 100 * fraction,
                 format_duration(eta_seconds).c_str(), tail.c_str(), terminal_ ? "\033[K" : "\n");
    if (terminal_ && fraction >= 1) std::fputc('\n', stderr);
  }

 private:
  bool terminal_ = isatty(fileno(stderr)) != 0;
  Clock::time_point last_{};
};

// Every id of `tokens` (read from `path`) is one the model knows.
inline void require_in_vocabulary(const std::vector<int>& tokens, const std::string& path,
                                  const lexico::LlamaModel& model) {
  for (const int id : tokens)
    lexico::require(id >= 0 && id < model.config().vocab, path, ": token id ", id,
                    " outside the model's vocabulary of ", model.config().vocab);
}

// Token ids of a .u16 file, or of a text file through the tokenizer at
// `tokenizer_path` (a tokenizer.json, a directory holding one, or a llama2.c .bin).
inline std::vector<int> read_corpus(const std::string& path, const std::string& tokenizer_path,
                                    const lexico::LlamaModel& model) {
  std::vector<int> tokens;
  if (std::filesystem::path(path).extension() == ".u16") {
    tokens = lexico::read_u16_tokens(path);
  } else {
    const auto tokenizer = lexico::load_tokenizer(tokenizer_path);
    std::ifstream in(path, std::ios::binary);
    lexico::require(static_cast<bool>(in), path, ": cannot open text file");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    tokens = tokenizer->encode(text, false);
  }
  lexico::require(!tokens.empty(), path, ": no tokens");
  require_in_vocabulary(tokens, path, model);
  return tokens;
}

// The tokenizer that belongs to a model: its directory's tokenizer.json, or the
// tok*.bin beside a llama2.c .bin.
inline std::string default_tokenizer(const std::string& model_path) {
  namespace fs = std::filesystem;
  if (fs::is_directory(model_path)) return model_path;
  for (const auto& entry : fs::directory_iterator(fs::path(model_path).parent_path()))
    if (entry.path().extension() == ".bin" && entry.path().filename().string().rfind("tok", 0) == 0)
      return entry.path().string();
  throw usage_error("no tokenizer found beside '" + model_path + "': pass --tokenizer");
}

}  // namespace cli
