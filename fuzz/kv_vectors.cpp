// KV vector files of training (lexico-train's collected keys and values).
#include <lexico/training/kv_collect.hpp>

#include "fuzz_target.hpp"

LEXICO_FUZZ_TARGET(kv_vectors) {
  lexico::VectorFile file(std::make_unique<lexico::MemoryBytes>(bytes, "<fuzz>.vec"));
  const Eigen::MatrixXf head = file.read_head(64);
  lexico::fuzz::require_sane(head.rows() == file.dim() && head.cols() == std::min<Eigen::Index>(64, file.count()),
                             "read_head shape");
  if (file.count() > 1) {
    Eigen::MatrixXf tail(file.dim(), 1);
    file.read(file.count() - 1, tail);
  }
}
