// Dictionary files (Dictionary::load): the header's sizes, the metadata, the atoms, the
// checksum.
#include <lexico/coding/dictionary.hpp>

#include "fuzz_target.hpp"

LEXICO_FUZZ_TARGET(dictionary) {
  const lexico::Dictionary dictionary = lexico::Dictionary::from_bytes(bytes, "<fuzz>");
  // What loads saves and loads back unchanged.
  const lexico::Dictionary again = lexico::Dictionary::from_bytes(dictionary.to_bytes(), "<fuzz: saved again>");
  lexico::fuzz::require_sane(again.atoms() == dictionary.atoms() && again.metadata() == dictionary.metadata(),
                             "a loaded dictionary does not survive save and load");
}
