#pragma once
// Row-major matrices, as token rows of heads are laid out, and the widest GQA group.

#include <Eigen/Core>

namespace lexico {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Most query heads that may share one KV head (GQA group); sizes stack buffers.
inline constexpr int max_gqa_group = 64;
using ConstRowsRef = Eigen::Ref<const RowMatrix>;
using RowsRef = Eigen::Ref<RowMatrix>;

}  // namespace lexico
