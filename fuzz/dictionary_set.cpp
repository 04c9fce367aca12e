// Dictionary-set manifests (load_code_space): the input is manifest.json, in a folder in
// memory beside two valid dictionaries of the size the seeds name (8 x 6, layer 0), so
// manifests that pass their own checks go on to load dictionaries and build a CodeSpace.
#include <lexico/coding/dictionary_set.hpp>

#include "fuzz_target.hpp"

namespace {

// 8 x 6 atoms, distinct for keys and values.
std::string dictionary_bytes(float tilt) {
  Eigen::MatrixXf atoms = Eigen::MatrixXf::Identity(8, 6);
  atoms.row(7).setConstant(tilt);
  return lexico::Dictionary(atoms, {{"layer", "0"}}).to_bytes();
}

}  // namespace

LEXICO_FUZZ_TARGET(dictionary_set) {
  static const std::string keys = dictionary_bytes(0.5f), values = dictionary_bytes(-0.25f);
  lexico::MemoryFolder folder("<fuzz set>");
  folder.add("manifest.json", std::string(bytes)).add("layer00.k.dict", keys).add("layer00.v.dict", values);
  lexico::CodeSpaceOptions options;
  options.threads = 1;
  const auto space = lexico::load_code_space(folder, options);
  const lexico::DictionarySetManifest& manifest = space->manifest();
  lexico::fuzz::require_sane(space->layers() == manifest.layers && space->dim() == manifest.head_dim,
                             "the CodeSpace does not match its manifest");
}
