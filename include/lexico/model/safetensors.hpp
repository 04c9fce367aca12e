#pragma once
// safetensors reading and writing: single files and sharded checkpoints
// (model.safetensors.index.json). Layout: 8-byte little-endian header length H, H bytes
// of JSON {name: {dtype, shape, data_offsets [begin, end)}, "__metadata__": {...}},
// then the data area; offsets count from its first byte.
//
// Bytes come from a ByteSource (a file, or memory for fuzzing and tests) and a
// checkpoint's files from a Folder; the path constructors are thin wrappers. The whole
// header is validated when a file is opened (every shape against the bytes the file
// holds), so a corrupt file fails up front with its name and the tensor at fault, and no
// read allocates more than the file backs.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../base/checked.hpp"
#include "../base/error.hpp"
#include "../base/files.hpp"
#include "../base/half.hpp"
#include "../base/json.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lexico/io/safetensors.hpp reads little-endian data in place and needs a little-endian host"
#endif

namespace lexico {

enum class SafetensorsDtype { F32, F16, BF16, I32 };

inline const char* dtype_name(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::F32: return "F32";
    case SafetensorsDtype::F16: return "F16";
    case SafetensorsDtype::BF16: return "BF16";
    case SafetensorsDtype::I32: return "I32";
  }
  return "?";
}

inline std::size_t dtype_size(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::F16 || dtype == SafetensorsDtype::BF16 ? 2 : 4;
}

// One tensor of a file's header.
struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range in the data area

  std::int64_t elements() const {
    std::int64_t n = 1;
    for (const std::int64_t d : shape) n = checked_mul(n, d, "safetensors: shape of tensor '" + name + "'");
    return n;
  }
  bool is_float() const { return dtype != SafetensorsDtype::I32; }
};

namespace detail {

// Headers larger than this are corrupt (the reference implementation's bound too).
constexpr std::uint64_t safetensors_max_header = 100u << 20;
// model.safetensors.index.json: about 100 bytes a tensor, so far below this for any model.
constexpr std::uint64_t safetensors_max_index = 16u << 20;

inline SafetensorsTensor parse_tensor_entry(const std::string& path, const std::string& name,
                                            const json::Value& entry, std::uint64_t data_size) {
  const std::string where = detail::concat(path, ": tensor '", name, "'");
  require(entry.is_object(), where, ": header entry must be an object");
  SafetensorsTensor tensor;
  tensor.name = name;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  for (const auto& [key, value] : entry.as_object()) {
    if (key == "dtype") {
      has_dtype = true;
      const std::string& dtype = value.as_string(where + ": dtype");
      if (dtype == "F32") tensor.dtype = SafetensorsDtype::F32;
      else if (dtype == "F16") tensor.dtype = SafetensorsDtype::F16;
      else if (dtype == "BF16") tensor.dtype = SafetensorsDtype::BF16;
      else if (dtype == "I32") tensor.dtype = SafetensorsDtype::I32;
      else throw error(detail::concat(where, ": unsupported dtype '", dtype, "' (supported: F32, F16, BF16, I32)"));
    } else if (key == "shape") {
      has_shape = true;
      std::int64_t elements = 1;
      for (const json::Value& d : value.as_array(where + ": shape")) {
        require(d.is_integer() && d.as_int() >= 0, where, ": shape must hold non-negative integers");
        const std::int64_t dim = d.as_int();
        // Bytes of any dtype must fit int64, whatever the data_offsets say.
        require(dim == 0 || elements <= std::numeric_limits<std::int64_t>::max() / 8 / dim, where,
                ": shape is too large");
        elements *= dim;
        tensor.shape.push_back(dim);
      }
    } else if (key == "data_offsets") {
      has_offsets = true;
      const auto& offsets = value.as_array(where + ": data_offsets");
      require(offsets.size() == 2 && offsets[0].is_integer() && offsets[1].is_integer() && offsets[0].as_int() >= 0 &&
                  offsets[1].as_int() >= 0,
              where, ": data_offsets must be two non-negative integers [begin, end)");
      tensor.begin = static_cast<std::uint64_t>(offsets[0].as_int());
      tensor.end = static_cast<std::uint64_t>(offsets[1].as_int());
    } else {
      throw error(detail::concat(where, ": unexpected header key '", key, "'"));
    }
  }
  require(has_dtype && has_shape && has_offsets, where, ": header entry needs dtype, shape and data_offsets");
  require(tensor.begin <= tensor.end, where, ": data_offsets [", tensor.begin, ", ", tensor.end,
          ") end before they begin");
  require(tensor.end <= data_size, where, ": data_offsets [", tensor.begin, ", ", tensor.end,
          ") outside the data area of ", data_size, " bytes (file truncated?)");
  const std::uint64_t expected = static_cast<std::uint64_t>(tensor.elements()) * dtype_size(tensor.dtype);
  require(tensor.end - tensor.begin == expected, where, ": ", dtype_name(tensor.dtype), " shape needs ", expected,
          " bytes but data_offsets span ", tensor.end - tensor.begin);
  return tensor;
}

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace detail

// One .safetensors file: the validated header, and tensors read on request.
class SafetensorsFile {
 public:
  // Reads and validates the header of `source`, which the file keeps for later reads.
  explicit SafetensorsFile(std::shared_ptr<const ByteSource> source) : source_(std::move(source)) {
    require(source_ != nullptr, "SafetensorsFile: no source");
    const std::uint64_t size = source_->size();
    require(size >= 8, path(), ": truncated: ", size, " bytes, shorter than the 8-byte header length");
    unsigned char length_bytes[8];
    source_->read(0, length_bytes, 8, "the header length");
    std::uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | length_bytes[i];
    require(header_size <= size - 8, path(), ": header length ", header_size, " runs beyond the end of the file (",
            size, " bytes)");
    require(header_size <= detail::safetensors_max_header, path(), ": header length ", header_size,
            " above the 100 MiB limit");
    std::string header(static_cast<std::size_t>(header_size), '\0');
    source_->read(8, header.data(), header.size(), "the header");
    data_start_ = 8 + header_size;
    data_size_ = size - data_start_;
    parse_header(json::parse(header, path() + " (header)", json::Limits::safetensors_header()));
  }
  // A file on disk.
  explicit SafetensorsFile(std::string path) : SafetensorsFile(std::make_shared<FileBytes>(std::move(path))) {}

  // The source's name: the file's path for a file on disk.
  const std::string& path() const { return source_->name(); }
  // Tensors in header order.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(std::string_view name) const { return index_.count(std::string(name)) != 0; }

  const SafetensorsTensor& tensor(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    require(it != index_.end(), path(), ": no tensor '", name, "'");
    return tensors_[it->second];
  }

  // Reads a floating tensor (F32, F16 or BF16) as fp32 into dst, which holds `count`
  // floats: exactly the tensor's element count.
  void read_f32(std::string_view name, float* dst, std::size_t count) const {
    const SafetensorsTensor& t = tensor(name);
    require(t.is_float(), path(), ": tensor '", name, "' has dtype ", dtype_name(t.dtype), ", expected F32, F16 or BF16");
    require(count == static_cast<std::size_t>(t.elements()), path(), ": tensor '", name, "' holds ", t.elements(),
            " elements, the destination ", count);
    switch (t.dtype) {
      case SafetensorsDtype::F32: read_data(t, 0, dst, count * 4); break;
      case SafetensorsDtype::F16: convert_chunks<Eigen::half>(t, dst, count); break;
      case SafetensorsDtype::BF16: convert_chunks<Eigen::bfloat16>(t, dst, count); break;
      case SafetensorsDtype::I32: break;
    }
  }

  // The header bounds every tensor by the file's size, so these allocations are too.
  std::vector<float> read_f32(std::string_view name) const {
    std::vector<float> out(static_cast<std::size_t>(tensor(name).elements()));
    read_f32(name, out.data(), out.size());
    return out;
  }

  std::vector<std::int32_t> read_i32(std::string_view name) const {
    const SafetensorsTensor& t = tensor(name);
    require(t.dtype == SafetensorsDtype::I32, path(), ": tensor '", name, "' has dtype ", dtype_name(t.dtype),
            ", expected I32");
    std::vector<std::int32_t> out(static_cast<std::size_t>(t.elements()));
    read_data(t, 0, out.data(), out.size() * 4);
    return out;
  }

 private:
  void parse_header(const json::Value& header) {
    require(header.is_object(), path(), ": header must be a JSON object");
    for (const auto& [name, entry] : header.as_object()) {
      if (name == "__metadata__") {
        for (const auto& [key, value] : entry.as_object(path() + ": __metadata__"))
          metadata_[key] = value.as_string(detail::concat(path(), ": __metadata__ value of '", key, "'"));
        continue;
      }
      index_.emplace(name, tensors_.size());
      tensors_.push_back(detail::parse_tensor_entry(path(), name, entry, data_size_));
    }
    // No two tensors may share bytes: sort the non-empty ranges and compare neighbours.
    std::vector<const SafetensorsTensor*> order;
    for (const auto& t : tensors_)
      if (t.end > t.begin) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < order.size(); ++i)
      require(order[i]->begin >= order[i - 1]->end, path(), ": tensor '", order[i]->name, "' [", order[i]->begin,
              ", ", order[i]->end, ") overlaps tensor '", order[i - 1]->name, "' [", order[i - 1]->begin, ", ",
              order[i - 1]->end, ")");
  }

  // `bytes` bytes of tensor t's data from `offset` into it. A file that shrank or failed
  // since its header was read reports the tensor it was reading.
  void read_data(const SafetensorsTensor& t, std::uint64_t offset, void* dst, std::size_t bytes) const {
    try {
      source_->read(data_start_ + t.begin + offset, dst, bytes, "the data of tensor '" + t.name + "'");
    } catch (const error& e) {
      throw error(detail::concat(path(), ": tensor '", t.name, "': file truncated or changed while reading its data (",
                                 e.what(), ")"));
    }
  }

  // 16-bit types convert in chunks so no second copy of a large tensor is held.
  template <typename Half>
  void convert_chunks(const SafetensorsTensor& t, float* dst, std::size_t count) const {
    constexpr std::size_t chunk = std::size_t(1) << 20;
    std::vector<Half> buffer(std::min(count, chunk));
    for (std::size_t done = 0; done < count; done += buffer.size()) {
      const std::size_t n = std::min(buffer.size(), count - done);
      read_data(t, done * sizeof(Half), buffer.data(), n * sizeof(Half));
      to_float(buffer.data(), dst + done, static_cast<int>(n));
    }
  }

  std::shared_ptr<const ByteSource> source_;
  std::uint64_t data_start_ = 0, data_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one .safetensors file, or the shards named by a
// model.safetensors.index.json, all in one Folder. Shard names from the index are
// confined to that folder (no "..", no absolute path). A MemoryFolder must outlive the
// checkpoint (its files are read in place).
class SafetensorsCheckpoint {
 public:
  // The folder's model.safetensors.index.json when it has one, else its model.safetensors.
  explicit SafetensorsCheckpoint(const Folder& folder) { open_folder(folder); }
  // `file` in `folder`: an index (.json) or a single .safetensors file.
  SafetensorsCheckpoint(const Folder& folder, std::string_view file) {
    if (detail::ends_with(file, ".json")) open_index(folder, file);
    else open_single(folder.open(file));
  }
  // A folder on disk (as above), an index file (its shards beside it) or one .safetensors file.
  explicit SafetensorsCheckpoint(const std::string& path) {
    if (detail::ends_with(path, ".safetensors")) {
      open_single(std::make_shared<FileBytes>(path));
    } else if (detail::ends_with(path, ".json")) {
      const std::filesystem::path p(path);
      const std::string parent = p.parent_path().string();
      open_index(DiskFolder(parent.empty() ? "." : parent), p.filename().string());
    } else {
      std::error_code ec;
      require(std::filesystem::is_directory(path, ec), path,
              ": neither model.safetensors.index.json nor model.safetensors found (not a folder)");
      open_folder(DiskFolder(path));
    }
  }

  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const { return owner_.count(std::string(name)) != 0; }
  const SafetensorsFile& file_of(std::string_view name) const {
    const auto it = owner_.find(std::string(name));
    require(it != owner_.end(), source_, ": no tensor '", name, "'");
    return *it->second;
  }
  const SafetensorsTensor& tensor(std::string_view name) const { return file_of(name).tensor(name); }
  void read_f32(std::string_view name, float* dst, std::size_t count) const { file_of(name).read_f32(name, dst, count); }
  std::vector<float> read_f32(std::string_view name) const { return file_of(name).read_f32(name); }
  std::vector<std::int32_t> read_i32(std::string_view name) const { return file_of(name).read_i32(name); }

 private:
  void open_folder(const Folder& folder) {
    if (folder.contains("model.safetensors.index.json")) open_index(folder, "model.safetensors.index.json");
    else if (folder.contains("model.safetensors")) open_single(folder.open("model.safetensors"));
    else throw error(detail::concat(folder.name(), ": neither model.safetensors.index.json nor model.safetensors found"));
  }

  void open_single(std::shared_ptr<const ByteSource> source) {
    files_.push_back(std::make_unique<SafetensorsFile>(std::move(source)));
    source_ = files_.front()->path();
    for (const auto& t : files_.front()->tensors()) {
      owner_.emplace(t.name, files_.front().get());
      names_.push_back(t.name);
    }
  }

  void open_index(const Folder& folder, std::string_view index_file) {
    const std::unique_ptr<ByteSource> bytes = folder.open(index_file);
    source_ = bytes->name();
    const json::Value index = json::parse(*bytes, json::Limits{detail::safetensors_max_index, 1u << 20});
    std::map<std::string, SafetensorsFile*> shards;
    for (const auto& [name, shard] : index.at("weight_map", source_).as_object(source_ + ": weight_map")) {
      const std::string what = detail::concat(source_, ": weight_map entry '", name, "'");
      const std::string& file = shard.as_string(what);
      Folder::check_name(file, what);
      auto it = shards.find(file);
      if (it == shards.end()) {
        files_.push_back(std::make_unique<SafetensorsFile>(folder.open(file)));
        it = shards.emplace(file, files_.back().get()).first;
      }
      require(it->second->contains(name), source_, ": tensor '", name, "' is mapped to ", file,
              ", which does not hold it");
      owner_.emplace(name, it->second);
      names_.push_back(name);
    }
  }

  std::string source_;  // names the checkpoint in errors: the index or the single file
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, const SafetensorsFile*> owner_;
  std::vector<std::string> names_;
};

// Collects F32 and I32 tensors and metadata, then writes one .safetensors file.
class SafetensorsWriter {
 public:
  void add_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  void add(const std::string& name, const std::vector<std::int64_t>& shape, const float* data) {
    add_raw(name, shape, SafetensorsDtype::F32, data);
  }
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const std::int32_t* data) {
    add_raw(name, shape, SafetensorsDtype::I32, data);
  }

  // The whole file: header length, header, data.
  std::string bytes() const {
    std::string header = "{";
    if (!metadata_.empty()) {
      header += "\"__metadata__\":{";
      bool first = true;
      for (const auto& [key, value] : metadata_) {
        header += detail::concat(first ? "" : ",", json::quote(key), ":", json::quote(value));
        first = false;
      }
      header += "}";
    }
    for (const auto& t : tensors_) {
      if (header.size() > 1) header += ",";
      header += json::quote(t.name) + ":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
      for (std::size_t i = 0; i < t.shape.size(); ++i) header += (i ? "," : "") + std::to_string(t.shape[i]);
      header += detail::concat("],\"data_offsets\":[", t.begin, ",", t.end, "]}");
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');  // keeps the data area 8-byte aligned
    std::string out(8, '\0');
    for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<char>(static_cast<std::uint64_t>(header.size()) >> (8 * i));
    out += header;
    out.append(data_.data(), data_.size());
    return out;
  }

  // Written to a temporary file renamed into place: an interrupted write leaves no half file.
  void write(const std::string& path) const { write_file_atomically(path, bytes()); }

 private:
  void add_raw(const std::string& name, const std::vector<std::int64_t>& shape, SafetensorsDtype dtype,
               const void* data) {
    require(name != "__metadata__", "SafetensorsWriter: '__metadata__' is reserved and cannot name a tensor");
    for (const auto& t : tensors_) require(t.name != name, "SafetensorsWriter: tensor '", name, "' added twice");
    SafetensorsTensor t;
    t.name = name;
    t.dtype = dtype;
    t.shape = shape;
    for (const std::int64_t d : shape) require(d >= 0, "SafetensorsWriter: tensor '", name, "' has a negative dimension");
    const std::size_t bytes = static_cast<std::size_t>(
        checked_mul(t.elements(), static_cast<std::int64_t>(dtype_size(dtype)), "SafetensorsWriter: tensor '" + name + "'"));
    t.begin = data_.size();
    t.end = t.begin + bytes;
    data_.resize(data_.size() + bytes);
    if (bytes > 0) std::memcpy(data_.data() + t.begin, data, bytes);
    tensors_.push_back(std::move(t));
  }

  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsTensor> tensors_;
  std::vector<char> data_;
};

}  // namespace lexico
