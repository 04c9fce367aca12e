// Every committed input of every fuzz target (fuzz/*.cpp), replayed through the target
// itself in this build (Release, and the sanitizer build of CI): the seeds of
// fuzz/corpus/<target> load or are rejected with a lexico::error; every input of
// fuzz/regressions/<target> (crashes, hangs, huge allocations and NaN found by fuzzing;
// the first ones from ../shared/fuzz-findings) is rejected with a lexico::error, promptly.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "../fuzz/fuzz_target.hpp"

namespace {

namespace fs = std::filesystem;

std::vector<fs::path> inputs_of(const fs::path& folder) {
  std::vector<fs::path> files;
  if (!fs::is_directory(folder)) return files;
  for (const auto& entry : fs::directory_iterator(folder))
    if (entry.is_regular_file()) files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  return files;
}

std::string bytes_of(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs one input; returns the rejection message, or "" when the target accepted it.
// Any other exception fails the test with the file's name.
std::string replay(lexico::fuzz::Target target, const fs::path& file, bool* accepted) {
  const std::string bytes = bytes_of(file);
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  *accepted = false;
  try {
    target(bytes);
    *accepted = true;
  } catch (const lexico::error& e) {
    message = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << file << ": " << e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 10.0) << file << " took " << seconds << " s (a hang found by fuzzing?)";
  return message;
}

const fs::path fuzz_dir = LEXICO_FUZZ_DIR;

TEST(FuzzInputs, EveryTargetHasASeedCorpus) {
  ASSERT_FALSE(lexico::fuzz::targets().empty());
  for (const auto& [name, target] : lexico::fuzz::targets())
    EXPECT_FALSE(inputs_of(fuzz_dir / "corpus" / name).empty()) << "fuzz/corpus/" << name << " is empty";
}

TEST(FuzzInputs, SeedsLoadOrAreRejectedWithAClearError) {
  for (const auto& [name, target] : lexico::fuzz::targets()) {
    int accepted_count = 0;
    for (const auto& file : inputs_of(fuzz_dir / "corpus" / name)) {
      bool accepted = false;
      replay(target, file, &accepted);
      accepted_count += accepted;
    }
    // A corpus of rejected inputs only would not exercise the parser past its first check.
    EXPECT_GT(accepted_count, 0) << "no seed of fuzz/corpus/" << name << " is accepted";
  }
}

TEST(FuzzInputs, RegressionsAreRejectedWithAClearError) {
  int replayed = 0;
  for (const auto& [name, target] : lexico::fuzz::targets()) {
    for (const auto& file : inputs_of(fuzz_dir / "regressions" / name)) {
      bool accepted = false;
      const std::string message = replay(target, file, &accepted);
      EXPECT_FALSE(accepted) << file << " was accepted";
      if (!accepted) {
        EXPECT_FALSE(message.empty()) << file;
      }
      ++replayed;
    }
  }
  std::cout << "replayed " << replayed << " regression inputs\n";
}

}  // namespace
