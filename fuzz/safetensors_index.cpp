// model.safetensors.index.json of a sharded checkpoint (SafetensorsCheckpoint over a
// MemoryFolder), every tensor it maps read. The two shards beside it are fixed and valid:
//   model-00001-of-00002.safetensors: x.weight (F32 [2, 3]), ids (I32 [4])
//   model-00002-of-00002.safetensors: y.weight (F32 [3])
#include <cstdint>
#include <string>
#include <vector>

#include <lexico/base/files.hpp>
#include <lexico/model/safetensors.hpp>

#include "fuzz_target.hpp"

namespace {

lexico::MemoryFolder shards() {
  const std::vector<float> x = {1, 2, 3, 4, 5, 6}, y = {-1, 0.5f, 7};
  const std::vector<std::int32_t> ids = {0, 1, -1, 2147483647};
  lexico::SafetensorsWriter first, second;
  first.add("x.weight", {2, 3}, x.data());
  first.add("ids", {4}, ids.data());
  second.add("y.weight", {3}, y.data());
  lexico::MemoryFolder folder("<fuzz>");
  folder.add("model-00001-of-00002.safetensors", first.bytes());
  folder.add("model-00002-of-00002.safetensors", second.bytes());
  return folder;
}

}  // namespace

LEXICO_FUZZ_TARGET(safetensors_index) {
  static const lexico::MemoryFolder fixed = shards();
  lexico::MemoryFolder folder = fixed;
  folder.add("model.safetensors.index.json", std::string(bytes));
  const lexico::SafetensorsCheckpoint checkpoint(folder);
  for (const std::string& name : checkpoint.names()) {
    if (checkpoint.tensor(name).is_float()) checkpoint.read_f32(name);
    else checkpoint.read_i32(name);
  }
}
