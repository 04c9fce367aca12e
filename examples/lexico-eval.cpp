// lexico-eval: runs a Llama model over text with a KV cache of any type in the loop
// and reports mean NLL, perplexity, top-1 agreement with the dense cache and the
// cache's exact KV size.
//
// Protocol, per window of W tokens: the first P tokens are prefilled (attention exact
// over them) and handed to the cache, which compresses or selects them; the remaining
// tokens are decoded one at a time through the cache, and each decode step's
// prediction of the next token is scored. --prefill 0 streams every token through
// the cache. The dense reference runs the same window in one exact prefill.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <lexico/cache/factory.hpp>
#include <lexico/model/llama.hpp>

#include "cli.hpp"

namespace {

const char* const usage =
    "usage: lexico-eval --model DIR|FILE.bin (--tokens FILE.u16 | --text FILE) [options]\n"
    "  --cache NAME          cache type (default dense); --cache help lists types and options\n"
    "  --opt KEY=VALUE       a cache option (repeatable), or several as KEY=V,KEY=V\n"
    "  --dict DIR            dictionaries for --cache lexico (same as --opt dict=DIR)\n"
    "  --window W            tokens per window, BOS first (default: model context, at most 1024)\n"
    "  --windows K           windows to run, consecutive from the start of the corpus (default 1)\n"
    "  --prefill P           tokens prefilled exactly before decoding (default W/2; 0 streams all)\n"
    "  --tokenizer PATH      tokenizer for --text (default: the model's own)\n"
    "  --json                print one JSON object instead of the text report\n";

struct Args {
  std::string model, tokens, text, tokenizer, cache = "dense";
  lexico::CacheOptions options;
  int window = 0, windows = 1, prefill = -1;
  bool json = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  auto add_options = [&](const std::string& text) {
    try {
      const lexico::CacheOptions parsed = lexico::CacheOptions::parse(text);
      for (const auto& [key, value] : parsed.values()) a.options.set(key, value);
    } catch (const lexico::error& e) {
      throw cli::usage_error(std::string("--opt: ") + e.what());
    }
  };
  cli::parse_flags(
      argc, argv,
      {{"--model", [&](const std::string& v) { a.model = v; }},
       {"--tokens", [&](const std::string& v) { a.tokens = v; }},
       {"--text", [&](const std::string& v) { a.text = v; }},
       {"--tokenizer", [&](const std::string& v) { a.tokenizer = v; }},
       {"--cache", [&](const std::string& v) { a.cache = v; }},
       {"--opt", add_options},
       {"--dict", [&](const std::string& v) { add_options("dict=" + v); }},
       {"--window", [&](const std::string& v) { a.window = cli::parse_number<int>("--window", v, 2, 1 << 20); }},
       {"--windows", [&](const std::string& v) { a.windows = cli::parse_number<int>("--windows", v, 1, 1 << 20); }},
       {"--prefill", [&](const std::string& v) { a.prefill = cli::parse_number<int>("--prefill", v, 0, 1 << 20); }},
       {"--json", [&](const std::string&) { a.json = true; }}},
      usage, {"--json"});
  if (a.cache == "help") {
    std::fputs(lexico::cache_help().c_str(), stdout);
    std::exit(0);
  }
  if (a.model.empty()) throw cli::usage_error("--model is required");
  if (a.tokens.empty() == a.text.empty()) throw cli::usage_error("give exactly one of --tokens FILE.u16 and --text FILE");
  for (const std::string* path : {&a.model, &a.tokens, &a.text, &a.tokenizer}) cli::require_file(*path);
  return a;
}

// -log softmax(logits)[target], in double.
double negative_log_likelihood(const float* logits, int vocab, int target) {
  const float top = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - top));
  return std::log(sum) - static_cast<double>(logits[target] - top);
}

int argmax(const float* logits, int vocab) { return static_cast<int>(std::max_element(logits, logits + vocab) - logits); }

struct Totals {
  double nll = 0, dense_nll = 0, kv_fraction = 0, decode_seconds = 0, prefill_seconds = 0;
  long scored = 0, agree = 0, decoded = 0, prefilled = 0;
};

// Consecutive windows of W tokens from the start of the corpus, BOS first.
std::vector<std::vector<int>> first_windows(const std::vector<int>& tokens, int length, int count, int bos) {
  std::vector<std::vector<int>> windows;
  for (std::size_t start = 0; windows.size() < static_cast<std::size_t>(count); ) {
    std::vector<int> window;
    if (bos >= 0 && (start >= tokens.size() || tokens[start] != bos)) window.push_back(bos);
    while (window.size() < static_cast<std::size_t>(length) && start < tokens.size()) window.push_back(tokens[start++]);
    if (window.size() < static_cast<std::size_t>(length)) break;
    windows.push_back(std::move(window));
  }
  return windows;
}

int run(const Args& args) {
  using Clock = std::chrono::steady_clock;
  const lexico::LlamaModel model = lexico::LlamaModel::load(args.model);
  const lexico::LlamaConfig& config = model.config();
  const int window = args.window > 0 ? args.window : std::min(config.max_context > 0 ? config.max_context : 1024, 1024);
  const int prefill = args.prefill >= 0 ? args.prefill : window / 2;
  if (prefill >= window) throw cli::usage_error("--prefill must be smaller than --window");
  const std::string tokenizer = args.tokenizer.empty() ? cli::default_tokenizer(args.model) : args.tokenizer;
  const std::vector<int> corpus =
      cli::read_corpus(args.tokens.empty() ? args.text : args.tokens, args.tokens.empty() ? tokenizer : "", model);
  const auto windows = first_windows(corpus, window, args.windows, config.bos_id);
  lexico::require(!windows.empty(), "the corpus holds fewer than ", window, " tokens: no complete window");

  auto cache = lexico::make_cache(args.cache, config.cache_shape(), args.options);
  lexico::DenseCache<float> dense(config.cache_shape());
  lexico::LlamaRunner runner(model);
  Totals totals;
  cli::ProgressBar bar;
  const auto started = Clock::now();
  const double steps = static_cast<double>(windows.size()) * window;
  for (std::size_t w = 0; w < windows.size(); ++w) {
    const std::vector<int>& tokens = windows[w];
    dense.clear();
    const lexico::RowMatrix reference = runner.prefill(tokens, dense);
    cache->clear();
    const auto prefill_start = Clock::now();
    if (prefill > 0) runner.prefill(std::vector<int>(tokens.begin(), tokens.begin() + prefill), *cache);
    const auto decode_start = Clock::now();
    totals.prefill_seconds += std::chrono::duration<double>(decode_start - prefill_start).count();
    totals.prefilled += prefill;
    for (int p = prefill; p < window; ++p) {
      const auto logits = runner.decode(tokens[static_cast<std::size_t>(p)], *cache);
      ++totals.decoded;
      if (p + 1 < window) {
        const int next = tokens[static_cast<std::size_t>(p + 1)];
        totals.nll += negative_log_likelihood(logits.data(), config.vocab, next);
        totals.dense_nll += negative_log_likelihood(reference.row(p).data(), config.vocab, next);
        totals.agree += argmax(logits.data(), config.vocab) == argmax(reference.row(p).data(), config.vocab);
        ++totals.scored;
      }
      const double done = static_cast<double>(w) * window + p + 1;
      const double elapsed = std::chrono::duration<double>(Clock::now() - started).count();
      char tail[96];
      std::snprintf(tail, sizeof tail, "window %zu/%zu  nll %.4f", w + 1, windows.size(),
                    totals.scored ? totals.nll / static_cast<double>(totals.scored) : 0.0);
      bar.show("lexico-eval", done / steps, elapsed * (steps - done) / done, tail);
    }
    totals.decode_seconds += std::chrono::duration<double>(Clock::now() - decode_start).count();
    totals.kv_fraction += cache->kv_size_fraction();
  }
  const double n = static_cast<double>(totals.scored);
  const double mean_nll = totals.nll / n, dense_nll = totals.dense_nll / n;
  const double kv_fraction = totals.kv_fraction / static_cast<double>(windows.size());
  const double decode_rate = static_cast<double>(totals.decoded) / totals.decode_seconds;
  const double prefill_rate =
      totals.prefilled > 0 ? static_cast<double>(totals.prefilled) / totals.prefill_seconds : 0.0;
  const lexico::CacheBytes bytes = cache->bytes();
  if (args.json) {
    std::printf(
        "{\"model\": \"%s\", \"cache\": \"%s\", \"parameters\": \"%s\", \"window\": %d, \"windows\": %zu, "
        "\"prefill\": %d, \"scored_tokens\": %ld, \"mean_nll\": %.6f, \"perplexity\": %.4f, "
        "\"dense_mean_nll\": %.6f, \"delta_nll\": %.6f, \"top1_agreement\": %.6f, \"kv_size_fraction\": %.6f, "
        "\"bytes_payload\": %zu, \"bytes_metadata\": %zu, \"bytes_buffer\": %zu, \"tokens_per_second\": %.2f, "
        "\"prefill_tokens_per_second\": %.2f}\n",
        args.model.c_str(), cache->name().c_str(), cache->parameters().c_str(), window, windows.size(), prefill,
        totals.scored, mean_nll, std::exp(mean_nll), dense_nll, mean_nll - dense_nll,
        static_cast<double>(totals.agree) / n, kv_fraction, bytes.payload, bytes.metadata, bytes.buffer, decode_rate,
        prefill_rate);
  } else {
    std::printf("model          %s\ncache          %s (%s)\n", args.model.c_str(), cache->name().c_str(),
                cache->parameters().c_str());
    std::printf("windows        %zu x %d tokens, prefill %d, %ld scored tokens\n", windows.size(), window, prefill,
                totals.scored);
    std::printf("mean NLL       %.4f (dense %.4f, delta %+.4f)\nperplexity     %.3f\n", mean_nll, dense_nll,
                mean_nll - dense_nll, std::exp(mean_nll));
    std::printf("top-1 agree    %.2f %%\nKV size        %.2f %% of fp16\n", 100.0 * totals.agree / n,
                100 * kv_fraction);
    std::printf("speed          %.1f decode tokens/s, %.1f prefill tokens/s\n", decode_rate, prefill_rate);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const cli::usage_error& e) {
    std::fprintf(stderr, "lexico-eval: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lexico-eval: error: %s\n", e.what());
  }
  return 2;
}
