#pragma once
// What an inference engine needs, layer by layer: the base (errors, fp16/fp8, kernels,
// RoPE), the sparse-coding core (dictionaries, the OMP encoder, the per-model CodeSpace,
// codes and attention on them) and every KV cache. Not included: loading dictionary
// sets from disk and the cache factory (coding/dictionary_set.hpp, cache/factory.hpp,
// which bring the JSON reader), the model runner with its tokenizers and file formats
// (model/), and dictionary training (training/).

#include "version.hpp"
#include "base/error.hpp"
#include "base/fp8.hpp"
#include "base/half.hpp"
#include "base/kernels.hpp"
#include "base/parallel.hpp"
#include "base/rope.hpp"
#include "base/rows.hpp"
#include "coding/dictionary.hpp"
#include "coding/code_book.hpp"
#include "coding/omp.hpp"
#include "coding/atom_budget.hpp"
#include "coding/codes.hpp"
#include "coding/code_attention.hpp"
#include "coding/code_space.hpp"
#include "cache/attention.hpp"
#include "cache/cache.hpp"
#include "cache/dense.hpp"
#include "cache/eviction.hpp"
#include "cache/fp8_cache.hpp"
#include "cache/h2o.hpp"
#include "cache/kivi.hpp"
#include "cache/lexico_cache.hpp"
#include "cache/pyramidkv.hpp"
#include "cache/snapkv.hpp"
#include "cache/streaming.hpp"
#include "cache/token_quant.hpp"
#include "cache/tova.hpp"
