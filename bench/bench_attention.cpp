// Decode-step attention of one layer (d = 128, 8 query heads over 2 KV heads) on the
// Lexico cache (N = 4096, s = 8, codes only: the buffer is empty at measurement; keys
// coded after RoPE with 12- or 16-bit indices, or before RoPE at s = 8 and s = 4, the latter
// also with residuals of 2 bits for keys and 1 for values, or 2 for both) and on dense
// fp32 / fp16 caches, for contexts of 1k to 64k tokens; and the cost of
// appending a token (OMP amortised over flushes of n_a tokens).
//
//   ./build/bench/bench_attention --benchmark_min_time=0.2
#include <lexico/cache/dense.hpp>
#include <lexico/cache/lexico_cache.hpp>

#include <benchmark/benchmark.h>

#include <memory>
#include <vector>
#include <random>

namespace {

constexpr int head_dim = 128, kv_heads = 2, q_heads = 8, atoms = 4096, sparsity = 8;

std::shared_ptr<const lexico::Dictionary> random_dictionary(unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Eigen::MatrixXf d(head_dim, atoms);
  for (Eigen::Index i = 0; i < d.size(); ++i) d.data()[i] = normal(rng);
  return std::make_shared<const lexico::Dictionary>(d);
}

const std::vector<lexico::LayerDictionaries>& dictionaries() {
  static const std::vector<lexico::LayerDictionaries> dicts{{random_dictionary(1), random_dictionary(2)}};
  return dicts;
}

lexico::RowMatrix random_rows(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  lexico::RowMatrix m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

constexpr lexico::CacheShape shape{1, kv_heads, head_dim};

lexico::LexicoOptions lexico_options(int buffer, int flush, float atom_pool) {
  lexico::LexicoOptions options;
  options.key_sparsity = options.value_sparsity = sparsity;
  options.buffer = buffer;
  options.flush = flush;
  options.atom_pool = atom_pool;
  return options;
}

std::unique_ptr<lexico::KVCache> make(int kind, int buffer, int flush, float atom_pool = 0) {
  switch (kind) {
    case 0:
    case 3:    // 3: indices kept at 16 bits, as in the paper
    case 4:    // 4: keys coded before RoPE
    case 5:    // 5: keys coded before RoPE, s = 4 (RESULTS.md's quality setting's sparsity)
    case 6:    // 6: as 5 with 2-bit key and 1-bit value residuals
    case 7: {  // 7: as 5 with 2-bit residuals
      lexico::LexicoOptions options = lexico_options(buffer, flush, atom_pool);
      options.pack_indices = kind != 3;
      if (kind >= 5) options.key_sparsity = options.value_sparsity = 4;
      if (kind >= 6) options.key_residual_bits = 2;
      if (kind >= 6) options.value_residual_bits = kind == 6 ? 1 : 2;
      lexico::CodeSpaceOptions space;
      if (kind >= 4) space.key_rope = lexico::Rope(head_dim, 10000.0f, lexico::RopeStyle::rotate_half);
      return std::make_unique<lexico::LexicoCache>(shape, dictionaries(), options, space);
    }
    case 1: return std::make_unique<lexico::DenseCache<float>>(shape);
    default: return std::make_unique<lexico::DenseCache<Eigen::half>>(shape);
  }
}

// Fills a cache with T tokens, all coded (buffer 0), then times one attend().
void BM_DecodeAttention(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  const Eigen::Index tokens = state.range(1);
  auto cache = make(kind, 0, 256);
  const lexico::RowMatrix keys = random_rows(tokens, kv_heads * head_dim, 3);
  const lexico::RowMatrix values = random_rows(tokens, kv_heads * head_dim, 4);
  for (Eigen::Index t = 0; t < tokens; ++t) cache->append(0, keys.row(t).data(), values.row(t).data());
  const lexico::RowMatrix queries = random_rows(q_heads, head_dim, 5);
  lexico::RowMatrix out(q_heads, head_dim);
  for (auto _ : state) {
    cache->attend(0, queries, out);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetLabel(cache->name() + " " + cache->parameters());
  state.counters["KV_bytes"] = static_cast<double>(cache->bytes().total());
}
BENCHMARK(BM_DecodeAttention)
    ->ArgNames({"cache", "T"})
    ->ArgsProduct({{0, 3, 4, 5, 6, 7, 1, 2}, {1024, 4096, 16384, 65536}})
    ->Unit(benchmark::kMicrosecond);

// What the machine streams: a sum over as many bytes as a dense fp16 cache's K and V
// for T tokens of this layer (T x 2 KV heads x 128 x 2 bytes x 2), read the same way as
// decode attention reads them (every call, all threads of the OpenMP default), so a
// kernel's bytes / time can be set against bytes_per_second here.
void BM_ReadBandwidth(benchmark::State& state) {
  const Eigen::Index tokens = state.range(0);
  const std::size_t floats = static_cast<std::size_t>(tokens) * kv_heads * head_dim;  // fp16 K + V bytes / 4
  std::vector<float, lexico::LargePageAllocator<float>> data(floats, 1.0f);  // as the caches' token rows
  for (auto _ : state) {
    float total = 0.0f;
    const float* p = data.data();
#pragma omp parallel for simd reduction(+ : total) schedule(static)
    for (std::size_t i = 0; i < floats; ++i) total += p[i];
    benchmark::DoNotOptimize(total);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(floats * sizeof(float)));
}
BENCHMARK(BM_ReadBandwidth)->ArgName("T")->Arg(16384)->Arg(65536)->Unit(benchmark::kMicrosecond);

// Per-token append of one layer with the buffer full: n_a = 1 codes a token every
// step, n_a = 32 codes 32 tokens every 32 steps; pool = 2 codes at 2s and shares s
// atoms per vector within each flush (LexicoOptions::atom_pool).
void time_appends(benchmark::State& state, const std::unique_ptr<lexico::KVCache>& cache) {
  const Eigen::Index pool = 4096;
  const lexico::RowMatrix keys = random_rows(pool, kv_heads * head_dim, 6);
  const lexico::RowMatrix values = random_rows(pool, kv_heads * head_dim, 7);
  Eigen::Index t = 0;
  for (; t < 128; ++t) cache->append(0, keys.row(t).data(), values.row(t).data());
  for (auto _ : state) {
    cache->append(0, keys.row(t % pool).data(), values.row(t % pool).data());
    ++t;
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_LexicoAppend(benchmark::State& state) {
  time_appends(state, make(0, 128, static_cast<int>(state.range(0)), static_cast<float>(state.range(1))));
}
BENCHMARK(BM_LexicoAppend)->ArgNames({"flush", "pool"})->ArgsProduct({{1, 32}, {0, 2}})->Unit(benchmark::kMicrosecond);

// The same with a recent tier (96 tokens at 32 atoms, then re-coded at s = 8, n_b = 32,
// n_a = 32): pooled = 0 off, 1 every tier pools (the tier up to 64 atoms), 2 only the
// long-term codes pool (LexicoOptions::pool_recent_tiers = false).
void BM_LexicoAppendTier(benchmark::State& state) {
  const int pooled = static_cast<int>(state.range(0));
  lexico::LexicoOptions options = lexico_options(32, 32, pooled > 0 ? 2.0f : 0.0f);
  options.tiers = {{96, 32, 32}};
  options.pool_recent_tiers = pooled != 2;
  time_appends(state, std::make_unique<lexico::LexicoCache>(shape, dictionaries(), options));
}
BENCHMARK(BM_LexicoAppendTier)->ArgName("pooled")->DenseRange(0, 2)->Unit(benchmark::kMicrosecond);

// Append with RESULTS.md's quality setting's shape (s = 4, n_b = 32, n_a = 32): tier 0 none,
// 1 the 128-token tier at 32 atoms, 2 and 3 the same tier held as q8_0 / q4_0 rows that
// are coded once at s as they leave it.
void BM_LexicoAppendQualityTier(benchmark::State& state) {
  const int tier = static_cast<int>(state.range(0));
  lexico::LexicoOptions options = lexico_options(32, 32, 0.0f);
  options.key_sparsity = options.value_sparsity = 4;
  if (tier > 0) options.tiers = {{128, 32, 32}};
  if (tier == 2) options.recent_format = lexico::LexicoOptions::RecentFormat::q8_0;
  if (tier == 3) options.recent_format = lexico::LexicoOptions::RecentFormat::q4_0;
  time_appends(state, std::make_unique<lexico::LexicoCache>(shape, dictionaries(), options));
}
BENCHMARK(BM_LexicoAppendQualityTier)->ArgName("tier")->DenseRange(0, 3)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
