// Serving: one decode step of B concurrent sequences that each hold T tokens, for every
// layer of a model one attention call per sequence (or, "_batched", one
// LexicoCache::attend_batch call for all of them), on two model shapes:
//
//   llama3-8b    32 layers, 32 query heads over 8 KV heads, head_dim 128, N = 4096
//   proxy-hd128   8 layers,  4 query heads over 2 KV heads, head_dim 128, N = 4096
//
// and five caches: dense fp16; KIVI-2 (group 32, residual 128); llama.cpp q4_0; Lexico
// with keys coded after RoPE at s = 8 (buffer 128, flush 32); Lexico with keys coded
// before RoPE at s = 4 and a recent tier of 128 tokens at 32 atoms (buffer 128).
//
// Dictionaries are random unit-norm atoms, one key and one value dictionary per layer,
// built once per shape; the caches of one (shape, key form, Gram policy) share one
// CodeSpace. Lexico caches get most of their tokens as random codes (append_codes, no
// OMP) and the last buffer + tier tokens for real, so that the buffer and the tier hold
// what they hold in steady state. The other caches get random unit-scale normal K and V
// in blocks. Caches are built once per (shape, cache, B, T) and reused by the thread
// counts and the batched variant, which run right after each other.
//
// Counters: decode_step_ms (all sequences and layers), per_sequence_ms, kv_bytes (sum of
// bytes().total()), overhead_bytes, shared_bytes (once per shared_state()), and the
// allocator's view (glibc mallinfo2, in-use bytes): measured_shared_bytes (dictionaries,
// CodeSpace and a throw-away warm-up sequence: OMP workspaces, the main thread's
// scratch), measured_total_bytes (caches + shared), measured_per_sequence_bytes (caches
// only, / B), and rss_bytes (/proc/self/statm) at the end of the run: the whole process,
// including memory earlier benchmarks freed but the allocator kept (run one benchmark per
// process for a clean RSS).
//
// Threads: the `threads` argument goes to every cache (set_threads) and to attend_batch;
// nothing global is set. Eigen's own OpenMP GEMMs inside a call (u = Dᵀq, D_v · w) do not
// see it and use omp_get_max_threads(): on a shared machine run with OMP_NUM_THREADS=1
// (the explicit thread counts still apply) or threads=1 may not mean one thread.
//
// A cache with recent tiers is skipped while LexicoCache::append_codes refuses one (it
// asks for a single code tier), with the library's message.
//
// Combinations whose estimated KV + shared bytes exceed LEXICO_BENCH_MEMORY_GIB (default
// 12) are skipped with the reason. LEXICO_BENCH_GRAM = fp16 (default) | on_demand | both
// chooses the Gram policy of the Lexico code spaces.
//
//   ./build-bench/bench/bench_serving --benchmark_filter=proxy
//   ./build-bench/bench/bench_serving --benchmark_filter='T:4096/' --benchmark_repetitions=3
//       --benchmark_report_aggregates_only=true   (one command line)
//   LEXICO_BENCH_MEMORY_GIB=100 ./build-bench/bench/bench_serving --benchmark_filter='T:32768/'
#include <lexico/cache/dense.hpp>
#include <lexico/cache/factory.hpp>
#include <lexico/cache/kivi.hpp>
#include <lexico/cache/lexico_cache.hpp>

#include <benchmark/benchmark.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using lexico::CacheShape;
using lexico::GramPolicy;
using lexico::KVCache;
using lexico::LexicoCache;
using lexico::RowMatrix;

struct ModelShape {
  const char* name;
  int layers, q_heads, kv_heads, head_dim, atoms;

  CacheShape cache_shape() const { return {layers, kv_heads, head_dim}; }
  int kv_width() const { return kv_heads * head_dim; }
};

const ModelShape models[] = {
    {"llama3-8b", 32, 32, 8, 128, 4096},
    {"proxy-hd128", 8, 4, 2, 128, 4096},
};

enum class Kind { dense_fp16, kivi2, q4_0, lexico_s8, lexico_rope_s4_tier };

struct KindInfo {
  Kind kind;
  const char* name;
  bool lexico;
};

const KindInfo kinds[] = {
    {Kind::dense_fp16, "dense_fp16", false},
    {Kind::kivi2, "kivi2", false},
    {Kind::q4_0, "q4_0", false},
    {Kind::lexico_s8, "lexico_s8", true},
    {Kind::lexico_rope_s4_tier, "lexico_rope_s4_tier128x32", true},
};

constexpr int lexico_buffer = 128, lexico_flush = 32;
constexpr int tier_tokens = 128, tier_sparsity = 32;
constexpr int kivi_bits = 2, kivi_group = 32, kivi_residual = 128;
constexpr Eigen::Index row_pool_tokens = 1024, row_chunk = 512;  // random K/V rows, block size
constexpr Eigen::Index code_pool_tokens = 512, code_pools = 4;     // random codes per block

// ---- memory -----------------------------------------------------------------------

// Bytes the allocator has handed out and not got back (all arenas, mmapped blocks too).
std::size_t allocated_bytes() {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 info = ::mallinfo2();
  return info.uordblks + info.hblkhd;
#else
  return 0;
#endif
}

// What the allocator has handed out since `before` (0 if less is out now).
std::size_t allocated_since(std::size_t before) {
  const std::size_t now = allocated_bytes();
  return now > before ? now - before : 0;
}

std::size_t rss_bytes() {
  std::FILE* file = std::fopen("/proc/self/statm", "r");
  if (!file) return 0;
  unsigned long size = 0, resident = 0;
  const int read = std::fscanf(file, "%lu %lu", &size, &resident);
  std::fclose(file);
  return read == 2 ? resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE)) : 0;
}

double memory_budget_bytes() {
  double gib = 12;
  if (const char* text = std::getenv("LEXICO_BENCH_MEMORY_GIB")) {
    char* end = nullptr;
    const double value = std::strtod(text, &end);
    if (end != text && value > 0) gib = value;
  }
  return gib * 1024.0 * 1024.0 * 1024.0;
}

std::string gib(double bytes) {
  char text[32];
  if (bytes >= 1024.0 * 1024.0 * 1024.0)
    std::snprintf(text, sizeof text, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  else
    std::snprintf(text, sizeof text, "%.1f MiB", bytes / (1024.0 * 1024.0));
  return text;
}

// ---- random data ------------------------------------------------------------------

RowMatrix random_rows(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  RowMatrix m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// Random K and V rows of one shape (unit-scale normal: fp16-safe), appended in blocks.
struct RowPool {
  RowMatrix keys, values;
};

const RowPool& row_pool(const ModelShape& model) {
  static std::map<std::string, RowPool> pools;
  auto found = pools.find(model.name);
  if (found == pools.end())
    found = pools.emplace(model.name, RowPool{random_rows(row_pool_tokens, model.kv_width(), 11),
                                              random_rows(row_pool_tokens, model.kv_width(), 12)})
                .first;
  return found->second;
}

// `tokens` x kv_heads random codes of `sparsity` distinct atoms each, with coefficients
// of the size that makes a unit-scale normal vector (norm ~ sqrt(d)).
lexico::SparseCodes random_codes(Eigen::Index vectors, int sparsity, int atoms, int head_dim, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> atom(0, atoms - 1);
  std::normal_distribution<float> coefficient(0.0f, std::sqrt(static_cast<float>(head_dim) / sparsity));
  lexico::SparseCodes codes;
  codes.sparsity = sparsity;
  codes.indices.resize(sparsity, vectors);
  codes.coefficients.resize(sparsity, vectors);
  codes.counts.setConstant(vectors, static_cast<std::uint8_t>(sparsity));
  for (Eigen::Index v = 0; v < vectors; ++v)
    for (int i = 0; i < sparsity; ++i) {
      int index;
      do {
        index = atom(rng);
      } while ((codes.indices.col(v).head(i).array() == static_cast<std::uint16_t>(index)).any());
      codes.indices(i, v) = static_cast<std::uint16_t>(index);
      codes.coefficients(i, v) = coefficient(rng);
    }
  return codes;
}

// The first `vectors` codes of a pool.
lexico::SparseCodes first_codes(const lexico::SparseCodes& codes, Eigen::Index vectors) {
  lexico::SparseCodes part;
  part.sparsity = codes.sparsity;
  part.indices = codes.indices.leftCols(vectors);
  part.coefficients = codes.coefficients.leftCols(vectors);
  part.counts = codes.counts.head(vectors);
  return part;
}

// code_pools blocks of code_pool_tokens tokens of random key and value codes.
struct CodePool {
  std::vector<lexico::SparseCodes> keys, values;
};

const CodePool& code_pool(const ModelShape& model, int sparsity) {
  static std::map<std::pair<std::string, int>, CodePool> pools;
  const auto key = std::make_pair(std::string(model.name), sparsity);
  auto found = pools.find(key);
  if (found == pools.end()) {
    CodePool pool;
    for (Eigen::Index p = 0; p < code_pools; ++p) {
      const unsigned seed = static_cast<unsigned>(100 + 2 * p + 1000 * sparsity);
      pool.keys.push_back(random_codes(code_pool_tokens * model.kv_heads, sparsity, model.atoms, model.head_dim, seed));
      pool.values.push_back(
          random_codes(code_pool_tokens * model.kv_heads, sparsity, model.atoms, model.head_dim, seed + 1));
    }
    found = pools.emplace(key, std::move(pool)).first;
  }
  return found->second;
}

// ---- caches -----------------------------------------------------------------------

lexico::LexicoOptions lexico_options(Kind kind) {
  lexico::LexicoOptions options;
  options.buffer = lexico_buffer;
  options.flush = lexico_flush;
  if (kind == Kind::lexico_s8) {
    options.key_sparsity = options.value_sparsity = 8;
  } else {
    options.key_sparsity = options.value_sparsity = 4;
    options.tiers = {{tier_tokens, tier_sparsity, tier_sparsity}};
  }
  return options;
}

// Tokens a Lexico cache takes for real at the end of its fill: its buffer and its tier.
Eigen::Index lexico_tail(Kind kind) { return lexico_buffer + (kind == Kind::lexico_s8 ? 0 : tier_tokens); }

// Random unit-norm dictionaries of a shape, built once (and their allocator bytes).
struct Dictionaries {
  std::vector<lexico::LayerDictionaries> layers;
  std::size_t measured_bytes = 0;
};

const Dictionaries& dictionaries(const ModelShape& model) {
  static std::map<std::string, Dictionaries> made;
  auto found = made.find(model.name);
  if (found != made.end()) return found->second;
  const std::size_t before = allocated_bytes();
  Dictionaries set;
  for (int l = 0; l < model.layers; ++l) {
    lexico::LayerDictionaries layer;
    for (int kv = 0; kv < 2; ++kv) {
      std::mt19937 rng(static_cast<unsigned>(7919 * l + kv + 1));
      std::normal_distribution<float> normal;
      Eigen::MatrixXf atoms(model.head_dim, model.atoms);
      for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
      (kv == 0 ? layer.keys : layer.values) = std::make_shared<const lexico::Dictionary>(std::move(atoms));
    }
    set.layers.push_back(layer);
  }
  set.measured_bytes = allocated_since(before);
  return made.emplace(model.name, std::move(set)).first->second;
}

// Appends `coded` tokens of random codes to one layer of a Lexico cache, in blocks.
void append_random_codes(LexicoCache& cache, const ModelShape& model, int sparsity, int layer, Eigen::Index coded,
                         unsigned salt) {
  const CodePool& codes = code_pool(model, sparsity);
  Eigen::Index block = 0;
  for (Eigen::Index done = 0; done < coded; done += code_pool_tokens, ++block) {
    const std::size_t p = static_cast<std::size_t>((salt + static_cast<unsigned>(layer) + block) % code_pools);
    const Eigen::Index count = std::min(code_pool_tokens, coded - done);
    if (count == code_pool_tokens) {
      cache.append_codes(layer, codes.keys[p], codes.values[p]);
    } else {
      cache.append_codes(layer, first_codes(codes.keys[p], count * model.kv_heads),
                         first_codes(codes.values[p], count * model.kv_heads));
    }
  }
}

// Appends `tail` random tokens to one layer for real (through the buffer, the encoder and
// the tiers), keys given before RoPE where the space codes them so.
void append_tail(LexicoCache& cache, const ModelShape& model, int layer, Eigen::Index tail, unsigned salt) {
  const RowPool& rows = row_pool(model);
  const lexico::KeyForm form = cache.key_rope() ? lexico::KeyForm::unrotated : lexico::KeyForm::rotated;
  const Eigen::Index offset = (static_cast<Eigen::Index>(salt) * 131 + layer * 37) % (row_pool_tokens - tail);
  cache.append(layer, cache.next_position(layer), rows.keys.middleRows(offset, tail),
               rows.values.middleRows(offset, tail), form);
}

// Fills every layer of a dense or quantized cache with `tokens` random tokens in blocks.
void fill_rows(KVCache& cache, const ModelShape& model, Eigen::Index tokens, unsigned salt) {
  const RowPool& rows = row_pool(model);
  for (int l = 0; l < model.layers; ++l)
    for (Eigen::Index done = 0; done < tokens; done += row_chunk) {
      const Eigen::Index count = std::min(row_chunk, tokens - done);
      const Eigen::Index offset = (salt * 131 + static_cast<unsigned>(l) * 37 + done / row_chunk * 53) %
                                  (row_pool_tokens - row_chunk);
      cache.append(l, done, rows.keys.middleRows(offset, count), rows.values.middleRows(offset, count));
    }
}

// The CodeSpace of one (shape, key form, Gram policy); one at a time is kept.
struct SharedSpace {
  std::string key;
  std::shared_ptr<const lexico::CodeSpace> space;
  std::size_t measured_bytes = 0;  // dictionaries + space + warm-up, allocator delta
};

SharedSpace& space_slot() {
  static SharedSpace slot;
  return slot;
}

std::string space_key(const ModelShape& model, Kind kind, GramPolicy gram) {
  return std::string(model.name) + (kind == Kind::lexico_s8 ? "/after_rope/" : "/before_rope/") + to_string(gram);
}

const SharedSpace& code_space(const ModelShape& model, Kind kind, GramPolicy gram) {
  SharedSpace& slot = space_slot();
  const std::string key = space_key(model, kind, gram);
  if (slot.key == key) return slot;
  slot = SharedSpace{};
  const Dictionaries& dicts = dictionaries(model);
  const std::size_t before = allocated_bytes();
  lexico::CodeSpaceOptions options;
  options.gram = gram;
  if (kind != Kind::lexico_s8) options.key_rope = lexico::Rope(model.head_dim, 500000.0f, lexico::RopeStyle::rotate_half);
  slot.space = std::make_shared<const lexico::CodeSpace>(dicts.layers, options);
  {
    // One throw-away sequence takes a tail on layer 0: the OMP workspaces the pool
    // lends and the main thread's coding scratch are then in place, and not counted
    // against the first sequence measured.
    LexicoCache warm(model.cache_shape(), slot.space, lexico_options(kind));
    append_tail(warm, model, 0, lexico_tail(kind), 0);
  }
  slot.measured_bytes = allocated_since(before) + dicts.measured_bytes;
  slot.key = key;
  return slot;
}

// Estimated bytes of K and V of one sequence, and of the shared state.
double estimated_kv_bytes(const ModelShape& model, Kind kind, Eigen::Index tokens) {
  const double width = model.kv_width(), t = static_cast<double>(tokens), layers = model.layers;
  switch (kind) {
    case Kind::dense_fp16: return layers * t * width * 2 * 2;
    case Kind::kivi2:  // K per channel, V per token: bits/8 + (scale, minimum) fp16 per group, + fp16 residual
      return layers * (2 * t * width * (kivi_bits / 8.0 + 4.0 / kivi_group) + 2 * 2 * width * kivi_residual);
    case Kind::q4_0: return layers * t * width * 2 * (18.0 / 32.0);
    default: {
      const auto per_vector = [&](int s) {
        return std::ceil(s * lexico::CodeStore::bits_for(static_cast<std::size_t>(model.atoms)) / 8.0) + s + 1;
      };
      const lexico::LexicoOptions options = lexico_options(kind);
      const double tail = static_cast<double>(std::min(tokens, lexico_tail(kind)));
      const double tier = kind == Kind::lexico_s8 ? 0 : std::min<double>(tier_tokens, tail);
      const double buffer = tail - tier;
      return layers * 2 * model.kv_heads *
             ((t - tail) * per_vector(options.key_sparsity) + tier * per_vector(tier_sparsity) +
              buffer * model.head_dim * 2);
    }
  }
}

double estimated_shared_bytes(const ModelShape& model, Kind kind, GramPolicy gram) {
  if (kind != Kind::lexico_s8 && kind != Kind::lexico_rope_s4_tier) return 0;
  const double n = model.atoms, d = model.head_dim;
  const double book = 8 * d * n + (gram == GramPolicy::fp16 ? 2 * n * n : 2 * 3 * d * n);
  return 2 * model.layers * book;
}

std::unique_ptr<KVCache> make_cache(const ModelShape& model, Kind kind, const SharedSpace* space) {
  const CacheShape shape = model.cache_shape();
  switch (kind) {
    case Kind::dense_fp16: return std::make_unique<lexico::DenseCache<Eigen::half>>(shape);
    case Kind::kivi2:
      return std::make_unique<lexico::KiviCache>(shape, lexico::KiviOptions{kivi_bits, kivi_group, kivi_residual});
    case Kind::q4_0: return lexico::make_cache("q4_0", shape);
    default: return std::make_unique<LexicoCache>(shape, space->space, lexico_options(kind));
  }
}

// B filled caches, kept for the benchmarks that follow with the same (shape, cache, B, T).
struct Fixture {
  std::string key;
  std::vector<std::unique_ptr<KVCache>> caches;
  std::vector<RowMatrix> queries, outs;
  std::size_t kv_bytes = 0, overhead_bytes = 0, shared_bytes = 0;
  std::size_t measured_caches = 0, measured_shared = 0;
  double fill_seconds = 0;
  std::set<int> warmed;  // (threads, batched) modes that have had their untimed step
};

Fixture& fixture_slot() {
  static Fixture slot;
  return slot;
}

void release_fixture() {
  Fixture& slot = fixture_slot();
  slot = Fixture{};
}

// Builds (or finds) the fixture; on failure returns the reason.
std::string prepare(const ModelShape& model, const KindInfo& info, GramPolicy gram, int sequences,
                    Eigen::Index tokens) {
  const std::string key = std::string(model.name) + "/" + info.name + "/" + to_string(gram) + "/" +
                          std::to_string(sequences) + "/" + std::to_string(tokens);
  Fixture& slot = fixture_slot();
  if (slot.key == key) return {};

  const double kv = estimated_kv_bytes(model, info.kind, tokens) * sequences;
  const double shared = estimated_shared_bytes(model, info.kind, gram);
  const double budget = memory_budget_bytes();
  if (kv + shared > budget)
    return "does not fit: estimated KV " + gib(kv) + " (" + std::to_string(sequences) + " x " +
           gib(kv / sequences) + ")" + (shared > 0 ? " + shared " + gib(shared) : std::string()) +
           " exceeds the budget of " + gib(budget) + " (set LEXICO_BENCH_MEMORY_GIB to raise it)";

  release_fixture();
  if (!info.lexico) space_slot() = SharedSpace{};  // a code space is not needed now
  const SharedSpace* space = info.lexico ? &code_space(model, info.kind, gram) : nullptr;
  const int sparsity = lexico_options(info.kind).key_sparsity;
  const Eigen::Index tail = info.lexico ? std::min(tokens, lexico_tail(info.kind)) : 0;
  row_pool(model);
  if (info.lexico) code_pool(model, sparsity);

  Fixture made;
  made.measured_shared = space ? space->measured_bytes : 0;
  for (int b = 0; b < sequences; ++b) {
    made.queries.push_back(random_rows(model.q_heads, model.head_dim, static_cast<unsigned>(5000 + b)));
    made.outs.emplace_back(model.q_heads, model.head_dim);
  }
  const auto start = std::chrono::steady_clock::now();
  const std::size_t before = allocated_bytes();
  for (int b = 0; b < sequences; ++b) made.caches.push_back(make_cache(model, info.kind, space));
  // Random codes or rows into every sequence, sequences in parallel; the real tail of the
  // Lexico caches serially (their encoder runs in parallel within a flush).
  std::vector<std::string> errors(static_cast<std::size_t>(sequences));
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
  for (int b = 0; b < sequences; ++b) {
    try {
      if (info.lexico) {
        // Codes only: the tail is appended below.
        auto& cache = static_cast<LexicoCache&>(*made.caches[static_cast<std::size_t>(b)]);
        for (int l = 0; l < model.layers; ++l)
          append_random_codes(cache, model, sparsity, l, tokens - tail, static_cast<unsigned>(b));
      } else {
        fill_rows(*made.caches[static_cast<std::size_t>(b)], model, tokens, static_cast<unsigned>(b));
      }
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(b)] = e.what();
    }
  }
  for (const std::string& error : errors)
    if (!error.empty())
      return info.lexico ? "the fast fill (LexicoCache::append_codes) failed: " + error
                         : "fill failed: " + error;
  if (info.lexico) {
    for (int b = 0; b < sequences; ++b) {
      auto& cache = static_cast<LexicoCache&>(*made.caches[static_cast<std::size_t>(b)]);
      try {
        for (int l = 0; l < model.layers; ++l) append_tail(cache, model, l, tail, static_cast<unsigned>(b));
      } catch (const std::exception& e) {
        return std::string("tail append failed: ") + e.what();
      }
    }
  }
  made.measured_caches = allocated_since(before);
  made.fill_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::set<const void*> shared_states;
  for (const auto& cache : made.caches) {
    made.kv_bytes += cache->bytes().total();
    made.overhead_bytes += cache->overhead_bytes();
    if (const void* state = cache->shared_state(); state && shared_states.insert(state).second)
      made.shared_bytes += cache->shared_bytes();
  }
  made.key = key;
  slot = std::move(made);
  return {};
}

// ---- the benchmark ----------------------------------------------------------------

void BM_Serving(benchmark::State& state, const ModelShape* model, const KindInfo* info, GramPolicy gram,
                int sequences, Eigen::Index tokens, int threads, bool batched) {
  std::string reason;
  try {
    reason = prepare(*model, *info, gram, sequences, tokens);
  } catch (const std::exception& e) {
    reason = std::string("setup failed: ") + e.what();
    release_fixture();
  }
  if (!reason.empty()) {
    state.SkipWithError(reason.c_str());
    for (auto _ : state) {
    }
    return;
  }
  Fixture& fixture = fixture_slot();
  for (auto& cache : fixture.caches) cache->set_threads(threads);
  std::vector<lexico::AttendRequest> requests;
  for (std::size_t b = 0; b < fixture.caches.size(); ++b)
    requests.push_back({fixture.caches[b].get(), fixture.queries[b], fixture.outs[b]});

  const auto step = [&] {
    for (int l = 0; l < model->layers; ++l) {
      if (batched) {
        LexicoCache::attend_batch(l, requests, threads);
      } else {
        for (std::size_t b = 0; b < fixture.caches.size(); ++b)
          fixture.caches[b]->attend(l, fixture.queries[b], fixture.outs[b]);
      }
    }
    benchmark::ClobberMemory();
  };
  // One untimed step the first time these caches run this way (scratch, first touches).
  const int mode = threads * 2 + (batched ? 1 : 0);
  if (fixture.warmed.insert(mode).second) step();

  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    step();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  using benchmark::Counter;
  const double iterations = static_cast<double>(std::max<benchmark::IterationCount>(1, state.iterations()));
  const double step_ms = 1000.0 * seconds / iterations;
  const auto bytes = [](double value) { return Counter(value, Counter::kDefaults, Counter::kIs1024); };
  state.counters["decode_step_ms"] = step_ms;
  state.counters["per_sequence_ms"] = step_ms / sequences;
  state.counters["kv_bytes"] = bytes(static_cast<double>(fixture.kv_bytes));
  state.counters["overhead_bytes"] = bytes(static_cast<double>(fixture.overhead_bytes));
  state.counters["shared_bytes"] = bytes(static_cast<double>(fixture.shared_bytes));
  state.counters["measured_shared_bytes"] = bytes(static_cast<double>(fixture.measured_shared));
  state.counters["measured_total_bytes"] = bytes(static_cast<double>(fixture.measured_caches + fixture.measured_shared));
  state.counters["measured_per_sequence_bytes"] = bytes(static_cast<double>(fixture.measured_caches) / sequences);
  state.counters["rss_bytes"] = bytes(static_cast<double>(rss_bytes()));
  state.counters["fill_s"] = fixture.fill_seconds;
  const KVCache& first = *fixture.caches.front();
  state.SetLabel(first.name() + " " + first.parameters());
}

std::vector<GramPolicy> gram_policies() {
  const char* text = std::getenv("LEXICO_BENCH_GRAM");
  const std::string choice = text ? text : "fp16";
  if (choice == "both") return {GramPolicy::fp16, GramPolicy::on_demand};
  return {lexico::parse_gram_policy(choice)};
}

void register_benchmarks() {
  const int batch_sizes[] = {1, 8, 32};
  const Eigen::Index contexts[] = {4096, 32768};
  const int thread_counts[] = {1, 2};
  const std::vector<GramPolicy> grams = gram_policies();
  for (const ModelShape& model : models)
    for (const KindInfo& info : kinds)
      for (std::size_t g = 0; g < (info.lexico ? grams.size() : 1); ++g)
        for (const Eigen::Index tokens : contexts)
          for (const int sequences : batch_sizes)
            for (const bool batched : {false, true}) {
              if (batched && !info.lexico) continue;
              for (const int threads : thread_counts) {
                std::string name = std::string("serving/") + model.name + "/" + info.name + (batched ? "_batched" : "");
                if (info.lexico) name += "/gram:" + to_string(grams[g]);
                name += "/B:" + std::to_string(sequences) + "/T:" + std::to_string(tokens) +
                        "/threads:" + std::to_string(threads);
                benchmark::RegisterBenchmark(name.c_str(), BM_Serving, &model, &info, grams[g], sequences, tokens,
                                             threads, batched)
                    ->Unit(benchmark::kMillisecond)
                    ->UseRealTime();
              }
            }
}

}  // namespace

int main(int argc, char** argv) {
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
