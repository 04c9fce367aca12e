// One .safetensors file (SafetensorsFile over bytes in memory), every tensor read.
#include <cstddef>
#include <cstdint>
#include <memory>

#include <lexico/base/files.hpp>
#include <lexico/model/safetensors.hpp>

#include "fuzz_target.hpp"

LEXICO_FUZZ_TARGET(safetensors) {
  const lexico::SafetensorsFile file(std::make_shared<lexico::MemoryBytes>(bytes, "<fuzz>.safetensors"));
  for (const lexico::SafetensorsTensor& t : file.tensors()) {
    const std::size_t read = t.is_float() ? file.read_f32(t.name).size() : file.read_i32(t.name).size();
    lexico::fuzz::require_sane(static_cast<std::int64_t>(read) == t.elements(), "tensor '" + t.name + "' read short");
  }
}
