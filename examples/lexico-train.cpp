// lexico-train: learns one key and one value dictionary per layer of a Llama model
// from its KV vectors on a training corpus and writes them with a manifest that
// lexico-eval --cache lexico --dict DIR reads (load_dictionaries).
//
//   lexico-train --model DIR|FILE.bin (--tokens FILE.u16 | --text FILE [--tokenizer PATH])
//                --atoms N --sparsity S --out DIR [options]
//
// KV vectors are collected once into vector files under --work (default OUT/vectors)
// and reused by later runs with the same model, corpus, window and seed.
//
// Nothing is lost on interruption: each finished dictionary is kept in OUT.partial/
// (dictionary file, then its record, each renamed into place), and a rerun with the same
// arguments continues from there (or says which argument changed and starts over). The
// set is written to a folder of its own and swapped in for OUT in one rename, so OUT
// always holds the previous set or the complete new one.

#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <lexico/base/files.hpp>
#include <lexico/base/json.hpp>
#include <lexico/coding/dictionary_set.hpp>
#include <lexico/coding/value_metric.hpp>
#include <lexico/training/kv_collect.hpp>
#include <lexico/model/llama.hpp>
#include <lexico/training/train.hpp>
#include <lexico/version.hpp>

#include "cli.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

namespace fs = std::filesystem;
using cli::Clock;

const char* const usage =
    "usage: lexico-train --model DIR|FILE.bin (--tokens FILE.u16 | --text FILE) --atoms N --sparsity S --out DIR\n"
    "  --method lexico|mod|ksvd   update rule (default ksvd)\n"
    "  --vectors M                training vectors per dictionary (default 1048576)\n"
    "  --dev FILE                 held-out .u16 or text file for the error table (default: unused train windows)\n"
    "  --dev-vectors M            held-out vectors per dictionary (default 32768)\n"
    "  --tokenizer PATH           tokenizer for --text (default: the model's own)\n"
    "  --init samples|kmeans++    initial atoms (default kmeans++)\n"
    "  --batch B  --lr RATE       vectors per update, Adam learning rate (defaults per method)\n"
    "  --window T                 tokens per collection window, BOS first (default 1024)\n"
    "  --seed X  --threads T      (defaults 0, all cores)\n"
    "  --work DIR                 where collected KV vectors live (default OUT/vectors)\n"
    "  --keys-before-rope         train the key dictionaries on keys before RoPE; the lexico cache\n"
    "                             then codes keys before RoPE (lower error, slower scoring)\n"
    "  --atom-type f32|f16        how the files store the atoms (default f32); f16 halves the bytes\n"
    "                             and holds exactly the atoms the cache codes with\n"
    "  --key-metric               code keys for what queries see: measure each layer's query energy per\n"
    "                             RoPE pair on the first 64 training windows, train the key dictionaries\n"
    "                             on keys whitened by it and store it in the manifest (key_metric.hpp)\n"
    "  --key-metric-power P       the metric's pair energies raised to P (default 1; 0 < P <= 4)\n"
    "  --value-metric             code values for what the output projection keeps: per layer the metric\n"
    "                             of W_o (value_metric.hpp); value dictionaries trained in it, stored\n"
    "  --value-metric-power P     its eigenvalues raised to P (default 1; 0 < P <= 4)\n"
    "  --from DIR                 with --key-metric or --value-metric: carry DIR's plain dictionaries into\n"
    "                             the metrics instead of training (atoms mapped and renormalised)\n";

struct Args {
  std::string model, tokens, text, tokenizer, dev, out, work;
  lexico::TrainOptions train;
  Eigen::Index dev_vectors = 32768;
  int window = 1024;
  bool keys_before_rope = false;
  bool key_metric = false, value_metric = false;
  double key_metric_power = 1, value_metric_power = 1;
  std::string from;  // --from: a plain set to carry into the metrics
  lexico::AtomType atom_type = lexico::AtomType::f32;
};

// A flag whose value a lexico parser reads; its lexico::error becomes a usage error.
template <typename Parse>
auto named(const char* flag, Parse parse) {
  return [flag, parse](const std::string& value) {
    try {
      parse(value);
    } catch (const lexico::error& e) {
      throw cli::usage_error(std::string(flag) + ": " + e.what());
    }
  };
}

Args parse_args(int argc, char** argv) {
  Args a;
  a.train.vectors = Eigen::Index(1) << 20;
  using cli::parse_number;
  using Index = Eigen::Index;
  bool atoms = false, sparsity = false;
  cli::parse_flags(
      argc, argv,
      {{"--model", [&](const std::string& v) { a.model = v; }},
       {"--tokens", [&](const std::string& v) { a.tokens = v; }},
       {"--text", [&](const std::string& v) { a.text = v; }},
       {"--tokenizer", [&](const std::string& v) { a.tokenizer = v; }},
       {"--dev", [&](const std::string& v) { a.dev = v; }},
       {"--out", [&](const std::string& v) { a.out = v; }},
       {"--work", [&](const std::string& v) { a.work = v; }},
       {"--atoms", [&](const std::string& v) { a.train.atoms = parse_number<int>("--atoms", v, 1, 65536), atoms = true; }},
       {"--sparsity",
        [&](const std::string& v) { a.train.sparsity = parse_number<int>("--sparsity", v, 1, 255), sparsity = true; }},
       {"--vectors", [&](const std::string& v) { a.train.vectors = parse_number<Index>("--vectors", v, 1, Index(1) << 40); }},
       {"--dev-vectors", [&](const std::string& v) { a.dev_vectors = parse_number<Index>("--dev-vectors", v, 1, Index(1) << 30); }},
       {"--batch", [&](const std::string& v) { a.train.batch = parse_number<Index>("--batch", v, 1, Index(1) << 24); }},
       {"--lr", [&](const std::string& v) { a.train.learning_rate = parse_number<float>("--lr", v, 1e-9f, 1.0f); }},
       {"--window", [&](const std::string& v) { a.window = parse_number<int>("--window", v, 2, 1 << 20); }},
       {"--seed", [&](const std::string& v) { a.train.seed = parse_number<std::uint64_t>("--seed", v, 0, ~std::uint64_t(0)); }},
       {"--threads", [&](const std::string& v) { a.train.threads = parse_number<int>("--threads", v, 1, 1024); }},
       {"--method", named("--method", [&](const std::string& v) { a.train.method = lexico::parse_train_method(v); })},
       {"--init", named("--init", [&](const std::string& v) { a.train.init = lexico::parse_train_init(v); })},
       {"--atom-type", named("--atom-type", [&](const std::string& v) { a.atom_type = lexico::parse_atom_type(v); })},
       {"--keys-before-rope", [&](const std::string&) { a.keys_before_rope = true; }},
       {"--key-metric", [&](const std::string&) { a.key_metric = true; }},
       {"--value-metric", [&](const std::string&) { a.value_metric = true; }},
       {"--value-metric-power",
        [&](const std::string& v) { a.value_metric_power = parse_number<double>("--value-metric-power", v, 1e-3, 4); }},
       {"--key-metric-power",
        [&](const std::string& v) { a.key_metric_power = parse_number<double>("--key-metric-power", v, 1e-3, 4); }},
       {"--from", [&](const std::string& v) { a.from = v; }}},
      usage, {"--keys-before-rope", "--key-metric", "--value-metric"});
  if (a.model.empty()) throw cli::usage_error("--model is required");
  if (a.tokens.empty() == a.text.empty()) throw cli::usage_error("give exactly one of --tokens FILE.u16 and --text FILE");
  if (!atoms || !sparsity) throw cli::usage_error("--atoms and --sparsity are required");
  if (a.out.empty()) throw cli::usage_error("--out is required");
  if (a.train.sparsity > a.train.atoms) throw cli::usage_error("--sparsity must not exceed --atoms");
  if (!a.from.empty() && !a.key_metric && !a.value_metric)
    throw cli::usage_error("--from carries a set into a metric: give --key-metric or --value-metric");
  for (const std::string* path : {&a.model, &a.tokens, &a.text, &a.dev, &a.tokenizer}) cli::require_file(*path);
  if (a.work.empty()) a.work = (fs::path(a.out) / "vectors").string();
  return a;
}

std::vector<int> read_corpus(const Args& args, const std::string& path, const lexico::LlamaModel& model) {
  const bool text = fs::path(path).extension() != ".u16";
  return cli::read_corpus(path, text && args.tokenizer.empty() ? cli::default_tokenizer(args.model) : args.tokenizer,
                          model);
}

// What a directory of collected vectors holds; a later run reuses it when the
// source matches and it has at least the windows it needs (windows come in one
// seeded order, so fewer windows are a prefix of more).
struct Collection {
  std::string model, corpus;
  int window = 0;
  std::uint64_t seed = 0;
  std::size_t windows = 0;
  bool keys_before_rope = false;

  std::string key() const {
    std::ostringstream out;
    out << "model=" << fs::absolute(model).string() << "\ncorpus=" << fs::absolute(corpus).string()
        << "\nwindow=" << window << "\nseed=" << seed << "\n" << (keys_before_rope ? "keys=before_rope\n" : "");
    return out.str();
  }
  static std::string stamp_path(const std::string& dir) { return (fs::path(dir) / "collection.txt").string(); }
  bool present_in(const std::string& dir) const {
    std::ifstream in(stamp_path(dir));
    const std::string stored((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string prefix = key() + "windows=";
    if (!in || stored.compare(0, prefix.size(), prefix) != 0) return false;
    return std::strtoull(stored.c_str() + prefix.size(), nullptr, 10) >= windows;
  }
  void stamp(const std::string& dir) const {
    lexico::write_file_atomically(stamp_path(dir), key() + "windows=" + std::to_string(windows) + "\n");
  }
};

// Windows (in the seeded order) until they hold `vectors` KV vectors, after skipping
// the first `skip_vectors` worth (held-out windows of the training corpus).
std::vector<std::vector<int>> windows_for(const std::vector<std::vector<int>>& all, int kv_heads, Eigen::Index vectors,
                                          Eigen::Index skip_vectors, std::size_t* first = nullptr) {
  std::size_t w = 0;
  for (Eigen::Index skipped = 0; w < all.size() && skipped < skip_vectors; ++w)
    skipped += static_cast<Eigen::Index>(all[w].size()) * kv_heads;
  if (first) *first = w;
  std::vector<std::vector<int>> out;
  for (Eigen::Index have = 0; w < all.size() && have < vectors; ++w) {
    out.push_back(all[w]);
    have += static_cast<Eigen::Index>(all[w].size()) * kv_heads;
  }
  return out;
}

// A progress bar over `total` windows, with the ETA of the windows done so far.
std::function<void(std::size_t)> window_progress(const std::string& label, std::size_t total) {
  auto bar = std::make_shared<cli::ProgressBar>();
  const auto begin = Clock::now();
  return [bar, label, total, begin](std::size_t done) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - begin).count();
    const double fraction = static_cast<double>(done) / static_cast<double>(total);
    bar->show(label, fraction, elapsed / fraction - elapsed, std::to_string(done) + "/" + std::to_string(total) + " windows");
  };
}

// Collects `windows` into dir unless a matching collection is already there.
void ensure_collected(const lexico::LlamaModel& model, const std::vector<std::vector<int>>& windows,
                      Collection collection, const std::string& dir, const std::string& label) {
  collection.windows = windows.size();
  if (collection.present_in(dir)) {
    std::fprintf(stderr, "%s: reusing KV vectors in %s\n", label.c_str(), dir.c_str());
    return;
  }
  fs::remove(Collection::stamp_path(dir));
  lexico::collect_kv_files(model, windows, dir, window_progress(label, windows.size()), collection.keys_before_rope);
  collection.stamp(dir);
}

// The dictionaries a run has finished, kept in OUT.partial/ until the set is in place.
// run.txt holds the arguments that decide the result; a dictionary counts as finished
// once its record (NAME.json: the manifest entries it contributes) exists, which is
// written after its dictionary file.
class Checkpoint {
 public:
  struct Finished {
    std::shared_ptr<const lexico::Dictionary> dictionary;
    std::map<std::string, std::string> settings;
    std::vector<lexico::DictionaryError> errors;
  };

  Checkpoint(const std::string& out, const std::string& run_key) : dir_(out + ".partial") {
    const fs::path run_file = fs::path(dir_) / "run.txt";
    if (fs::exists(run_file)) {
      const std::string previous = lexico::read_file(run_file.string(), 1 << 20);
      if (previous != run_key) {
        std::fprintf(stderr, "lexico-train: %s holds dictionaries of a run with other arguments (%s); starting over\n",
                     dir_.c_str(), first_difference(previous, run_key).c_str());
        fs::remove_all(dir_);
      }
    } else if (fs::exists(dir_)) {
      fs::remove_all(dir_);  // no run.txt: interrupted before anything was kept
    }
    fs::create_directories(dir_);
    if (!fs::exists(run_file)) lexico::write_file_atomically(run_file.string(), run_key);
  }

  std::optional<Finished> finished(const std::string& name) const {
    const std::string record_path = path(name + ".json");
    if (!fs::exists(record_path)) return std::nullopt;
    const lexico::json::Value record = lexico::json::parse_file(record_path);
    Finished done;
    done.dictionary = std::make_shared<const lexico::Dictionary>(lexico::Dictionary::load(path(name + ".dict")));
    for (const auto& [key, value] : record.at("settings", record_path).as_object(record_path))
      done.settings[key] = value.as_string(record_path);
    for (const auto& e : record.at("errors", record_path).as_array(record_path)) {
      const auto& fields = e.as_array(record_path);
      lexico::require(fields.size() == 5, record_path, ": an error entry needs layer, kind, s, train, dev");
      done.errors.push_back({static_cast<int>(fields[0].as_int()), fields[1].as_string(record_path).at(0),
                             static_cast<int>(fields[2].as_int()), fields[3].as_double(), fields[4].as_double()});
    }
    return done;
  }

  void keep(const std::string& name, const Finished& done) const {
    done.dictionary->save(path(name + ".dict"));  // atomic: temporary file, then rename
    std::ostringstream record;
    record.precision(17);
    record << "{\"settings\": {";
    const char* sep = "";
    for (const auto& [key, value] : done.settings) {
      record << sep << lexico::json::quote(key) << ": " << lexico::json::quote(value);
      sep = ", ";
    }
    record << "}, \"errors\": [";
    sep = "";
    for (const auto& e : done.errors) {
      record << sep << "[" << e.layer << ", \"" << e.kind << "\", " << e.sparsity << ", " << e.train << ", " << e.dev
             << "]";
      sep = ", ";
    }
    record << "]}\n";
    lexico::write_file_atomically(path(name + ".json"), record.str());
  }

  void remove() const { fs::remove_all(dir_); }
  const std::string& dir() const { return dir_; }

 private:
  std::string path(const std::string& file) const { return (fs::path(dir_) / file).string(); }

  // The first line that differs, as "key: old -> new".
  static std::string first_difference(const std::string& a, const std::string& b) {
    std::istringstream in_a(a), in_b(b);
    std::string line_a, line_b;
    while (true) {
      const bool more_a = static_cast<bool>(std::getline(in_a, line_a));
      const bool more_b = static_cast<bool>(std::getline(in_b, line_b));
      if (!more_a && !more_b) return "?";
      if (!more_a || !more_b || line_a != line_b) return line_a + " -> " + line_b;
    }
  }

  std::string dir_;
};

// FNV-1a (64-bit, hex) of a file's bytes: which corpus a set was trained on, checkable
// with any FNV tool.
std::string file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  lexico::require(static_cast<bool>(in), "cannot read '", path, "' to hash it");
  lexico::detail::Fnv1a hash;
  std::vector<char> chunk(1 << 20);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    hash.add(chunk.data(), static_cast<std::size_t>(in.gcount()));
  }
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(hash.state));
  return text;
}

// What decides the dictionaries: everything but threads and where files go.
std::string run_key(const Args& args) {
  const auto absolute = [](const std::string& path) { return path.empty() ? path : fs::absolute(path).string(); };
  const lexico::TrainOptions& t = args.train;
  std::ostringstream key;
  key << "model=" << absolute(args.model) << "\ntokens=" << absolute(args.tokens) << "\ntext=" << absolute(args.text)
      << "\ntokenizer=" << absolute(args.tokenizer) << "\ndev=" << absolute(args.dev)
      << "\nmethod=" << lexico::to_string(t.method) << "\natoms=" << t.atoms << "\nsparsity=" << t.sparsity
      << "\nvectors=" << t.vectors << "\ndev_vectors=" << args.dev_vectors << "\ninit=" << lexico::to_string(t.init)
      << "\nbatch=" << t.batch << "\nlr=" << t.learning_rate << "\nwindow=" << args.window << "\nseed=" << t.seed
      << "\nkeys_before_rope=" << args.keys_before_rope << "\n";
  if (args.key_metric) key << "key_metric=queries\nkey_metric_power=" << args.key_metric_power << "\n";
  if (args.value_metric) key << "value_metric=output\nvalue_metric_power=" << args.value_metric_power << "\n";
  if (!args.from.empty()) key << "from=" << absolute(args.from) << "\n";
  return key.str();
}

// Writes the set beside OUT and swaps it in; the collected vectors (when --work is the
// default OUT/vectors) move into the new folder.
void install_set(const Args& args, const std::vector<lexico::LayerDictionaries>& layers,
                 const lexico::DictionarySetManifest& manifest) {
  const std::string out = fs::path(args.out).lexically_normal().string();
  const std::string staged = out + ".new";  // a leftover of an interrupted run is replaced
  fs::remove_all(staged);
  lexico::save_dictionaries(staged, layers, manifest, args.atom_type);
  const bool had_old = lexico::swap_folder_into_place(staged, out);
  if (!had_old) return;
  // `staged` now names the previous set.
  const fs::path old_vectors = fs::path(staged) / "vectors";
  if (fs::path(args.work).lexically_normal() == fs::path(out) / "vectors" && fs::exists(old_vectors))
    fs::rename(old_vectors, fs::path(out) / "vectors");
  fs::remove_all(staged);
}

double cpu_seconds() { return static_cast<double>(std::clock()) / CLOCKS_PER_SEC; }

std::string kv_name(int layer, bool keys) { return "layer" + std::to_string(layer) + (keys ? ".K" : ".V"); }

int run(const Args& args) {
  // Training builds a 64 MiB Gram matrix per step; without this every one is a
  // fresh mmap whose page faults cost several times the product itself.
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#ifdef _OPENMP
  if (args.train.threads > 0) omp_set_num_threads(args.train.threads);
#endif
  const auto begin = Clock::now();
  lexico::restore_moved_aside_folder(fs::path(args.out).lexically_normal().string());
  const Checkpoint checkpoint(fs::path(args.out).lexically_normal().string(), run_key(args));
  const lexico::LlamaModel model = lexico::LlamaModel::load(args.model);
  const lexico::LlamaConfig& config = model.config();
  const int bos = config.bos_id >= 0 ? config.bos_id : 0;
  const std::string corpus = args.tokens.empty() ? args.text : args.tokens;

  // Training windows first; without --dev the held-out windows follow them.
  const auto train_all = lexico::sample_windows(read_corpus(args, corpus, model), args.window, bos, ~std::size_t(0),
                                                args.train.seed);
  const auto train_windows = windows_for(train_all, config.kv_heads, args.train.vectors, 0);
  Eigen::Index train_available = 0;
  for (const auto& w : train_windows) train_available += static_cast<Eigen::Index>(w.size()) * config.kv_heads;
  const std::string train_dir = (fs::path(args.work) / "train").string();
  ensure_collected(model, train_windows, {args.model, corpus, args.window, args.train.seed, 0, args.keys_before_rope},
                   train_dir, "collect train");

  std::vector<std::vector<int>> dev_windows;
  Collection dev_collection{args.model, args.dev.empty() ? corpus : args.dev, args.window, args.train.seed, 0,
                            args.keys_before_rope};
  if (args.dev.empty()) {
    std::size_t first = 0;
    dev_windows = windows_for(train_all, config.kv_heads, args.dev_vectors, train_available, &first);
    lexico::require(!dev_windows.empty(), corpus, ": no windows left for held-out vectors; give --dev");
    dev_collection.seed = args.train.seed + first;  // a different window set than a plain collection
  } else {
    const auto dev_all = lexico::sample_windows(read_corpus(args, args.dev, model), args.window, bos, ~std::size_t(0),
                                                args.train.seed);
    dev_windows = windows_for(dev_all, config.kv_heads, args.dev_vectors, 0);
  }
  const std::string dev_dir = (fs::path(args.work) / "dev").string();
  ensure_collected(model, dev_windows, dev_collection, dev_dir, "collect dev");
  // The key metric, from the queries of the first training windows.
  constexpr std::size_t metric_windows = 64;
  std::vector<std::vector<float>> key_metric;
  if (args.key_metric) {
    const std::vector<std::vector<int>> windows(train_all.begin(),
                                                train_all.begin() + std::min(train_all.size(), metric_windows));
    const lexico::QueryEnergy energy =
        lexico::collect_query_energy(model, windows, window_progress("query metric", windows.size()));
    for (int l = 0; l < config.layers; ++l) key_metric.push_back(energy.scale(l, config.rope, args.key_metric_power));
  }
  std::vector<lexico::ValueMetric> value_metric;  // from the model's output projections
  for (int l = 0; args.value_metric && l < config.layers; ++l)
    value_metric.push_back(lexico::value_metric_of_output(model.weights().layers[static_cast<std::size_t>(l)].wo,
                                                          config.head_dim, args.value_metric_power));
  // --from: the set whose dictionaries are carried into the metric instead of trained.
  std::optional<lexico::DictionarySet> from;
  if (!args.from.empty()) {
    from = lexico::load_dictionaries(args.from);
    const lexico::DictionarySetManifest& m = from->manifest;
    lexico::require(m.key_metric.empty() && m.value_metric.empty(), "--from ", args.from,
                    ": the set is already coded in a metric");
    lexico::require(m.layers == config.layers && m.head_dim == config.head_dim && m.atoms == args.train.atoms,
                    "--from ", args.from, ": ", m.layers, " layers of ", m.atoms, " atoms of dimension ", m.head_dim,
                    ", this run has ", config.layers, " layers, --atoms ", args.train.atoms, ", head_dim ",
                    config.head_dim);
    lexico::require(lexico::manifest_key_rope(m, m.head_dim).has_value() == args.keys_before_rope, "--from ",
                    args.from, ": its keys are ", lexico::manifest_key_rope(m, m.head_dim) ? "before" : "after",
                    " RoPE, this run's ", args.keys_before_rope ? "before" : "after");
  }
  const double collect_seconds = std::chrono::duration<double>(Clock::now() - begin).count();
  const double collect_cpu = cpu_seconds();

  lexico::TrainOptions options = args.train;
  const Eigen::Index batch = options.batch > 0 ? options.batch : lexico::default_batch(options.method);
  const int dictionaries = 2 * config.layers;
  const std::vector<int> eval_sparsities = {4, 8, 16};
  std::vector<lexico::LayerDictionaries> layers(static_cast<std::size_t>(config.layers));
  lexico::DictionarySetManifest manifest;
  manifest.model = args.model;
  manifest.method = lexico::to_string(options.method);
  manifest.layers = config.layers;
  manifest.head_dim = config.head_dim;
  manifest.atoms = options.atoms;
  manifest.sparsity = options.sparsity;
  auto& settings = manifest.settings;

  cli::ProgressBar bar;
  const auto train_begin = Clock::now();
  double eta_per_vector = 0;  // seconds, measured on the dictionaries done so far
  int resumed = 0;
  for (int index = 0; index < dictionaries; ++index) {
    const int layer = index / 2;
    const bool keys = index % 2 == 0;
    const std::string name = kv_name(layer, keys);
    auto& slot = keys ? layers[static_cast<std::size_t>(layer)].keys : layers[static_cast<std::size_t>(layer)].values;
    if (auto done = checkpoint.finished(name)) {  // kept by an interrupted run with the same arguments
      slot = done->dictionary;
      settings.insert(done->settings.begin(), done->settings.end());
      manifest.errors.insert(manifest.errors.end(), done->errors.begin(), done->errors.end());
      ++resumed;
      continue;
    }
    if (resumed > 0 && index == resumed)
      std::fprintf(stderr, "lexico-train: continuing after %d of %d dictionaries finished by an earlier run (%s)\n",
                   resumed, dictionaries, checkpoint.dir().c_str());
    lexico::FileVectorSource file_source(lexico::kv_vector_path(train_dir, layer, keys), Eigen::Index(1) << 18,
                                         options.seed + static_cast<std::uint64_t>(index), options.vectors);
    // Vectors in the space of their metric, where there is one.
    std::optional<Eigen::MatrixXf> map;
    if (keys && args.key_metric) map = lexico::key_map(key_metric[static_cast<std::size_t>(layer)]);
    if (!keys && args.value_metric) map = value_metric[static_cast<std::size_t>(layer)].map();
    std::optional<lexico::MappedSource> mapped_source;
    if (map) mapped_source.emplace(file_source, *map);
    lexico::VectorSource& source = map ? static_cast<lexico::VectorSource&>(*mapped_source) : file_source;
    const Eigen::Index per_dictionary = options.vectors;
    const double done_before = static_cast<double>(index - resumed) * static_cast<double>(per_dictionary);
    const double total = static_cast<double>(dictionaries - resumed) * static_cast<double>(per_dictionary);
    const auto dict_begin = Clock::now();
    lexico::TrainResult result;
    if (from) {
      const lexico::LayerDictionaries& given = from->layers[static_cast<std::size_t>(layer)];
      const lexico::Dictionary& plain = keys ? *given.keys : *given.values;
      result.dictionary = map ? lexico::mapped(plain, *map) : plain;
    } else {
      result = lexico::train_dictionary(
          source, options,
          [&](const lexico::TrainProgress& p) {
            const double done = done_before + static_cast<double>(p.vectors);
            const double rate = eta_per_vector > 0 ? eta_per_vector : p.seconds / static_cast<double>(p.vectors);
            char tail[96];
            std::snprintf(tail, sizeof tail, "%s err %.4f replaced %ld", name.c_str(), p.batch_error,
                          static_cast<long>(p.replaced));
            bar.show("train", done / total, rate * (total - done), tail);
          },
          {{"model", args.model}, {"layer", std::to_string(layer)}, {"kind", keys ? "K" : "V"},
           {"method", manifest.method}, {"atoms", std::to_string(options.atoms)},
           {"sparsity", std::to_string(options.sparsity)}});
    }
    eta_per_vector = std::chrono::duration<double>(Clock::now() - train_begin).count() / (done_before + static_cast<double>(per_dictionary));
    const double dict_seconds = std::chrono::duration<double>(Clock::now() - dict_begin).count();

    Checkpoint::Finished done;
    done.dictionary = std::make_shared<const lexico::Dictionary>(std::move(result.dictionary));
    const lexico::Dictionary& dictionary = *done.dictionary;
    done.settings[name + ".seconds"] = std::to_string(dict_seconds);
    done.settings[name + ".replaced"] = std::to_string(result.replaced);
    if (result.random_atoms > 0) done.settings[name + ".random_initial_atoms"] = std::to_string(result.random_atoms);
    done.settings[name + ".max_coherence"] = std::to_string(dictionary.max_coherence());
    done.settings[name + ".last_batch_error"] = std::to_string(result.last_error);

    lexico::VectorFile train_file(lexico::kv_vector_path(train_dir, layer, keys));
    lexico::VectorFile dev_file(lexico::kv_vector_path(dev_dir, layer, keys));
    Eigen::MatrixXf train_sample = train_file.read_head(args.dev_vectors);
    Eigen::MatrixXf dev_sample = dev_file.read_head(args.dev_vectors);
    if (map) {  // errors in the metric the vectors are coded in
      train_sample = *map * train_sample;
      dev_sample = *map * dev_sample;
    }
    for (const int s : eval_sparsities) {
      if (s > std::min(config.head_dim, options.atoms)) continue;
      done.errors.push_back({layer, keys ? 'K' : 'V', s,
                             lexico::relative_coding_error(dictionary, train_sample, s, true, options.threads),
                             lexico::relative_coding_error(dictionary, dev_sample, s, true, options.threads)});
    }
    checkpoint.keep(name, done);
    slot = done.dictionary;
    settings.insert(done.settings.begin(), done.settings.end());
    manifest.errors.insert(manifest.errors.end(), done.errors.begin(), done.errors.end());
  }
  const double train_seconds = std::chrono::duration<double>(Clock::now() - train_begin).count();
  const double train_cpu = cpu_seconds() - collect_cpu;

  settings["corpus"] = corpus;
  settings["corpus_fnv1a64"] = file_hash(corpus);
  settings["dev"] = args.dev.empty() ? "held-out windows of " + corpus : args.dev;
  if (!args.dev.empty()) settings["dev_fnv1a64"] = file_hash(args.dev);
  settings["lexico_version"] = lexico::version_string;
  settings["atom_type"] = lexico::to_string(args.atom_type);
  settings["vectors"] = std::to_string(options.vectors);
  settings["train_vectors_available"] = std::to_string(std::min(train_available, options.vectors));
  settings["dev_vectors"] = std::to_string(args.dev_vectors);
  settings["window"] = std::to_string(args.window);
  settings["keys"] = args.keys_before_rope ? "before_rope" : "after_rope";
  if (args.key_metric) {
    manifest.key_metric = key_metric;
    settings["key_metric"] = "queries";
    settings["key_metric_power"] = std::to_string(args.key_metric_power);
    settings["key_metric_windows"] = std::to_string(std::min(train_all.size(), metric_windows));
    settings["rope_style"] = lexico::to_string(config.rope);  // which dimensions the metric pairs
  }
  if (args.value_metric) {
    for (int l = 0; l < config.layers; ++l) {
      manifest.value_metric.push_back(value_metric[static_cast<std::size_t>(l)].scale);
      layers[static_cast<std::size_t>(l)].value_axes =
          std::make_shared<const lexico::Dictionary>(value_metric[static_cast<std::size_t>(l)].axes);
    }
    settings["value_metric"] = "output";
    settings["value_metric_power"] = std::to_string(args.value_metric_power);
  }
  if (from) settings["metric_from"] = args.from;
  if (args.keys_before_rope) {  // what the cache needs to undo and redo the rotation
    std::ostringstream theta;
    theta.precision(9);
    theta << config.rope_theta;
    settings["rope_theta"] = theta.str();
    settings["rope_style"] = lexico::to_string(config.rope);
  }
  settings["init"] = lexico::to_string(options.init);
  settings["batch"] = std::to_string(batch);
  if (options.method == lexico::TrainMethod::lexico)
    settings["learning_rate"] = std::to_string(options.learning_rate > 0 ? options.learning_rate
                                                                          : lexico::default_learning_rate());
  settings["seed"] = std::to_string(options.seed);
  settings["threads"] = std::to_string(options.threads > 0 ? options.threads : Eigen::nbThreads());
  settings["collect_seconds"] = std::to_string(collect_seconds);
  settings["train_seconds"] = std::to_string(train_seconds);
  // CPU time of all threads: on a shared machine, what the run would take alone.
  settings["collect_cpu_seconds"] = std::to_string(collect_cpu);
  settings["train_cpu_seconds"] = std::to_string(train_cpu);
  if (resumed > 0) settings["resumed_dictionaries"] = std::to_string(resumed);
  install_set(args, layers, manifest);
  checkpoint.remove();

  std::printf("%s, %s, N=%d, trained at s=%d on %ld vectors per dictionary; collection %s, training %s\n",
              args.model.c_str(), manifest.method.c_str(), options.atoms, options.sparsity,
              static_cast<long>(options.vectors), cli::format_duration(collect_seconds).c_str(),
              cli::format_duration(train_seconds).c_str());
  std::printf("relative error ||x - x^|| / ||x|| (mean), FP8 coefficients: train | dev\n");
  std::printf("%-6s %-4s", "layer", "K/V");
  for (const int s : eval_sparsities) std::printf("   s=%-2d train    dev", s);
  std::printf("  max|cos|\n");
  for (int layer = 0; layer < config.layers; ++layer)
    for (const char kind : {'K', 'V'}) {
      std::printf("%-6d %-4c", layer, kind);
      for (const auto& e : manifest.errors)
        if (e.layer == layer && e.kind == kind) std::printf("        %.4f %.4f", e.train, e.dev);
      std::printf("  %s\n", settings[kv_name(layer, kind == 'K') + ".max_coherence"].c_str());
    }
  std::printf("wrote %s\n", args.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const cli::usage_error& e) {
    std::fprintf(stderr, "lexico-train: %s\n", e.what());
    return 2;
  }
  try {
    return run(args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nlexico-train: error: %s\n", e.what());
    return 1;
  }
}
