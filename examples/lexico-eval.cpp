// lexico-eval: runs a Llama model over text with a KV cache of any type in the loop
// and reports mean NLL, perplexity, top-1 agreement with the dense cache and the
// cache's exact KV size.
//
// Protocol, per window of W tokens: the first P tokens are prefilled (attention exact
// over them) and handed to the cache, which compresses or selects them; the remaining
// tokens are decoded one at a time through the cache, and each decode step's
// prediction of the next token is scored. --prefill 0 streams every token through
// the cache. The dense reference runs the same window in one exact prefill.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <sys/resource.h>

#include <lexico/cache/factory.hpp>
#include <lexico/model/llama.hpp>

#include "cli.hpp"

namespace {

const char* const usage =
    "usage: lexico-eval --model DIR|FILE.bin (--tokens FILE.u16 | --text FILE) [options]\n"
    "  --cache NAME[:K=V,..] cache type and options (default dense); repeat it to compare several\n"
    "                        caches on the same windows; --cache help lists types and options\n"
    "  --opt KEY=VALUE       an option of the last --cache (repeatable), or several as KEY=V,KEY=V\n"
    "  --dict DIR            dictionaries for --cache lexico (same as --opt dict=DIR)\n"
    "  --window W            tokens per window, BOS first (default: model context, at most 1024)\n"
    "  --windows K           windows to run, consecutive from the start of the corpus (default 1)\n"
    "  --documents MARK      with --text: a document starts at every occurrence of MARK; each is\n"
    "                        tokenized behind its own BOS, and each window is the first W tokens\n"
    "                        of one document (documents shorter than W are passed over)\n"
    "  --skip K              skip the first K windows (tune on windows that are not evaluated)\n"
    "  --prefill P           tokens prefilled exactly before decoding (default W/2; 0 streams all)\n"
    "  --tokenizer PATH      tokenizer for --text (default: the model's own)\n"
    "  --json                print one JSON object instead of the text report\n"
    "  --per-token           with --json: add token_delta_nll, each scored token's NLL minus the dense\n"
    "                        cache's, in scoring order (for paired comparisons between runs)\n"
    "  --token-detail        with --per-token: add token_ids (each scored token) and token_dense_nll\n"
    "                        (its NLL under the exact dense cache), to see which tokens a cache costs\n"
    "  --batch B             decode B windows at once, each in its own cache (default 1): the\n"
    "                        weights are read once per step for all B; tokens/s is then the\n"
    "                        batch's throughput. Scores equal B = 1's up to rounding\n";

struct CacheSpec {
  std::string name;
  lexico::CacheOptions options;
};

struct Args {
  std::string model, tokens, text, tokenizer, documents;
  std::vector<CacheSpec> caches;
  int window = 0, windows = 1, skip = 0, prefill = -1, batch = 1;
  bool json = false, per_token = false, token_detail = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  auto add_options = [&](const std::string& text) {
    if (a.caches.empty()) a.caches.push_back({"dense", {}});
    try {
      const lexico::CacheOptions parsed = lexico::CacheOptions::parse(text);
      for (const auto& [key, value] : parsed.values()) a.caches.back().options.set(key, value);
    } catch (const lexico::error& e) {
      throw cli::usage_error(std::string("cache options '") + text + "': " + e.what());
    }
  };
  auto add_cache = [&](const std::string& spec) {
    const std::size_t colon = spec.find(':');
    a.caches.push_back({spec.substr(0, colon), {}});
    if (colon != std::string::npos) add_options(spec.substr(colon + 1));
  };
  cli::parse_flags(
      argc, argv,
      {{"--model", [&](const std::string& v) { a.model = v; }},
       {"--tokens", [&](const std::string& v) { a.tokens = v; }},
       {"--text", [&](const std::string& v) { a.text = v; }},
       {"--tokenizer", [&](const std::string& v) { a.tokenizer = v; }},
       {"--documents", [&](const std::string& v) {
          if (v.empty()) throw cli::usage_error("--documents needs a non-empty mark");
          a.documents = v;
        }},
       {"--cache", add_cache},
       {"--opt", add_options},
       {"--dict", [&](const std::string& v) { add_options("dict=" + v); }},
       {"--window", [&](const std::string& v) { a.window = cli::parse_number<int>("--window", v, 2, 1 << 20); }},
       {"--windows", [&](const std::string& v) { a.windows = cli::parse_number<int>("--windows", v, 1, 1 << 20); }},
       {"--skip", [&](const std::string& v) { a.skip = cli::parse_number<int>("--skip", v, 0, 1 << 20); }},
       {"--prefill", [&](const std::string& v) { a.prefill = cli::parse_number<int>("--prefill", v, 0, 1 << 20); }},
       {"--batch", [&](const std::string& v) { a.batch = cli::parse_number<int>("--batch", v, 1, 256); }},
       {"--json", [&](const std::string&) { a.json = true; }},
       {"--per-token", [&](const std::string&) { a.per_token = true; }},
       {"--token-detail", [&](const std::string&) { a.token_detail = true; }}},
      usage, {"--json", "--per-token", "--token-detail"});
  if (a.caches.empty()) a.caches.push_back({"dense", {}});
  if (a.caches.front().name == "help") {
    std::fputs(lexico::cache_help().c_str(), stdout);
    std::exit(0);
  }
  if (a.model.empty()) throw cli::usage_error("--model is required");
  if (a.per_token && !a.json) throw cli::usage_error("--per-token needs --json");
  if (a.token_detail && !a.per_token) throw cli::usage_error("--token-detail needs --per-token");
  if (a.tokens.empty() == a.text.empty()) throw cli::usage_error("give exactly one of --tokens FILE.u16 and --text FILE");
  if (!a.documents.empty() && a.text.empty()) throw cli::usage_error("--documents needs --text");
  for (const std::string* path : {&a.model, &a.tokens, &a.text, &a.tokenizer}) cli::require_file(*path);
  return a;
}

// log softmax(logits), in double.
std::vector<double> log_softmax(const float* logits, int vocab) {
  const float top = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - top));
  const double shift = static_cast<double>(top) + std::log(sum);
  std::vector<double> out(static_cast<std::size_t>(vocab));
  for (int i = 0; i < vocab; ++i) out[static_cast<std::size_t>(i)] = static_cast<double>(logits[i]) - shift;
  return out;
}

// KL(dense || cache) of one prediction: how far the cache moved the whole next-token
// distribution, a less noisy signal than the NLL of the one observed token.
double kl_divergence(const std::vector<double>& dense_log_p, const std::vector<double>& log_p) {
  double kl = 0;
  for (std::size_t i = 0; i < log_p.size(); ++i) kl += std::exp(dense_log_p[i]) * (dense_log_p[i] - log_p[i]);
  return kl;
}

int argmax(const float* logits, int vocab) { return static_cast<int>(std::max_element(logits, logits + vocab) - logits); }

// One cache configuration's running sums over every window.
struct ScoredToken {
  double delta_nll;  // NLL minus the exact dense cache's
  double dense_nll;
  int id;
};

struct Result {
  std::vector<std::unique_ptr<lexico::KVCache>> caches;  // one per window of a batch
  double nll = 0, dense_nll = 0, delta_squares = 0, kl = 0, kv_fraction = 0, decode_seconds = 0, prefill_seconds = 0;
  double kv_fraction_steps = 0;  // summed after every decode step
  long scored = 0, agree = 0, decoded = 0, prefilled = 0;
  std::vector<ScoredToken> tokens;  // each scored token, in scoring order (--per-token)

  lexico::KVCache& cache() const { return *caches.front(); }
  // KV size averaged over decode steps: what a sequence holds on average while it
  // decodes, beside the size at the window's end (kv_fraction).
  double kv_fraction_decode_mean() const { return decoded ? kv_fraction_steps / static_cast<double>(decoded) : 0.0; }

  double mean_nll() const { return nll / static_cast<double>(scored); }
  double dense_mean_nll() const { return dense_nll / static_cast<double>(scored); }
  double mean_kl() const { return kl / static_cast<double>(scored); }
  // Standard error of ΔNLL from the per-token differences, the tokens taken as
  // independent (they are not quite, so it is a lower bound on the noise).
  double delta_nll_se() const {
    const double n = static_cast<double>(scored), mean = mean_nll() - dense_mean_nll();
    return scored > 1 ? std::sqrt(std::max(0.0, delta_squares / n - mean * mean) / (n - 1)) : 0.0;
  }
  double top1() const { return static_cast<double>(agree) / static_cast<double>(scored); }
  double decode_rate() const { return static_cast<double>(decoded) / decode_seconds; }
  double prefill_rate() const { return prefilled > 0 ? static_cast<double>(prefilled) / prefill_seconds : 0.0; }
};

// Consecutive windows of W tokens from the start of the corpus, BOS first; the first
// `skip` of them are passed over. With `document_starts`, each window is instead the first
// W tokens of one document (a run that starts with BOS), and shorter documents are passed over.
std::vector<std::vector<int>> first_windows(const std::vector<int>& tokens, int length, int skip, int count, int bos,
                                            bool document_starts) {
  std::vector<std::vector<int>> windows;
  for (std::size_t start = 0; windows.size() < static_cast<std::size_t>(skip + count); ) {
    std::vector<int> window;
    if (bos >= 0 && (start >= tokens.size() || tokens[start] != bos)) window.push_back(bos);
    while (window.size() < static_cast<std::size_t>(length) && start < tokens.size()) {
      if (document_starts && !window.empty() && tokens[start] == bos) window.clear();  // too short: the next one
      window.push_back(tokens[start++]);
    }
    if (window.size() < static_cast<std::size_t>(length)) break;
    windows.push_back(std::move(window));
    while (document_starts && start < tokens.size() && tokens[start] != bos) ++start;
  }
  windows.erase(windows.begin(), windows.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(static_cast<std::size_t>(skip), windows.size())));
  return windows;
}

// The text of `path` cut before every occurrence of `mark`, each piece tokenized behind
// a BOS (the text before the first mark too, when there is any).
std::vector<int> document_tokens(const std::string& path, const std::string& tokenizer_path, const std::string& mark,
                                 const lexico::LlamaModel& model) {
  const int bos = model.config().bos_id;
  lexico::require(bos >= 0, "--documents: the model has no BOS token to open each document with");
  const std::string text = lexico::read_file(path, std::size_t(1) << 31);
  const auto tokenizer = lexico::load_tokenizer(tokenizer_path);
  std::vector<int> tokens;
  for (std::size_t begin = 0; begin < text.size();) {
    const std::size_t next = text.find(mark, begin + (text.compare(begin, mark.size(), mark) == 0 ? mark.size() : 0));
    const std::size_t end = next == std::string::npos ? text.size() : next;
    tokens.push_back(bos);
    const std::vector<int> piece = tokenizer->encode(std::string_view(text).substr(begin, end - begin), false);
    tokens.insert(tokens.end(), piece.begin(), piece.end());
    begin = end;
  }
  cli::require_in_vocabulary(tokens, path, model);
  return tokens;
}

// The dense model's view of a window: argmax and log-probabilities of every prediction.
struct Reference {
  std::vector<int> argmax;
  std::vector<std::vector<double>> log_p;
};

Reference dense_reference(lexico::LlamaRunner& runner, const std::vector<int>& tokens, lexico::KVCache& dense) {
  const int vocab = runner.model().config().vocab;
  dense.clear();
  const lexico::RowMatrix logits = runner.prefill(tokens, dense);
  Reference reference;
  for (std::size_t p = 0; p + 1 < tokens.size(); ++p) {
    const float* row = logits.row(static_cast<Eigen::Index>(p)).data();
    reference.argmax.push_back(argmax(row, vocab));
    reference.log_p.push_back(log_softmax(row, vocab));
  }
  return reference;
}

// The process's peak resident set (getrusage: ru_maxrss is in KiB on Linux).
std::size_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::size_t>(usage.ru_maxrss) * 1024;
}

// Shared per-model bytes of every cache built, each shared state counted once.
std::size_t shared_bytes(const std::vector<Result>& results) {
  std::set<const void*> counted;
  std::size_t total = 0;
  for (const Result& r : results)
    if (r.cache().shared_state() && counted.insert(r.cache().shared_state()).second) total += r.cache().shared_bytes();
  return total;
}

void print_json(const Args& args, const Result& r, int window, std::size_t windows, int prefill, std::size_t shared) {
  const lexico::CacheBytes bytes = r.cache().bytes();
  std::printf(
      "{\"model\": \"%s\", \"cache\": \"%s\", \"parameters\": \"%s\", \"window\": %d, \"windows\": %zu, "
      "\"prefill\": %d, \"scored_tokens\": %ld, \"mean_nll\": %.6f, \"perplexity\": %.4f, "
      "\"dense_mean_nll\": %.6f, \"delta_nll\": %.6f, \"delta_nll_se\": %.6f, \"mean_kl\": %.7f, \"top1_agreement\": %.6f, \"kv_size_fraction\": %.6f, "
      "\"bytes_payload\": %zu, \"bytes_metadata\": %zu, \"bytes_buffer\": %zu, \"bytes_overhead\": %zu, "
      "\"bytes_cache_shared\": %zu, \"bytes_shared\": %zu, \"peak_rss_bytes\": %zu, \"tokens_per_second\": %.2f, "
      "\"prefill_tokens_per_second\": %.2f, \"kv_size_fraction_decode_mean\": %.6f, \"batch\": %d",
      args.model.c_str(), r.cache().name().c_str(), r.cache().parameters().c_str(), window, windows, prefill, r.scored,
      r.mean_nll(), std::exp(r.mean_nll()), r.dense_mean_nll(), r.mean_nll() - r.dense_mean_nll(), r.delta_nll_se(),
      r.mean_kl(),
      r.top1(), r.kv_fraction, bytes.payload, bytes.metadata, bytes.buffer, r.cache().overhead_bytes(),
      r.cache().shared_bytes(), shared, peak_rss_bytes(), r.decode_rate(), r.prefill_rate(), r.kv_fraction_decode_mean(),
      args.batch);
  if (args.per_token) {
    auto print_array = [&](const char* name, const char* format, auto field) {
      std::printf(", \"%s\": [", name);
      for (std::size_t i = 0; i < r.tokens.size(); ++i) {
        if (i) std::fputc(',', stdout);
        std::printf(format, field(r.tokens[i]));
      }
      std::printf("]");
    };
    print_array("token_delta_nll", "%.6g", [](const ScoredToken& t) { return t.delta_nll; });
    if (args.token_detail) {
      print_array("token_ids", "%d", [](const ScoredToken& t) { return t.id; });
      print_array("token_dense_nll", "%.6g", [](const ScoredToken& t) { return t.dense_nll; });
    }
  }
  std::printf("}\n");
}

void print_table(const std::vector<Result>& results) {
  std::printf("%-8s %-44s %8s %9s %9s %9s %8s %9s\n", "cache", "parameters", "KV size", "mean NLL", "delta",
              "KL", "top-1", "tokens/s");
  for (const Result& r : results)
    std::printf("%-8s %-44s %7.2f%% %9.4f %+9.4f %9.6f %7.2f%% %9.1f\n", r.cache().name().c_str(),
                r.cache().parameters().c_str(), 100 * r.kv_fraction, r.mean_nll(), r.mean_nll() - r.dense_mean_nll(),
                r.mean_kl(), 100 * r.top1(), r.decode_rate());
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
      args.documents.empty()
          ? cli::read_corpus(args.tokens.empty() ? args.text : args.tokens, args.tokens.empty() ? tokenizer : "", model)
          : document_tokens(args.text, tokenizer, args.documents, model);
  const auto windows = first_windows(corpus, window, args.skip, args.windows, config.bos_id, !args.documents.empty());
  lexico::require(!windows.empty(), "the corpus holds no complete window of ", window, " tokens after skipping ",
                  args.skip, args.documents.empty() ? "" : " (windows open documents: is every document shorter?)");

  const auto batch = std::min<std::size_t>(static_cast<std::size_t>(args.batch), windows.size());
  std::vector<Result> results;
  for (const CacheSpec& spec : args.caches) {
    results.emplace_back();
    for (std::size_t b = 0; b < batch; ++b)
      results.back().caches.push_back(lexico::make_cache(spec.name, config.cache_shape(), spec.options));
  }
  lexico::DenseCache<float> dense(config.cache_shape());
  lexico::LlamaRunner runner(model);
  cli::ProgressBar bar;
  const auto started = Clock::now();
  const double steps = static_cast<double>(windows.size() * results.size()) * window;
  double done = 0;
  // Windows go in groups of `batch`: every cache decodes its group in step, each window in
  // its own cache; each window's tokens are scored in the order a lone run scores them.
  for (std::size_t first = 0; first < windows.size(); first += batch) {
    const std::size_t group = std::min(batch, windows.size() - first);
    std::vector<Reference> references;
    for (std::size_t b = 0; b < group; ++b) references.push_back(dense_reference(runner, windows[first + b], dense));
    for (Result& r : results) {
      std::vector<lexico::KVCache*> caches;
      const auto prefill_start = Clock::now();
      for (std::size_t b = 0; b < group; ++b) {
        caches.push_back(r.caches[b].get());
        caches.back()->clear();
        const std::vector<int>& tokens = windows[first + b];
        if (prefill > 0) runner.prefill(std::vector<int>(tokens.begin(), tokens.begin() + prefill), *caches.back());
      }
      const auto decode_start = Clock::now();
      r.prefill_seconds += std::chrono::duration<double>(decode_start - prefill_start).count();
      r.prefilled += static_cast<long>(group) * prefill;
      done += static_cast<double>(group) * prefill;
      std::vector<std::vector<ScoredToken>> group_tokens(group);
      std::vector<int> step_tokens(group);
      for (int p = prefill; p < window; ++p) {
        for (std::size_t b = 0; b < group; ++b) step_tokens[b] = windows[first + b][static_cast<std::size_t>(p)];
        const lexico::RowMatrix* batch_logits = group > 1 ? &runner.decode_batch(step_tokens, caches) : nullptr;
        const float* lone_logits = group > 1 ? nullptr : runner.decode(step_tokens[0], *caches[0]).data();
        for (std::size_t b = 0; b < group; ++b) {
          const float* logits = batch_logits ? batch_logits->row(static_cast<Eigen::Index>(b)).data() : lone_logits;
          const std::vector<int>& tokens = windows[first + b];
          ++r.decoded;
          r.kv_fraction_steps += caches[b]->kv_size_fraction();
          if (p + 1 >= window) continue;
          const std::vector<double> log_p = log_softmax(logits, config.vocab);
          const std::vector<double>& dense_log_p = references[b].log_p[static_cast<std::size_t>(p)];
          const auto target = static_cast<std::size_t>(tokens[static_cast<std::size_t>(p + 1)]);
          r.nll -= log_p[target];
          r.dense_nll -= dense_log_p[target];
          const double delta = dense_log_p[target] - log_p[target];
          r.delta_squares += delta * delta;
          if (args.per_token) group_tokens[b].push_back({delta, -dense_log_p[target], static_cast<int>(target)});
          r.kl += kl_divergence(dense_log_p, log_p);
          r.agree += argmax(logits, config.vocab) == references[b].argmax[static_cast<std::size_t>(p)];
          ++r.scored;
        }
        done += static_cast<double>(group);
        const double elapsed = std::chrono::duration<double>(Clock::now() - started).count();
        char tail[128];
        std::snprintf(tail, sizeof tail, "window %zu/%zu %s nll %.4f", first + group, windows.size(),
                      r.cache().name().c_str(), r.scored ? r.mean_nll() : 0.0);
        bar.show("lexico-eval", done / steps, elapsed * (steps - done) / done, tail);
      }
      r.decode_seconds += std::chrono::duration<double>(Clock::now() - decode_start).count();
      for (std::size_t b = 0; b < group; ++b) {
        r.kv_fraction += caches[b]->kv_size_fraction() / static_cast<double>(windows.size());
        r.tokens.insert(r.tokens.end(), group_tokens[b].begin(), group_tokens[b].end());
      }
    }
  }
  if (args.json) {
    const std::size_t shared = shared_bytes(results);
    for (const Result& r : results) print_json(args, r, window, windows.size(), prefill, shared);
    return 0;
  }
  std::printf("model %s, %zu window(s) of %d tokens, prefill %d, %ld scored tokens per cache\n", args.model.c_str(),
              windows.size(), window, prefill, results.front().scored);
  print_table(results);
  std::printf("shared per-model state %.1f MiB, peak resident set %.1f MiB\n", shared_bytes(results) / 1048576.0,
              peak_rss_bytes() / 1048576.0);
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
