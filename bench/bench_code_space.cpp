// The per-model state under each Gram policy: bytes held (computed and measured by the
// allocator) and OMP encode throughput on a dictionary set's real dev vectors.
//
// Data: LEXICO_DICT=DIR, a dictionary set written by lexico-train, with the dev vectors
// it collected (DIR/vectors/dev/layerNN.{k,v}.vec; pass --work to lexico-train to keep
// them elsewhere and point LEXICO_VECTORS=DIR/vectors there). Every dictionary codes
// its own layer's vectors, all 2·L dictionaries in turn, as a cache's flushes do.
//
//   LEXICO_DICT=dicts/proxy-lm-hd128 build/bench/bench_code_space --benchmark_repetitions=3

#include <lexico/coding/code_space.hpp>
#include <lexico/coding/dictionary_set.hpp>
#include <lexico/training/kv_collect.hpp>

#include <benchmark/benchmark.h>

#include <malloc.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

std::size_t allocated_bytes() {
  const struct mallinfo2 info = mallinfo2();
  return info.uordblks + info.hblkhd;
}

const char* dictionary_dir() { return std::getenv("LEXICO_DICT"); }

// Each layer's first 2048 dev keys and values (d x M), read once.
const std::vector<lexico::LayerVectors>& dev_vectors(int layers) {
  static std::vector<lexico::LayerVectors> vectors = [layers] {
    const char* root = std::getenv("LEXICO_VECTORS");
    const std::string dir = root ? std::string(root) + "/dev" : std::string(dictionary_dir()) + "/vectors/dev";
    std::vector<lexico::LayerVectors> out(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; ++l) {
      out[static_cast<std::size_t>(l)].keys = lexico::VectorFile(lexico::kv_vector_path(dir, l, true)).read_head(2048);
      out[static_cast<std::size_t>(l)].values = lexico::VectorFile(lexico::kv_vector_path(dir, l, false)).read_head(2048);
    }
    return out;
  }();
  return vectors;
}

// Builds the CodeSpace of the set under one policy: time, computed and measured bytes.
void BM_BuildCodeSpace(benchmark::State& state) {
  if (!dictionary_dir()) return state.SkipWithError("set LEXICO_DICT to a dictionary set written by lexico-train");
  const auto policy = static_cast<lexico::GramPolicy>(state.range(0));
  const lexico::DictionarySet set = lexico::load_dictionaries(dictionary_dir());
  std::size_t computed = 0, measured = 0;
  for (auto _ : state) {
    lexico::CodeSpaceOptions options;
    options.gram = policy;
    const std::size_t before = allocated_bytes();
    auto space = std::make_unique<lexico::CodeSpace>(set.layers, options);
    measured = allocated_bytes() - before;
    computed = space->bytes();
    benchmark::DoNotOptimize(space.get());
  }
  const double atoms_fp16 = 2.0 * set.manifest.head_dim * set.manifest.atoms * 2 * set.manifest.layers;
  state.counters["computed_MiB"] = static_cast<double>(computed) / 1048576.0;
  state.counters["measured_MiB"] = static_cast<double>(measured) / 1048576.0;
  state.counters["x_fp16_atoms"] = static_cast<double>(computed) / atoms_fp16;
  state.SetLabel(lexico::to_string(policy));
}

// Codes every layer's dev keys and values (2048 each) with its own dictionaries at s atoms.
void BM_EncodeDevVectors(benchmark::State& state) {
  if (!dictionary_dir()) return state.SkipWithError("set LEXICO_DICT to a dictionary set written by lexico-train");
  const auto policy = static_cast<lexico::GramPolicy>(state.range(0));
  const int sparsity = static_cast<int>(state.range(1)), threads = static_cast<int>(state.range(2));
  lexico::CodeSpaceOptions options;
  options.gram = policy;
  options.threads = threads;
  const lexico::DictionarySet set = lexico::load_dictionaries(dictionary_dir());
  const lexico::CodeSpace space(set.layers, options);
  const auto& vectors = dev_vectors(space.layers());
  std::vector<lexico::OmpEncoder> encoders;
  for (int l = 0; l < space.layers(); ++l)
    for (bool keys : {true, false}) encoders.push_back(space.encoder(l, keys, sparsity, 0.0f));
  lexico::SparseCodes codes;
  // Flush-sized batches (32 tokens x 2 KV heads), the way a cache codes while decoding,
  // or 2048 at once, the way a prefill codes a prompt.
  const Eigen::Index batch = state.range(3);
  Eigen::Index coded = 0;
  for (auto _ : state) {
    for (int l = 0; l < space.layers(); ++l)
      for (int part = 0; part < 2; ++part) {
        const Eigen::MatrixXf& x = part == 0 ? vectors[static_cast<std::size_t>(l)].keys : vectors[static_cast<std::size_t>(l)].values;
        const lexico::OmpEncoder& encoder = encoders[static_cast<std::size_t>(2 * l + part)];
        for (Eigen::Index first = 0; first + batch <= x.cols(); first += batch) {
          encoder.encode(x.middleCols(first, batch), codes);
          coded += batch;
        }
      }
  }
  state.counters["vectors/s"] = benchmark::Counter(static_cast<double>(coded), benchmark::Counter::kIsRate);
  if (policy == lexico::GramPolicy::on_demand) {
    std::uint64_t hits = 0, misses = 0;
    for (int l = 0; l < space.layers(); ++l)
      for (const lexico::CodeBook* book : {&space.keys(l), &space.values(l)}) {
        hits += book->column_hits();
        misses += book->column_misses();
      }
    state.counters["hot_hit_rate"] = static_cast<double>(hits) / static_cast<double>(hits + misses);
  }
  state.counters["shared_MiB"] = static_cast<double>(space.bytes()) / 1048576.0;
  state.SetLabel(lexico::to_string(policy));
}

BENCHMARK(BM_BuildCodeSpace)->ArgName("policy")->Arg(0)->Arg(1)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodeDevVectors)
    ->ArgNames({"policy", "s", "threads", "batch"})
    ->ArgsProduct({{0, 1}, {4, 8, 32}, {1, 2}, {64}})
    ->ArgsProduct({{0}, {4, 8}, {1, 2}, {2048}})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
