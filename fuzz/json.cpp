// The JSON reader (safetensors headers, config.json, tokenizer.json, manifests).
#include <lexico/base/json.hpp>

#include "fuzz_target.hpp"

LEXICO_FUZZ_TARGET(json) { lexico::json::parse(bytes, "<fuzz>"); }
