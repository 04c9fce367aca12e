// CodeStore: packed atom indices read back exactly at every width, rows dropped from
// the front keep the rest intact, and indices that do not fit are refused.
#include <lexico/coding/codes.hpp>

#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace {

struct Row {
  std::vector<std::uint16_t> indices;
  std::vector<float> coefficients;
};

std::vector<Row> random_rows(int bits, int sparsity, bool variable, int count, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> index(0, (1 << bits) - 1), entries(0, sparsity);
  std::normal_distribution<float> normal;
  std::vector<Row> rows(static_cast<std::size_t>(count));
  for (Row& row : rows) {
    const int k = variable ? entries(rng) : sparsity;
    for (int i = 0; i < k; ++i) {
      row.indices.push_back(static_cast<std::uint16_t>(index(rng)));
      row.coefficients.push_back(normal(rng));
    }
  }
  return rows;
}

// Indices as stored, row by row (a fixed row shorter than s is padded with zeros).
std::vector<std::vector<std::uint16_t>> read_indices(const lexico::CodeStore& store) {
  std::vector<std::vector<std::uint16_t>> out;
  store.for_each_row([&](std::size_t, lexico::CodeStore::Indices index, const std::uint8_t*, int count, float) {
    out.emplace_back();
    for (int i = 0; i < count; ++i) out.back().push_back(index[i]);
  });
  return out;
}

TEST(CodeStore, PackedIndicesReadBackAtEveryWidth) {
  for (bool variable : {false, true})
    for (int bits = 1; bits <= 16; ++bits)
      for (int sparsity : {1, 3, 8, 13}) {
        lexico::CodeStore store(sparsity, variable, bits);
        const auto rows = random_rows(bits, sparsity, variable, 40, static_cast<unsigned>(bits * 100 + sparsity));
        std::size_t entries = 0, packed = 0;
        for (const Row& row : rows) {
          store.append(row.indices.data(), row.coefficients.data(), static_cast<int>(row.indices.size()));
          const std::size_t k = variable ? row.indices.size() : static_cast<std::size_t>(sparsity);
          entries += k;
          packed += (k * static_cast<std::size_t>(bits) + 7) / 8;
        }
        const auto read = read_indices(store);
        ASSERT_EQ(read.size(), rows.size());
        for (std::size_t r = 0; r < rows.size(); ++r)
          for (std::size_t i = 0; i < rows[r].indices.size(); ++i)
            ASSERT_EQ(read[r][i], rows[r].indices[i]) << "bits " << bits << " s " << sparsity << " row " << r;
        EXPECT_EQ(store.payload_bytes(), packed + entries) << "bits " << bits;
      }
}

TEST(CodeStore, EraseFrontKeepsTheRemainingRows) {
  for (bool variable : {false, true}) {
    lexico::CodeStore store(6, variable, 11);
    const auto rows = random_rows(11, 6, variable, 30, 7);
    for (const Row& row : rows)
      store.append(row.indices.data(), row.coefficients.data(), static_cast<int>(row.indices.size()));
    const auto before = read_indices(store);
    store.erase_front(12);
    const auto after = read_indices(store);
    ASSERT_EQ(after.size(), 18u);
    for (std::size_t r = 0; r < after.size(); ++r) EXPECT_EQ(after[r], before[r + 12]);
    EXPECT_THROW(store.erase_front(19), lexico::error);
  }
}

TEST(CodeStore, RefusesIndicesWiderThanItsBits) {
  lexico::CodeStore store(2, false, 12);
  const std::uint16_t fits[2] = {4095, 0}, too_wide[2] = {1, 4096};
  const float coefficients[2] = {1.0f, 2.0f};
  EXPECT_NO_THROW(store.append(fits, coefficients, 2));
  EXPECT_THROW(store.append(too_wide, coefficients, 2), lexico::error);
  EXPECT_EQ(store.rows(), 1u);  // the refused row left nothing behind
  EXPECT_EQ(read_indices(store).front(), std::vector<std::uint16_t>({4095, 0}));
  EXPECT_THROW(lexico::CodeStore(4, false, 17), lexico::error);
  EXPECT_EQ(lexico::CodeStore::bits_for(4096), 12);
  EXPECT_EQ(lexico::CodeStore::bits_for(4097), 13);
  EXPECT_EQ(lexico::CodeStore::bits_for(1), 1);
}

}  // namespace
