#pragma once
// What the model-loader targets (llama2c_model, llama_hf) do with a model that loaded:
// a short forward through both runner paths (prefill, then one decode step), whose logits
// must be finite. The runner raises a lexico::error where the weights overflow fp32, so
// NaN or Inf logits reaching this point are a finding.

#include <lexico/cache/dense.hpp>
#include <lexico/model/llama.hpp>

#include "fuzz_target.hpp"

namespace lexico {
namespace fuzz {

inline void run_a_few_tokens(const LlamaModel& model) {
  const int vocab = model.config().vocab;
  LlamaRunner runner(model);
  DenseCache<float> cache(model.config().cache_shape());
  require_sane(runner.prefill({0, 1 % vocab}, cache).allFinite(), "prefill returned non-finite logits");
  require_sane(runner.decode(2 % vocab, cache).allFinite(), "decode returned non-finite logits");
}

}  // namespace fuzz
}  // namespace lexico
