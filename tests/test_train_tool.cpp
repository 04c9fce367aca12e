// lexico-train killed part-way (a child process and SIGKILL): the output folder keeps the
// previous set untouched, and a rerun with the same arguments continues from the
// dictionaries the killed run finished, giving the dictionaries an uninterrupted run gives.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <lexico/coding/dictionary_set.hpp>
#include <lexico/coding/key_metric.hpp>
#include <lexico/coding/value_metric.hpp>

namespace {

namespace fs = std::filesystem;

const std::string tool = std::string(LEXICO_BINARY_DIR) + "/examples/lexico-train";
const std::string data = LEXICO_REPO_DATA;

std::vector<std::string> train_args(const fs::path& out, int atoms) {
  return {tool,        "--model",    data + "/stories260k/stories260K.bin",
          "--text",    data + "/text/tinystories_valid_head.txt",
          "--tokenizer", data + "/stories260k/tok512.bin",
          "--atoms",   std::to_string(atoms), "--sparsity", "4", "--vectors", "100000", "--dev-vectors", "2000",
          "--window",  "64",        "--threads", "1", "--out", out.string()};
}

pid_t spawn(const std::vector<std::string>& args, const fs::path& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::FILE* out = std::freopen(log.c_str(), "w", stderr);
    (void)out;
    std::freopen("/dev/null", "w", stdout);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

std::string text_of(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

int records_in(const fs::path& dir) {
  int n = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.path().extension() == ".json") ++n;
  return n;
}

TEST(TrainTool, KilledRunKeepsThePreviousSetAndTheRerunContinues) {
  if (!fs::exists(tool)) GTEST_SKIP() << tool << " not built (LEXICO_BUILD_EXAMPLES=OFF)";
  const fs::path root = fs::temp_directory_path() / ("lexico_train_kill_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  const fs::path out = root / "set", partial = root / "set.partial";

  // The previous output: a complete set with 64 atoms.
  ASSERT_EQ(wait_exit(spawn(train_args(out, 64), root / "first.log")), 0) << text_of(root / "first.log");
  const std::string previous_manifest = text_of(out / "manifest.json");
  ASSERT_FALSE(previous_manifest.empty());

  // A run with 256 atoms, killed once it has finished 2 of its 10 dictionaries.
  const pid_t pid = spawn(train_args(out, 256), root / "killed.log");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(3);
  while (records_in(partial) < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  ASSERT_EQ(wait_exit(pid), -SIGKILL) << "the run ended before it was killed: " << text_of(root / "killed.log");
  const int kept = records_in(partial);
  ASSERT_GE(kept, 2);
  ASSERT_LT(kept, 10) << "killed too late to test a resume";

  // The previous set is untouched and loads.
  EXPECT_EQ(text_of(out / "manifest.json"), previous_manifest);
  EXPECT_EQ(lexico::load_dictionaries(out.string()).manifest.atoms, 64);

  // The rerun continues from the kept dictionaries...
  ASSERT_EQ(wait_exit(spawn(train_args(out, 256), root / "resumed.log")), 0) << text_of(root / "resumed.log");
  EXPECT_NE(text_of(root / "resumed.log").find("continuing after " + std::to_string(kept) + " of 10"),
            std::string::npos)
      << text_of(root / "resumed.log");
  EXPECT_FALSE(fs::exists(partial));
  const lexico::DictionarySet resumed = lexico::load_dictionaries(out.string());
  EXPECT_EQ(resumed.manifest.atoms, 256);
  EXPECT_EQ(resumed.manifest.settings.at("resumed_dictionaries"), std::to_string(kept));
  EXPECT_TRUE(fs::exists(out / "vectors")) << "the collected vectors moved with the set";

  // ...and gives what an uninterrupted run gives.
  const fs::path fresh = root / "fresh";
  ASSERT_EQ(wait_exit(spawn(train_args(fresh, 256), root / "fresh.log")), 0) << text_of(root / "fresh.log");
  const lexico::DictionarySet reference = lexico::load_dictionaries(fresh.string());
  ASSERT_EQ(resumed.layers.size(), reference.layers.size());
  for (std::size_t l = 0; l < reference.layers.size(); ++l) {
    EXPECT_TRUE(resumed.layers[l].keys->atoms() == reference.layers[l].keys->atoms()) << "layer " << l << " keys";
    EXPECT_TRUE(resumed.layers[l].values->atoms() == reference.layers[l].values->atoms()) << "layer " << l << " values";
  }
  fs::remove_all(root);
}

TEST(TrainTool, KeptDictionariesOfOtherArgumentsAreDiscardedWithAReason) {
  if (!fs::exists(tool)) GTEST_SKIP() << tool << " not built (LEXICO_BUILD_EXAMPLES=OFF)";
  const fs::path root = fs::temp_directory_path() / ("lexico_train_args_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "set.partial");
  // What a killed run with 128 atoms would have left.
  std::ofstream(root / "set.partial" / "run.txt") << "atoms=128\n";
  const pid_t pid = spawn(train_args(root / "set", 32), root / "log");
  ASSERT_EQ(wait_exit(pid), 0) << text_of(root / "log");
  const std::string log = text_of(root / "log");
  EXPECT_NE(log.find("other arguments"), std::string::npos) << log;
  EXPECT_NE(log.find("starting over"), std::string::npos) << log;
  EXPECT_EQ(lexico::load_dictionaries((root / "set").string()).manifest.atoms, 32);
  fs::remove_all(root);
}

// --key-metric --from carries a plain set into the metric: key atoms √w ⊙ a renormalised
// with the manifest's √w (equal on the model's RoPE pairs), values untouched; training
// with --key-metric stores a metric too; --from alone is a usage error.
TEST(TrainTool, KeyMetricFromAPlainSet) {
  if (!fs::exists(tool)) GTEST_SKIP() << tool << " not built (LEXICO_BUILD_EXAMPLES=OFF)";
  const fs::path root = fs::temp_directory_path() / ("lexico_train_metric_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  ASSERT_EQ(wait_exit(spawn(train_args(root / "plain", 32), root / "log")), 0) << text_of(root / "log");
  std::vector<std::string> args = train_args(root / "metric", 32);
  args.insert(args.end(), {"--key-metric", "--from", (root / "plain").string(), "--work", (root / "plain" / "vectors").string()});
  ASSERT_EQ(wait_exit(spawn(args, root / "log")), 0) << text_of(root / "log");
  const lexico::DictionarySet plain = lexico::load_dictionaries((root / "plain").string());
  const lexico::DictionarySet metric = lexico::load_dictionaries((root / "metric").string());
  ASSERT_EQ(metric.manifest.key_metric.size(), static_cast<std::size_t>(plain.manifest.layers));
  EXPECT_EQ(metric.manifest.settings.at("key_metric"), "queries");
  bool varies = false;
  for (int l = 0; l < plain.manifest.layers; ++l) {
    const std::vector<float>& scale = metric.manifest.key_metric[static_cast<std::size_t>(l)];
    for (float s : scale) varies = varies || std::abs(s - scale.front()) > 1e-3f;
    const auto& layer = metric.layers[static_cast<std::size_t>(l)];
    EXPECT_LT((lexico::mapped(*plain.layers[static_cast<std::size_t>(l)].keys, lexico::key_map(scale)).atoms() -
               layer.keys->atoms()).norm(),
              1e-5);
    EXPECT_EQ(layer.values->atoms(), plain.layers[static_cast<std::size_t>(l)].values->atoms());
  }
  EXPECT_TRUE(varies) << "a metric of equal weights tells nothing";
  EXPECT_EQ(lexico::load_code_space((root / "metric").string())->key_scale(0)->size(),
            static_cast<std::size_t>(plain.manifest.head_dim));

  args = train_args(root / "trained", 32);
  args.insert(args.end(), {"--key-metric", "--key-metric-power", "0.5", "--work", (root / "plain" / "vectors").string()});
  ASSERT_EQ(wait_exit(spawn(args, root / "log")), 0) << text_of(root / "log");
  const lexico::DictionarySet trained = lexico::load_dictionaries((root / "trained").string());
  ASSERT_EQ(trained.manifest.key_metric.size(), static_cast<std::size_t>(plain.manifest.layers));
  // Power 0.5: every weight the square root of the full metric's (the same queries).
  EXPECT_NEAR(trained.manifest.key_metric[0][1], std::sqrt(metric.manifest.key_metric[0][1]), 1e-4);

  args = train_args(root / "bad", 32);
  args.insert(args.end(), {"--from", (root / "plain").string()});
  EXPECT_EQ(wait_exit(spawn(args, root / "log")), 2);
  EXPECT_NE(text_of(root / "log").find("give --key-metric or --value-metric"), std::string::npos) << text_of(root / "log");
  fs::remove_all(root);
}

}  // namespace
