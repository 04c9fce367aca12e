// One model decode step through a cache: LlamaRunner::decode on a real model, after a
// prefill, for each cache of LEXICO_CACHES. What the cache adds to a step (coding,
// attention on codes, the tiers) shows beside the model's own GEMVs, which a dense fp16
// cache's step is nearly all of.
//
//   export LEXICO_MODEL=../shared/data/proxy-lm-hd128 LEXICO_TOKENS=../shared/data/bpe4k/tokens_dev.u16
//   export LEXICO_CACHES='dense:dtype=fp16;lexico:dict=dictionaries/proxy-lm-hd128,s=4,layer_s=auto,...'
//   build/bench/bench_decode --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
//
// Each sequence prefills LEXICO_PREFILL tokens (default 512) and decodes the next 512
// (context 512 to 1,023 by default), then a new sequence starts on the following tokens;
// prefills are outside the timing. With PERF_CTL=FIFO (and PERF_ACK=FIFO), perf's control
// pipes (`perf record -D -1 --control fifo:FIFO,ACK`) are enabled around the decode steps
// only, so a profile holds no prefill and no set-up (loading, the CodeSpace's Gram matrices).
#include <lexico/cache/factory.hpp>
#include <lexico/model/llama.hpp>
#include <lexico/training/kv_collect.hpp>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

namespace {

constexpr std::size_t decode_tokens = 512;

// LEXICO_PREFILL tokens (default 512) before the decode steps: a long prefill profiles
// a step at long context (proxy-lm-hd128-8k at 7,168, where the cache sets the pace).
std::size_t prefill_tokens() {
  const char* text = std::getenv("LEXICO_PREFILL");
  if (!text || !*text) return 512;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < 1 || value > 1 << 20)
    throw std::invalid_argument(std::string("LEXICO_PREFILL: '") + text + "' is not a token count in 1..1048576");
  return static_cast<std::size_t>(value);
}

std::vector<std::string> cache_specs() {
  const char* list = std::getenv("LEXICO_CACHES");
  std::vector<std::string> specs;
  std::string text = list ? list : "dense:dtype=fp16";
  for (std::size_t begin = 0; begin <= text.size();) {
    const std::size_t end = std::min(text.find(';', begin), text.size());
    if (end > begin) specs.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return specs;
}

// Writes a command to perf's control pipe and waits for its acknowledgement (no-op
// without PERF_CTL).
void perf_control(const char* command) {
  const char* control = std::getenv("PERF_CTL");
  if (!control) return;
  std::ofstream(control) << command << std::flush;
  if (const char* ack = std::getenv("PERF_ACK")) {
    std::ifstream reply(ack);
    std::string line;
    std::getline(reply, line);
  }
}

void BM_DecodeStep(benchmark::State& state) {
  const char* model_dir = std::getenv("LEXICO_MODEL");
  const char* tokens_path = std::getenv("LEXICO_TOKENS");
  if (!model_dir || !*model_dir || !tokens_path || !*tokens_path)
    return state.SkipWithError("set LEXICO_MODEL and LEXICO_TOKENS (a .u16 corpus)");
  static std::unique_ptr<const lexico::LlamaModel> model;
  static std::vector<int> tokens;
  const std::string spec = cache_specs().at(static_cast<std::size_t>(state.range(0)));
  std::unique_ptr<lexico::KVCache> cache;
  std::size_t prefill = 0;
  try {
    prefill = prefill_tokens();
    if (!model) model = std::make_unique<const lexico::LlamaModel>(lexico::LlamaModel::load(model_dir));
    if (tokens.empty()) tokens = lexico::read_u16_tokens(tokens_path);
    const std::size_t colon = spec.find(':');
    const auto options = lexico::CacheOptions::parse(colon == std::string::npos ? "" : spec.substr(colon + 1));
    cache = lexico::make_cache(spec.substr(0, colon), model->config().cache_shape(), options);
  } catch (const std::exception& e) {
    return state.SkipWithError((spec + ": " + e.what()).c_str());
  }
  lexico::LlamaRunner runner(*model);
  const std::size_t window = prefill + decode_tokens;
  if (tokens.size() < 2 * window) return state.SkipWithError("LEXICO_TOKENS holds fewer than two windows");
  std::size_t start = 0, next = 0;
  auto new_sequence = [&] {
    start = (start + window) % (tokens.size() / window * window);
    cache->clear();
    runner.prefill(std::vector<int>(tokens.begin() + static_cast<long>(start),
                                    tokens.begin() + static_cast<long>(start + prefill)), *cache);
    next = start + prefill;
  };
  new_sequence();
  perf_control("enable");
  for (auto _ : state) {
    if (next == start + window) {
      state.PauseTiming();
      perf_control("disable");
      new_sequence();
      perf_control("enable");
      state.ResumeTiming();
    }
    benchmark::DoNotOptimize(runner.decode(tokens[next++], *cache).data());
  }
  perf_control("disable");
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(spec.substr(0, 60));
}

void register_caches() {
  const auto specs = cache_specs();
  benchmark::RegisterBenchmark("BM_DecodeStep", BM_DecodeStep)
      ->ArgName("cache")
      ->DenseRange(0, static_cast<int>(specs.size()) - 1)
      ->MinTime(2.0)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  register_caches();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
