#pragma once
// Compact storage of sparse codes, one row per coded vector: up to s atom indices
// (uint16) and coefficients (FP8 E4M3) with one power-of-two scale byte (E8M0) per
// row, so coefficients never overflow the format.
//
// Fixed rows hold exactly s entries (a code with fewer atoms is padded with zero
// coefficients): 3s + 1 bytes a row, no row header. Variable rows, for codes that a
// residual tolerance stopped early, store only the entries used plus a one-byte
// count: 3k + 2 bytes for a row of k entries.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "error.hpp"
#include "fp8.hpp"

namespace lexico {

class CodeStore {
 public:
  CodeStore() = default;
  CodeStore(int sparsity, bool variable_rows) : sparsity_(sparsity), variable_(variable_rows) {
    require(sparsity >= 1 && sparsity <= 255, "CodeStore: sparsity ", sparsity, " outside [1, 255]");
  }

  int sparsity() const { return sparsity_; }
  bool variable_rows() const { return variable_; }
  std::size_t rows() const { return scales_.size(); }

  // Appends one code of `count` <= s entries: indices[i] and fp32 coefficients[i].
  void append(const std::uint16_t* indices, const float* coefficients, int count) {
    require(count >= 0 && count <= sparsity_, "CodeStore::append: code has ", count, " entries, the store holds at most ",
            sparsity_);
    const int stored = variable_ ? count : sparsity_;
    const std::size_t begin = indices_.size();
    indices_.resize(begin + static_cast<std::size_t>(stored), 0);
    coefficients_.resize(begin + static_cast<std::size_t>(stored), 0);  // FP8 code 0 is +0.0
    std::copy(indices, indices + count, indices_.begin() + static_cast<std::ptrdiff_t>(begin));
    scales_.push_back(fp8_encode_scaled(coefficients, count, coefficients_.data() + begin));
    if (variable_) counts_.push_back(static_cast<std::uint8_t>(count));
  }

  // Visits every row in order: visit(row, indices, fp8 codes, count, scale factor).
  template <typename Visitor>
  void for_each_row(Visitor&& visit) const {
    const auto& scale_of = detail::e8m0_table();
    std::size_t offset = 0;
    for (std::size_t r = 0; r < scales_.size(); ++r) {
      const int count = variable_ ? counts_[r] : sparsity_;
      visit(r, indices_.data() + offset, coefficients_.data() + offset, count, scale_of[scales_[r]]);
      offset += static_cast<std::size_t>(count);
    }
  }

  std::size_t payload_bytes() const { return indices_.size() * sizeof(std::uint16_t) + coefficients_.size(); }
  std::size_t metadata_bytes() const { return scales_.size() + counts_.size(); }

  void clear() {
    indices_.clear();
    coefficients_.clear();
    scales_.clear();
    counts_.clear();
  }

 private:
  int sparsity_ = 1;
  bool variable_ = false;
  std::vector<std::uint16_t> indices_;
  std::vector<std::uint8_t> coefficients_;  // FP8 E4M3 codes
  std::vector<std::uint8_t> scales_;        // E8M0, one per row
  std::vector<std::uint8_t> counts_;        // entries per row, variable rows only
};

}  // namespace lexico
