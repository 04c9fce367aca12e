// Dictionary learning (lexico/Adam, MOD, K-SVD), KV collection through the Llama
// runner, vector files and dictionary-set manifests.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include <lexico/cache/lexico_cache.hpp>
#include <lexico/coding/dictionary_set.hpp>
#include <lexico/training/kv_collect.hpp>
#include <lexico/training/train.hpp>

namespace {

namespace fs = std::filesystem;
using lexico::TrainMethod;
using lexico::TrainOptions;

// A planted problem: a random unit-norm dictionary, s-sparse Gaussian codes, noise.
struct Planted {
  Eigen::MatrixXf atoms, vectors;
};

Planted planted(int d, int n, int s, Eigen::Index count, float noise, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  Planted p;
  p.atoms = Eigen::MatrixXf::NullaryExpr(d, n, [&] { return normal(rng); });
  p.atoms.colwise().normalize();
  p.vectors = Eigen::MatrixXf::Zero(d, count);
  std::vector<int> pool(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) pool[static_cast<std::size_t>(i)] = i;
  for (Eigen::Index m = 0; m < count; ++m) {
    for (int i = 0; i < s; ++i) {
      std::swap(pool[static_cast<std::size_t>(i)], pool[static_cast<std::size_t>(i + rng() % (n - i))]);
      p.vectors.col(m) += normal(rng) * p.atoms.col(pool[static_cast<std::size_t>(i)]);
    }
    for (int i = 0; i < d; ++i) p.vectors(i, m) += noise * normal(rng);
  }
  return p;
}

Eigen::VectorXf vec(std::initializer_list<float> values) {
  Eigen::VectorXf v(static_cast<Eigen::Index>(values.size()));
  std::copy(values.begin(), values.end(), v.data());
  return v;
}

// Planted atoms matched by a learned one with |cos| > 0.95.
int recovered(const Eigen::MatrixXf& truth, const Eigen::MatrixXf& learned) {
  const Eigen::MatrixXf cosines = (learned.transpose() * truth).cwiseAbs();
  int count = 0;
  for (Eigen::Index j = 0; j < truth.cols(); ++j) count += cosines.col(j).maxCoeff() > 0.95f;
  return count;
}

TrainOptions small_options(TrainMethod method) {
  TrainOptions o;
  o.atoms = 50;
  o.sparsity = 3;
  o.method = method;
  o.vectors = 200000;
  o.batch = method == TrainMethod::lexico ? 1024 : 4096;
  o.learning_rate = 0.03f;
  o.mod_memory = 8192;
  o.dead_window = 4096;
  o.threads = 1;
  return o;
}

class Recovery : public ::testing::TestWithParam<TrainMethod> {};

TEST_P(Recovery, FindsPlantedAtomsAndLowersTheError) {
  const Planted p = planted(20, 50, 3, 20000, 0.01f, 1);
  TrainOptions options = small_options(GetParam());
  lexico::MatrixSource source(p.vectors, 7);
  std::vector<double> errors;
  const lexico::TrainResult result =
      lexico::train_dictionary(source, options, [&](const lexico::TrainProgress& progress) {
        errors.push_back(progress.batch_error);
        EXPECT_LE(progress.vectors, progress.total);
      });
  const int found = recovered(p.atoms, result.dictionary.atoms());
  std::printf("  %s: %d/50 planted atoms recovered, final batch error %.4f, %ld replaced\n",
              lexico::to_string(GetParam()), found, result.last_error, static_cast<long>(result.replaced));
  EXPECT_GE(found, 40);  // 80 %
  // Noise 0.01 per entry against ||x|| ≈ 1.7: a perfect dictionary leaves ~0.03.
  EXPECT_LT(result.last_error, 0.06);
  // Monotone-ish: the mean error of each fifth of the run is no worse than the
  // previous fifth's (plus a little batch noise).
  const std::size_t fifth = errors.size() / 5;
  ASSERT_GT(fifth, 0u);
  double previous = 1e30;
  for (std::size_t f = 0; f < 5; ++f) {
    double mean = 0;
    for (std::size_t i = f * fifth; i < (f + 1) * fifth; ++i) mean += errors[i];
    mean /= static_cast<double>(fifth);
    EXPECT_LE(mean, previous * 1.05 + 1e-3) << "fifth " << f;
    previous = mean;
  }
  EXPECT_LT(previous, 0.5 * errors.front());
  for (Eigen::Index j = 0; j < result.dictionary.size(); ++j)
    EXPECT_NEAR(result.dictionary.atoms().col(j).norm(), 1.0f, 1e-5f);
}

INSTANTIATE_TEST_SUITE_P(Methods, Recovery, ::testing::Values(TrainMethod::lexico, TrainMethod::mod, TrainMethod::ksvd),
                         [](const auto& info) { return std::string(lexico::to_string(info.param)); });

// A hand-worked Adam step: atoms renormalised, radial gradient removed, one step of
// size ≈ lr along -sign(g) (first step: m̂ = g, v̂ = g²), atoms renormalised.
TEST(SphereAdam, ProjectsTheGradientAndKeepsUnitNorm) {
  Eigen::MatrixXf atoms(2, 2);
  atoms << 1, 0,
           0, 2;  // the second atom has norm 2: renormalised to (0, 1) first
  Eigen::MatrixXf gradient(2, 2);
  gradient << 0.5f, 1.0f,
              -2.0f, 3.0f;
  lexico::SphereAdam adam(2, 2);
  const float lr = 0.1f;
  adam.step(atoms, gradient, lr);
  // Radial parts removed: atom 0 = e1 keeps (0, -2), atom 1 = e2 keeps (1, 0).
  EXPECT_FLOAT_EQ(gradient(0, 0), 0.0f);
  EXPECT_FLOAT_EQ(gradient(1, 0), -2.0f);
  EXPECT_FLOAT_EQ(gradient(0, 1), 1.0f);
  EXPECT_FLOAT_EQ(gradient(1, 1), 0.0f);
  // Step: a0 = (1, 0) - lr·(0, -1) = (1, lr); a1 = (0, 1) - lr·(1, 0) = (-lr, 1); renormalised.
  const float n = std::sqrt(1 + lr * lr);
  EXPECT_NEAR(atoms(0, 0), 1 / n, 1e-6f);
  EXPECT_NEAR(atoms(1, 0), lr / n, 1e-6f);
  EXPECT_NEAR(atoms(0, 1), -lr / n, 1e-6f);
  EXPECT_NEAR(atoms(1, 1), 1 / n, 1e-6f);
  for (int j = 0; j < 2; ++j) EXPECT_NEAR(atoms.col(j).norm(), 1.0f, 1e-6f);

  // A purely radial gradient does not move an atom.
  Eigen::MatrixXf unit = Eigen::MatrixXf::Identity(2, 2);
  Eigen::MatrixXf radial(2, 2);
  radial << 5, 0,
            0, -3;
  lexico::SphereAdam fresh(2, 2);
  fresh.step(unit, radial, lr);
  EXPECT_EQ(radial, Eigen::MatrixXf::Zero(2, 2));
  EXPECT_EQ(unit, Eigen::MatrixXf::Identity(2, 2));
}

TEST(ReplaceAtoms, NeverPlacesANearDuplicate) {
  // Atoms e1, e2, e3 and a dead atom 3; the worst-coded candidates are copies of
  // e1 and e2 (and of each other) and must be skipped.
  Eigen::MatrixXf atoms = Eigen::MatrixXf::Identity(4, 5);
  atoms.col(4) = vec({0, 0, 0.6f, 0.8f});
  Eigen::MatrixXf candidates(4, 5);
  candidates.col(0) = vec({10, 0.1f, 0, 0});   // e1 again, worst error
  candidates.col(1) = vec({0, -8, 0, 0.2f});   // -e2 again
  candidates.col(2) = vec({1, 1, 0, 1});       // new direction
  candidates.col(3) = vec({2, 2, 0, 2.05f});   // nearly the one above
  candidates.col(4) = vec({0, 1, -1, 0});      // new direction
  const Eigen::VectorXf badness = vec({100, 90, 50, 60, 10});
  const std::vector<Eigen::Index> dead = {3, 2};  // atom 2 (e3) is dead too
  const auto replaced = lexico::replace_atoms(atoms, dead, candidates, badness, 0.95f);
  ASSERT_EQ(replaced.size(), 2u);
  EXPECT_EQ(replaced[0], 3);
  EXPECT_EQ(replaced[1], 2);
  // Candidate 3 (badness 60) comes before 2 (50); 2 nearly duplicates it; then 4.
  EXPECT_LT((atoms.col(3) - candidates.col(3).normalized()).norm(), 1e-6f);
  EXPECT_LT((atoms.col(2) - candidates.col(4).normalized()).norm(), 1e-6f);
  const Eigen::MatrixXf gram = atoms.transpose() * atoms;
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < i; ++j) EXPECT_LT(std::fabs(gram(i, j)), 0.95f) << i << ", " << j;

  // No acceptable candidate: the dead atom keeps its value.
  Eigen::MatrixXf copy = atoms;
  const Eigen::MatrixXf only_duplicates = atoms.leftCols(2) * 3.0f;
  EXPECT_TRUE(lexico::replace_atoms(copy, {4}, only_duplicates, vec({1, 2}), 0.95f).empty());
  EXPECT_EQ(copy, atoms);
}

TEST(DictionaryTrainer, ReplacesDuplicatedAndUnusedAtomsWithoutDuplicating) {
  // Initial atoms with an exact duplicate pair and an atom orthogonal to all the data;
  // the worst-coded vectors all lie near one of a few directions.
  const Planted p = planted(8, 12, 2, 6000, 0.02f, 3);
  Eigen::MatrixXf initial = p.atoms.leftCols(12);
  initial.col(1) = initial.col(0);
  TrainOptions options = small_options(TrainMethod::ksvd);
  options.atoms = 12;
  options.sparsity = 2;
  options.dead_window = 2048;
  options.batch = 2048;
  lexico::DictionaryTrainer trainer(initial, options);
  Eigen::MatrixXf data = p.vectors;
  data.rightCols(3000).colwise() = p.atoms.col(5) * 4.0f;  // many identical bad vectors
  for (int step = 0; step < 6; ++step) trainer.step(data.middleCols((step % 2) * 2048, 2048), step / 6.0);
  EXPECT_GE(trainer.replaced(), 1);
  const Eigen::MatrixXf gram = trainer.atoms().transpose() * trainer.atoms();
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < i; ++j) EXPECT_LT(std::fabs(gram(i, j)), options.duplicate_coherence) << i << ", " << j;
}

TEST(Training, IsDeterministicForASeed) {
  const Planted p = planted(16, 40, 3, 8000, 0.05f, 5);
  for (const TrainMethod method : {TrainMethod::lexico, TrainMethod::mod, TrainMethod::ksvd}) {
    TrainOptions options = small_options(method);
    options.atoms = 40;
    options.vectors = 30000;
    options.threads = 2;
    auto train = [&](std::uint64_t seed) {
      options.seed = seed;
      lexico::MatrixSource source(p.vectors, seed);
      return lexico::train_dictionary(source, options).dictionary.atoms();
    };
    const Eigen::MatrixXf a = train(11), b = train(11), c = train(12);
    EXPECT_EQ(a, b) << lexico::to_string(method);
    EXPECT_NE(a, c) << lexico::to_string(method);
  }
}

TEST(Initialisation, GivesDistinctUnitAtoms) {
  const Planted p = planted(16, 40, 3, 4000, 0.05f, 9);
  for (const lexico::TrainInit init : {lexico::TrainInit::samples, lexico::TrainInit::kmeans_pp}) {
    const Eigen::MatrixXf atoms = lexico::initial_atoms(p.vectors, 64, init, 1, 0.95f);
    const Eigen::MatrixXf gram = atoms.transpose() * atoms;
    EXPECT_LT((gram.diagonal().array() - 1).abs().maxCoeff(), 1e-5f);
    EXPECT_LT((gram - Eigen::MatrixXf::Identity(64, 64)).cwiseAbs().maxCoeff(), 0.95f);
  }
  // One distinct direction: it comes first, random distinct unit atoms fill the rest.
  const Eigen::MatrixXf same = Eigen::MatrixXf::Ones(8, 10);
  for (const lexico::TrainInit init : {lexico::TrainInit::samples, lexico::TrainInit::kmeans_pp}) {
    Eigen::Index random = -1;
    const Eigen::MatrixXf atoms = lexico::initial_atoms(same, 5, init, 1, 0.95f, &random);
    EXPECT_EQ(random, 4);
    EXPECT_LT((atoms.col(0) - same.col(0).normalized()).norm(), 1e-6f);
    const Eigen::MatrixXf gram = atoms.transpose() * atoms;
    EXPECT_LT((gram.diagonal().array() - 1).abs().maxCoeff(), 1e-5f);
    EXPECT_LT((gram - Eigen::MatrixXf::Identity(5, 5)).cwiseAbs().maxCoeff(), 0.95f);
  }
  // Nothing to start from, or fewer samples than atoms: a clear error.
  EXPECT_THROW(lexico::initial_atoms(Eigen::MatrixXf::Zero(4, 10), 3, lexico::TrainInit::kmeans_pp, 1), lexico::error);
  EXPECT_THROW(lexico::initial_atoms(same, 20, lexico::TrainInit::samples, 1), lexico::error);
}

TEST(CodingError, IsSmallOnPlantedDataAndCountsFp8) {
  const Planted p = planted(20, 50, 3, 2000, 0.0f, 4);
  const lexico::Dictionary truth(p.atoms);
  const double exact = lexico::relative_coding_error(truth, p.vectors, 3, false, 1);
  const double fp8 = lexico::relative_coding_error(truth, p.vectors, 3, true, 1);
  EXPECT_LT(exact, 0.02);    // OMP finds (almost) every planted support
  EXPECT_GT(fp8, exact);     // E4M3 keeps 3 mantissa bits
  EXPECT_LT(fp8, exact + 0.05);
}

TEST(Options, NamesRoundTripAndBadNamesThrow) {
  for (const TrainMethod m : {TrainMethod::lexico, TrainMethod::mod, TrainMethod::ksvd})
    EXPECT_EQ(lexico::parse_train_method(lexico::to_string(m)), m);
  EXPECT_THROW(lexico::parse_train_method("sgd"), lexico::error);
  EXPECT_EQ(lexico::parse_train_init("kmeans++"), lexico::TrainInit::kmeans_pp);
  EXPECT_THROW(lexico::parse_train_init("random"), lexico::error);
}

// ---- KV collection --------------------------------------------------------------

// A raw little-endian golden file as values of T.
template <typename T>
std::vector<T> golden_file(const std::string& path) {
  std::vector<T> out(fs::file_size(path) / sizeof(T));
  std::ifstream(path, std::ios::binary).read(reinterpret_cast<char*>(out.data()), out.size() * sizeof(T));
  return out;
}

void check_golden_collection(const std::string& model_path, const std::string& golden) {
  const lexico::LlamaModel model = lexico::LlamaModel::load(model_path);
  const lexico::LlamaConfig& c = model.config();
  const std::vector<int> tokens = golden_file<std::int32_t>(golden + "/tokens.i32");
  const std::vector<float> k = golden_file<float>(golden + "/k_cache.f32");
  const std::vector<float> v = golden_file<float>(golden + "/v_cache.f32");
  const std::vector<lexico::LayerVectors> layers = lexico::collect_kv_vectors(model, {tokens});
  ASSERT_EQ(layers.size(), static_cast<std::size_t>(c.layers));
  // Golden layout [layer][position][kv_head][head_dim] is, per layer, exactly the
  // d x (T·kv_heads) token-major matrix of the collection.
  const Eigen::Index per_layer = static_cast<Eigen::Index>(tokens.size()) * c.kv_heads * c.head_dim;
  ASSERT_EQ(static_cast<Eigen::Index>(k.size()), c.layers * per_layer);
  for (int l = 0; l < c.layers; ++l) {
    const auto& layer = layers[static_cast<std::size_t>(l)];
    ASSERT_EQ(layer.keys.rows(), c.head_dim);
    ASSERT_EQ(layer.keys.cols(), static_cast<Eigen::Index>(tokens.size()) * c.kv_heads);
    const Eigen::Map<const Eigen::MatrixXf> gk(k.data() + l * per_layer, c.head_dim, layer.keys.cols());
    const Eigen::Map<const Eigen::MatrixXf> gv(v.data() + l * per_layer, c.head_dim, layer.values.cols());
    EXPECT_LE((layer.keys - gk).cwiseAbs().maxCoeff(), 1e-4f) << "layer " << l;
    EXPECT_LE((layer.values - gv).cwiseAbs().maxCoeff(), 1e-4f) << "layer " << l;
  }
}

TEST(KVCollection, MatchesGoldenCachesOfTheTinyModels) {
  check_golden_collection(LEXICO_REPO_DATA "/stories260k/stories260K.bin", LEXICO_REPO_DATA "/stories260k/golden");
  check_golden_collection(LEXICO_REPO_DATA "/tinystories-656k", LEXICO_REPO_DATA "/tinystories-656k/golden");
}

TEST(KVCollection, WindowsStartWithBosAndSplitTheCorpus) {
  std::vector<int> corpus;
  for (int doc = 0; doc < 40; ++doc) {
    corpus.push_back(0);  // BOS opens every document
    for (int t = 0; t < 7 + doc % 5; ++t) corpus.push_back(10 + doc);
  }
  const auto windows = lexico::sample_windows(corpus, 16, 0, 1000, 3);
  std::size_t body = 0;
  for (const auto& w : windows) {
    ASSERT_FALSE(w.empty());
    EXPECT_EQ(w.front(), 0);
    EXPECT_LE(w.size(), 16u);
    body += w.size() - (w[1] == 0 ? 1 : 0);  // a slice opening on BOS gets no extra one
  }
  EXPECT_GE(body, corpus.size());
  EXPECT_EQ(windows.size(), (corpus.size() + 14) / 15);
  // Fewer windows are a prefix of more (what lets collections be reused).
  const auto few = lexico::sample_windows(corpus, 16, 0, 5, 3);
  ASSERT_EQ(few.size(), 5u);
  for (std::size_t i = 0; i < few.size(); ++i) EXPECT_EQ(few[i], windows[i]);
  EXPECT_NE(lexico::sample_windows(corpus, 16, 0, 5, 4), few);
  EXPECT_THROW(lexico::sample_windows(corpus, 1, 0, 5, 3), lexico::error);
}

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("lexico_test_train_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

TEST(KVCollection, ReadsU16TokensAndRejectsOddFiles) {
  const fs::path dir = temp_dir("u16");
  {
    std::ofstream out(dir / "t.u16", std::ios::binary);
    const unsigned char bytes[] = {0, 0, 0x34, 0x12, 0xff, 0xff};
    out.write(reinterpret_cast<const char*>(bytes), sizeof bytes);
    std::ofstream odd(dir / "odd.u16", std::ios::binary);
    odd.write(reinterpret_cast<const char*>(bytes), 3);
  }
  EXPECT_EQ(lexico::read_u16_tokens((dir / "t.u16").string()), (std::vector<int>{0, 0x1234, 0xffff}));
  EXPECT_THROW(lexico::read_u16_tokens((dir / "odd.u16").string()), lexico::error);
  EXPECT_THROW(lexico::read_u16_tokens((dir / "missing.u16").string()), lexico::error);
  fs::remove_all(dir);
}

TEST(VectorFiles, RoundTripAndStreamEveryVectorOncePerPass) {
  const fs::path dir = temp_dir("vectors");
  const std::string path = (dir / "v.vec").string();
  const Eigen::MatrixXf vectors =
      Eigen::MatrixXf::NullaryExpr(3, 100, [](Eigen::Index i, Eigen::Index j) { return float(3 * j + i); });
  {
    lexico::VectorFileWriter writer(path, 3);
    writer.append(vectors.leftCols(40));
    writer.append(vectors.rightCols(60));
    writer.close();
  }
  lexico::VectorFile file(path);
  EXPECT_EQ(file.dim(), 3);
  EXPECT_EQ(file.count(), 100);
  EXPECT_EQ(file.read_head(1000), vectors);

  // Blocks of 16, limit 90: each pass yields vectors 0..89 once each.
  lexico::FileVectorSource source(path, 16, 5, 90);
  for (int pass = 0; pass < 2; ++pass) {
    Eigen::MatrixXf batch(3, 90);
    source.next(batch);
    std::vector<int> seen;
    for (Eigen::Index b = 0; b < 90; ++b) {
      seen.push_back(static_cast<int>(batch(0, b)) / 3);
      EXPECT_EQ(batch.col(b), vectors.col(seen.back()));
    }
    std::sort(seen.begin(), seen.end());
    for (int i = 0; i < 90; ++i) EXPECT_EQ(seen[static_cast<std::size_t>(i)], i);
  }

  // Truncated and foreign files are refused with the path in the message.
  fs::resize_file(path, fs::file_size(path) - 4);
  try {
    lexico::VectorFile broken(path);
    ADD_FAILURE() << "a truncated vector file was accepted";
  } catch (const lexico::error& e) {
    EXPECT_NE(std::string(e.what()).find("v.vec"), std::string::npos);
  }
  std::ofstream(dir / "junk.vec") << "not a vector file at all, really";
  EXPECT_THROW(lexico::VectorFile((dir / "junk.vec").string()), lexico::error);
  fs::remove_all(dir);
}

// ---- Dictionary sets --------------------------------------------------------------

lexico::DictionarySetManifest example_manifest() {
  lexico::DictionarySetManifest m;
  m.model = "models/tiny";
  m.method = "mod";
  m.layers = 2;
  m.head_dim = 6;
  m.atoms = 10;
  m.sparsity = 3;
  m.settings = {{"corpus", "a \"quoted\" path\\x"}, {"vectors", "1048576"}};
  m.errors = {{0, 'K', 4, 0.25, 0.3125}, {1, 'V', 8, 0.1 + 0.2, 1.0 / 3}};
  return m;
}

std::vector<lexico::LayerDictionaries> example_layers(int layers, int d, int n) {
  std::vector<lexico::LayerDictionaries> out;
  for (int l = 0; l < layers; ++l)
    out.push_back({std::make_shared<const lexico::Dictionary>(Eigen::MatrixXf::Random(d, n)),
                   std::make_shared<const lexico::Dictionary>(Eigen::MatrixXf::Random(d, n))});
  return out;
}

TEST(DictionarySet, RoundTripsDictionariesAndManifest) {
  const fs::path dir = temp_dir("set") / "dicts";
  const auto layers = example_layers(2, 6, 10);
  const lexico::DictionarySetManifest m = example_manifest();
  lexico::save_dictionaries(dir.string(), layers, m);
  const lexico::DictionarySet set = lexico::load_dictionaries(dir.string());
  ASSERT_EQ(set.layers.size(), 2u);
  for (std::size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(set.layers[l].keys->atoms(), layers[l].keys->atoms());
    EXPECT_EQ(set.layers[l].values->atoms(), layers[l].values->atoms());
  }
  EXPECT_EQ(set.manifest.model, m.model);
  EXPECT_EQ(set.manifest.method, m.method);
  EXPECT_EQ(set.manifest.layers, 2);
  EXPECT_EQ(set.manifest.head_dim, 6);
  EXPECT_EQ(set.manifest.atoms, 10);
  EXPECT_EQ(set.manifest.sparsity, 3);
  EXPECT_EQ(set.manifest.settings, m.settings);
  ASSERT_EQ(set.manifest.errors.size(), 2u);
  EXPECT_EQ(set.manifest.errors[1].kind, 'V');
  EXPECT_EQ(set.manifest.errors[1].sparsity, 8);
  EXPECT_EQ(set.manifest.errors[1].train, 0.1 + 0.2);  // exact through %.17g
  EXPECT_EQ(set.manifest.errors[1].dev, 1.0 / 3);
  EXPECT_EQ(lexico::load_manifest(dir.string()).errors[0].dev, 0.3125);
  // What LexicoCache takes.
  lexico::LexicoOptions options;
  options.key_sparsity = options.value_sparsity = 3;
  lexico::LexicoCache cache(lexico::CacheShape{2, 1, 6}, set.layers, options);
  EXPECT_EQ(cache.key_dictionary(1).size(), 10);
  fs::remove_all(dir.parent_path());
}

// Expects load_dictionaries(dir) to throw a message containing `needle`.
void expect_load_error(const fs::path& dir, const std::string& needle) {
  try {
    lexico::load_dictionaries(dir.string());
    ADD_FAILURE() << "loaded a broken dictionary set; expected an error about '" << needle << "'";
  } catch (const lexico::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

void rewrite(const fs::path& file, const std::string& from, const std::string& to) {
  std::ifstream in(file);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  const std::size_t at = text.find(from);
  ASSERT_NE(at, std::string::npos) << from;
  text.replace(at, from.size(), to);
  std::ofstream(file) << text;
}

TEST(DictionarySet, RejectsMissingAndCorruptManifests) {
  const fs::path root = temp_dir("broken");
  expect_load_error(root / "nowhere", "no manifest.json");
  // name, text replaced in manifest.json (empty: file removed), replacement, expected message part.
  struct Damage {
    const char *name, *from, *to, *needle;
  };
  const Damage cases[] = {
      {"format", "lexico-dictionaries", "something-else", "format 'something-else'"},
      {"version", "\"version\": 1", "\"version\": 7", "version 7"},
      {"atoms", "\"atoms\": 10", "\"atoms\": 12", "the manifest says 6 x 12"},
      {"twice", "{\"layer\": 1, \"keys\"", "{\"layer\": 0, \"keys\"", "listed twice"},
      {"kind", "\"kind\": \"V\"", "\"kind\": \"Q\"", "kind 'Q'"},
      {"no_layers", "\"layers\": 2,", "", "missing key \"layers\""},
      {"truncated", "\"settings\"", "", "manifest.json"},
  };
  for (const Damage& damage : cases) {
    const fs::path dir = root / damage.name;
    lexico::save_dictionaries(dir.string(), example_layers(2, 6, 10), example_manifest());
    rewrite(dir / "manifest.json", damage.from, damage.to);
    expect_load_error(dir, damage.needle);
  }
  const fs::path dir = root / "missing_file";
  lexico::save_dictionaries(dir.string(), example_layers(2, 6, 10), example_manifest());
  fs::remove(dir / "layer01.v.dict");
  expect_load_error(dir, "layer01.v.dict");
  fs::remove_all(root);
}

}  // namespace
