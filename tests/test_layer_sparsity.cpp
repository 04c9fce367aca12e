// Atoms shared across layers by their dictionaries' errors: the interpolation and the
// greedy split against hand-computed cases, and the refusals when the manifest cannot
// support a split.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <lexico/coding/layer_sparsity.hpp>

#include "test_util.hpp"

namespace {

using lexico::DictionarySetManifest;
using lexico::ErrorCurve;

// Keys and values of every layer with the same errors, err[l] at 4 and err[l] / 2 at 8.
DictionarySetManifest halving_errors(const std::vector<double>& err) {
  DictionarySetManifest m;
  m.layers = static_cast<int>(err.size());
  for (int l = 0; l < m.layers; ++l)
    for (char kind : {'K', 'V'}) {
      m.errors.push_back({l, kind, 4, 0.0, err[static_cast<std::size_t>(l)]});
      m.errors.push_back({l, kind, 8, 0.0, err[static_cast<std::size_t>(l)] / 2});
    }
  return m;
}

void expect_error_mentioning(const std::function<void()>& f, const std::string& part) {
  const std::string message = lexico_test::error_of(f);
  EXPECT_NE(message.find(part), std::string::npos) << "message: '" << message << "'";
}

TEST(ErrorCurve, InterpolatesLogLinearlyBetweenMeasuredSparsities) {
  ErrorCurve curve;
  curve.add(16, 0.1);
  curve.add(4, 0.4);
  EXPECT_DOUBLE_EQ(curve.at(4), 0.4);
  EXPECT_DOUBLE_EQ(curve.at(16), 0.1);
  EXPECT_NEAR(curve.at(8), 0.2, 1e-12);  // halfway in log s: the geometric mean
  EXPECT_NEAR(curve.at(5), 0.4 * 4.0 / 5.0, 1e-12);  // error ∝ 1/s between these points
  EXPECT_NEAR(curve.at(2), 0.8, 1e-12);  // below 4 along the same power law
  EXPECT_DOUBLE_EQ(curve.at(1), 1.0);    // 1.6 capped: no code is worse than none
  EXPECT_THROW(curve.at(0), lexico::error);
  EXPECT_THROW(curve.at(17), lexico::error);
  ErrorCurve single;
  single.add(8, 0.2);
  EXPECT_THROW(single.at(8), lexico::error);  // one point gives no slope
  EXPECT_THROW(curve.add(8, std::nan("")), lexico::error);
  EXPECT_THROW(curve.add(8, 0.0), lexico::error);
}

TEST(LayerSparsity, AtomsGoWhereTheyLowerTheErrorMost) {
  // Layer 1 codes 4x worse: each of its atoms gains 16x more squared error, so it takes
  // all 4 atoms above the measured minimum (by hand: its last gain 2(1.6²/49 − 1.6²/64)
  // = 0.0245 beats layer 0's first, 2(0.1² − 0.08²) = 0.0072).
  EXPECT_EQ(lexico::allocate_layer_sparsity(halving_errors({0.1, 0.4}), 6), std::vector<int>({4, 8}));
  // Below the measured 4 along the power law (errors 0.4/s and min(1, 1.6/s)), from 1
  // atom each: layer 1 gains 0.72, 0.711, 0.249 for its 2nd to 4th atoms, then layer 0's
  // 2nd (0.24) beats layer 1's 5th (0.115).
  EXPECT_EQ(lexico::allocate_layer_sparsity(halving_errors({0.1, 0.4}), 3), std::vector<int>({2, 4}));
  // Equal errors split evenly; the mean is kept.
  EXPECT_EQ(lexico::allocate_layer_sparsity(halving_errors({0.3, 0.3}), 6), std::vector<int>({6, 6}));
  EXPECT_EQ(lexico::allocate_layer_sparsity(halving_errors({0.3, 0.3, 0.3}), 7), std::vector<int>({7, 7, 7}));
  // Errors close enough that the gains cross: layer 1 (0.2) first, then both.
  const std::vector<int> split = lexico::allocate_layer_sparsity(halving_errors({0.15, 0.2}), 6);
  EXPECT_EQ(split[0] + split[1], 12);
  EXPECT_GT(split[1], split[0]);
  EXPECT_GT(split[0], 4);
}

TEST(LayerSparsity, RefusesWhatTheManifestCannotSupport) {
  expect_error_mentioning([] { lexico::allocate_layer_sparsity(halving_errors({0.1, 0.4}), 9); }, "mean sparsity 9");
  expect_error_mentioning([] { lexico::allocate_layer_sparsity(halving_errors({0.1, 0.4}), 0); }, "mean sparsity 0");
  DictionarySetManifest keys_only = halving_errors({0.1});
  keys_only.errors.erase(std::remove_if(keys_only.errors.begin(), keys_only.errors.end(),
                                        [](const lexico::DictionaryError& e) { return e.kind == 'V'; }),
                         keys_only.errors.end());
  expect_error_mentioning([&] { lexico::allocate_layer_sparsity(keys_only, 6); }, "layer 0");
  DictionarySetManifest one_point;
  one_point.layers = 1;
  one_point.errors = {{0, 'K', 8, 0.0, 0.2}, {0, 'V', 8, 0.0, 0.3}};
  expect_error_mentioning([&] { lexico::allocate_layer_sparsity(one_point, 8); }, "one sparsity");
  DictionarySetManifest stray = halving_errors({0.1});
  stray.errors.push_back({3, 'K', 4, 0.0, 0.1});
  expect_error_mentioning([&] { lexico::allocate_layer_sparsity(stray, 6); }, "layer 3");
}

}  // namespace
