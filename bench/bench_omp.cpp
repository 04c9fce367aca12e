// Throughput of the batched OMP encoder (vectors per second, 2 OpenMP threads), and
// of its two kernels alone.
//
// Data: a random dictionary (Gaussian columns, normalised) and vectors that are
// sparse combinations of s random atoms with N(0, 1) coefficients plus Gaussian
// noise of 10 % of the signal norm, 8192 vectors per encode() call. Setup (Gram
// matrices, packing) is outside the timed loop; every encode() call is timed whole.
//
// Comparison mode for bench/sklearn_omp.py: with LEXICO_OMP_DUMP=DIR set, the
// program skips Google Benchmark, codes one data set (LEXICO_OMP_SHAPE="d,N,s,B",
// default "128,4096,8,8192") and writes to DIR: dictionary.f32 (d x N, atoms
// contiguous), vectors.f32 (d x B, vectors contiguous), indices.u16 and
// coefficients.f32 (s x B), counts.u8 (B) and lexico.txt (key value lines: shape,
// best-of-5 throughput with 1 and 2 threads, mean relative error). With
// LEXICO_OMP_REAL=DIR (a dictionary set written by lexico-train, with the dev vectors it
// collected) and LEXICO_OMP_LAYER="L,k|v" (default "0,k") the data are real instead: that
// layer's dictionary rounded to fp16, as a CodeSpace codes with it, and its first B dev
// vectors; d and N come from the set, s and B from LEXICO_OMP_SHAPE.

#include <lexico/coding/dictionary_set.hpp>
#include <lexico/coding/omp.hpp>
#include <lexico/training/kv_collect.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Problem {
  lexico::Dictionary dictionary;
  Eigen::MatrixXf vectors;
};

Problem make_problem(int d, int n, int s, int count, std::uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Eigen::MatrixXf atoms(d, n);
  for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
  Problem problem{lexico::Dictionary(atoms), Eigen::MatrixXf(d, count)};
  std::uniform_int_distribution<int> pick(0, n - 1);
  for (int b = 0; b < count; ++b) {
    Eigen::VectorXf signal = Eigen::VectorXf::Zero(d), noise(d);
    for (int i = 0; i < s; ++i) signal += normal(rng) * problem.dictionary.atoms().col(pick(rng));
    for (int i = 0; i < d; ++i) noise(i) = normal(rng);
    problem.vectors.col(b) = signal + 0.1f * signal.norm() / noise.norm() * noise;
  }
  return problem;
}

// One layer's dictionary (rounded to fp16, as a CodeSpace's) and its first `count` dev
// vectors from a dictionary set (see the comparison mode above).
Problem real_problem(const std::string& dir, int count) {
  int layer = 0;
  char part = 'k', comma = ',';
  if (const char* which = std::getenv("LEXICO_OMP_LAYER")) {
    std::istringstream in(which);
    if (!(in >> layer >> comma >> part) || comma != ',' || (part != 'k' && part != 'v'))
      throw lexico::error(std::string("bench_omp: LEXICO_OMP_LAYER must be L,k or L,v, got '") + which + "'");
  }
  const lexico::DictionarySet set = lexico::load_dictionaries(dir);
  lexico::require(layer >= 0 && layer < static_cast<int>(set.layers.size()), "bench_omp: layer ", layer, " of a set of ",
                  set.layers.size());
  const lexico::LayerDictionaries& pair = set.layers[static_cast<std::size_t>(layer)];
  const lexico::Dictionary& dictionary = part == 'k' ? *pair.keys : *pair.values;
  return {dictionary.rounded_to_fp16(),
          lexico::VectorFile(lexico::kv_vector_path(dir + "/vectors/dev", layer, part == 'k')).read_head(count)};
}

double mean_relative_error(const Problem& problem, const lexico::SparseCodes& codes) {
  const Eigen::MatrixXf rebuilt = lexico::reconstruct(problem.dictionary, codes);
  double sum = 0;
  for (Eigen::Index b = 0; b < problem.vectors.cols(); ++b)
    sum += (problem.vectors.col(b) - rebuilt.col(b)).norm() / problem.vectors.col(b).norm();
  return sum / static_cast<double>(problem.vectors.cols());
}

constexpr int block_vectors = 8192;

// One problem and encoder per shape, built on first use outside the timed loop.
struct Setup {
  Problem problem;
  lexico::OmpEncoder encoder;
  lexico::SparseCodes codes;
};

Setup& setup_for(int d, int n, int s) {
  static std::map<std::tuple<int, int, int>, std::unique_ptr<Setup>> setups;
  auto& slot = setups[{d, n, s}];
  if (!slot) {
    Problem problem = make_problem(d, n, s, block_vectors);
    lexico::OmpEncoder encoder(problem.dictionary, lexico::OmpOptions{s, 0.0f, 1e-4f, 2});
    slot = std::make_unique<Setup>(Setup{std::move(problem), std::move(encoder), {}});
  }
  return *slot;
}

void BM_OmpEncode(benchmark::State& state) {
  const int d = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1)),
            s = static_cast<int>(state.range(2));
  Setup& setup = setup_for(d, n, s);
  setup.encoder.encode(setup.problem.vectors, setup.codes);  // warm workspaces and caches
  for (auto _ : state) {
    setup.encoder.encode(setup.problem.vectors, setup.codes);
    benchmark::DoNotOptimize(setup.codes.coefficients.data());
  }
  state.SetItemsProcessed(state.iterations() * block_vectors);
  state.counters["rel_err"] = mean_relative_error(setup.problem, setup.codes);
}

BENCHMARK(BM_OmpEncode)
    ->ArgNames({"d", "N", "s"})
    ->ArgsProduct({{64, 128}, {1024, 4096}, {4, 8, 16}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// The α⁰ = Dᵀx product alone (what encode() spends on it), one thread: the part of
// the encoder that runs at the FMA peak. items/s = vectors/s; GMAC/s as a counter.
void BM_OmpProjectionOnly(benchmark::State& state) {
  const int d = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1));
  const Problem problem = make_problem(d, n, 8, block_vectors);
  const lexico::detail::PackedAtoms packed(problem.dictionary.atoms());
  constexpr int chunk = 2 * lexico::detail::tile_vectors;
  Eigen::MatrixXf alpha0(lexico::detail::padded_atoms(n), chunk);
  for (auto _ : state) {
    for (int first = 0; first + chunk <= block_vectors; first += chunk)
      packed.project(problem.vectors.col(first).data(), d, chunk, alpha0.data(), alpha0.outerStride());
    benchmark::DoNotOptimize(alpha0.data());
  }
  state.SetItemsProcessed(state.iterations() * block_vectors);
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * block_vectors * d * n / 1e9,
                                                benchmark::Counter::kIsRate);
}

BENCHMARK(BM_OmpProjectionOnly)
    ->ArgNames({"d", "N"})
    ->Args({128, 4096})
    ->Args({64, 4096})
    ->Unit(benchmark::kMillisecond);

// One correlation pass over N = 4096 atoms with k fp16 Gram columns, caches hot,
// one thread: the kernel each encoder step runs. "s/16 atoms" is its time per block
// of 16 atoms (e.g. 2.5n = 2.5 ns).
void BM_OmpPassOnly(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), n = 4096;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  Eigen::VectorXf alpha0(n), scratch(lexico::detail::padded_atoms(n));
  for (Eigen::Index i = 0; i < n; ++i) alpha0(i) = normal(rng);
  std::vector<Eigen::half> gram(static_cast<std::size_t>(n) * std::max(k, 1));
  for (Eigen::half& g : gram) g = Eigen::half(0.1f * normal(rng));
  std::vector<const Eigen::half*> columns;
  std::vector<float> coefs;
  for (int i = 0; i < k; ++i) {
    columns.push_back(gram.data() + static_cast<std::size_t>(i) * n);
    coefs.push_back(normal(rng));
  }
  std::vector<std::uint16_t> excluded(static_cast<std::size_t>(n / 16), 0);
  int candidates[64];
  const lexico::detail::PassInputs in{alpha0.data(), columns.data(), coefs.data(), k, excluded.data(), true, n};
  for (auto _ : state)
    benchmark::DoNotOptimize(lexico::detail::correlation_band(in, 0.01f, nullptr, scratch.data(), candidates, 64));
  state.counters["s/16 atoms"] = benchmark::Counter(static_cast<double>(state.iterations()) * (n / 16),
                                                    benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

BENCHMARK(BM_OmpPassOnly)->ArgName("k")->Arg(0)->Arg(1)->Arg(4)->Arg(7)->Arg(15);

// ---- comparison mode ----

template <typename T>
void write_raw(const std::string& path, const T* data, std::size_t count) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(sizeof(T) * count));
  if (!out) throw lexico::error("bench_omp: cannot write " + path);
}

double best_throughput(lexico::OmpEncoder& encoder, const Eigen::MatrixXf& vectors, lexico::SparseCodes& codes) {
  encoder.encode(vectors, codes);
  double best = 0;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    encoder.encode(vectors, codes);
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    best = std::max(best, static_cast<double>(vectors.cols()) / seconds.count());
  }
  return best;
}

int dump(const std::string& dir) {
  int d = 128, n = 4096, s = 8, count = block_vectors;
  if (const char* shape = std::getenv("LEXICO_OMP_SHAPE")) {
    char comma;
    std::istringstream in(shape);
    if (!(in >> d >> comma >> n >> comma >> s >> comma >> count))
      throw lexico::error(std::string("bench_omp: LEXICO_OMP_SHAPE must be d,N,s,B, got '") + shape + "'");
  }
  const char* real = std::getenv("LEXICO_OMP_REAL");
  const Problem problem = real ? real_problem(real, count) : make_problem(d, n, s, count);
  d = problem.dictionary.dim(), n = problem.dictionary.size(), count = static_cast<int>(problem.vectors.cols());
  lexico::SparseCodes codes;
  lexico::OmpEncoder one(problem.dictionary, lexico::OmpOptions{s, 0.0f, 1e-4f, 1});
  lexico::OmpEncoder two(problem.dictionary, lexico::OmpOptions{s, 0.0f, 1e-4f, 2});
  const double rate_one = best_throughput(one, problem.vectors, codes);
  const double rate_two = best_throughput(two, problem.vectors, codes);

  write_raw(dir + "/dictionary.f32", problem.dictionary.atoms().data(), static_cast<std::size_t>(d) * n);
  write_raw(dir + "/vectors.f32", problem.vectors.data(), static_cast<std::size_t>(problem.vectors.size()));
  write_raw(dir + "/indices.u16", codes.indices.data(), static_cast<std::size_t>(codes.indices.size()));
  write_raw(dir + "/coefficients.f32", codes.coefficients.data(), static_cast<std::size_t>(codes.coefficients.size()));
  write_raw(dir + "/counts.u8", codes.counts.data(), static_cast<std::size_t>(codes.counts.size()));
  std::ofstream info(dir + "/lexico.txt");
  info << "d " << d << "\nN " << n << "\ns " << s << "\nB " << count << "\nvectors_per_s_1_thread " << rate_one
       << "\nvectors_per_s_2_threads " << rate_two << "\nmean_relative_error " << mean_relative_error(problem, codes)
       << "\n";
  std::printf("lexico OMP d=%d N=%d s=%d B=%d: %.0f vectors/s (1 thread), %.0f vectors/s (2 threads)\n", d, n, s,
              count, rate_one, rate_two);
  return info ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (const char* dir = std::getenv("LEXICO_OMP_DUMP")) return dump(dir);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
