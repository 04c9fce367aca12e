#pragma once
// safetensors reading and writing: single files and sharded checkpoints
// (model.safetensors.index.json). Layout: 8-byte little-endian header length H, H bytes
// of JSON {name: {dtype, shape, data_offsets [begin, end)}, "__metadata__": {...}},
// then the data area; offsets count from its first byte.
//
// Reading is streamed (std::ifstream): portable, and a checkpoint is read once into
// fp32 matrices anyway. The whole header is validated when a file is opened, so a
// corrupt file fails up front with its name and the tensor at fault, never later.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../base/error.hpp"
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
    for (const std::int64_t d : shape) n *= d;
    return n;
  }
  bool is_float() const { return dtype != SafetensorsDtype::I32; }
};

namespace detail {

// Headers larger than this are corrupt (the reference implementation's bound too).
constexpr std::uint64_t safetensors_max_header = 100u << 20;

inline std::uint64_t file_size(std::ifstream& in, const std::string& path) {
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  require(in.good() && size >= 0, path, ": cannot determine the file size");
  return static_cast<std::uint64_t>(size);
}

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

}  // namespace detail

// One .safetensors file: the validated header, and tensors read on request.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::string path) : path_(std::move(path)) {
    std::ifstream in(path_, std::ios::binary);
    require(static_cast<bool>(in), path_, ": cannot open file");
    const std::uint64_t size = detail::file_size(in, path_);
    require(size >= 8, path_, ": truncated: ", size, " bytes, shorter than the 8-byte header length");
    in.seekg(0);
    unsigned char length_bytes[8];
    in.read(reinterpret_cast<char*>(length_bytes), 8);
    std::uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | length_bytes[i];
    require(header_size <= size - 8, path_, ": header length ", header_size, " runs beyond the end of the file (",
            size, " bytes)");
    require(header_size <= detail::safetensors_max_header, path_, ": header length ", header_size,
            " above the 100 MiB limit");
    std::string header(static_cast<std::size_t>(header_size), '\0');
    in.read(header.data(), static_cast<std::streamsize>(header_size));
    require(in.good(), path_, ": read error in the header");
    data_start_ = 8 + header_size;
    data_size_ = size - data_start_;
    parse_header(json::parse(header, path_ + " (header)"));
  }

  const std::string& path() const { return path_; }
  // Tensors in header order.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(std::string_view name) const { return index_.count(std::string(name)) != 0; }

  const SafetensorsTensor& tensor(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    require(it != index_.end(), path_, ": no tensor '", name, "'");
    return tensors_[it->second];
  }

  // Reads a floating tensor (F32, F16 or BF16) as fp32 into dst, which holds `count`
  // floats: exactly the tensor's element count.
  void read_f32(std::string_view name, float* dst, std::size_t count) const {
    const SafetensorsTensor& t = tensor(name);
    require(t.is_float(), path_, ": tensor '", name, "' has dtype ", dtype_name(t.dtype), ", expected F32, F16 or BF16");
    require(count == static_cast<std::size_t>(t.elements()), path_, ": tensor '", name, "' holds ", t.elements(),
            " elements, the destination ", count);
    std::ifstream in = open_at(t);
    // 16-bit types convert in chunks so no second copy of a large tensor is held.
    constexpr std::size_t chunk = std::size_t(1) << 20;
    switch (t.dtype) {
      case SafetensorsDtype::F32: read_bytes(in, t, dst, count * 4); break;
      case SafetensorsDtype::F16: convert_chunks<Eigen::half>(in, t, dst, count, chunk); break;
      case SafetensorsDtype::BF16: convert_chunks<Eigen::bfloat16>(in, t, dst, count, chunk); break;
      case SafetensorsDtype::I32: break;
    }
  }

  std::vector<float> read_f32(std::string_view name) const {
    std::vector<float> out(static_cast<std::size_t>(tensor(name).elements()));
    read_f32(name, out.data(), out.size());
    return out;
  }

  std::vector<std::int32_t> read_i32(std::string_view name) const {
    const SafetensorsTensor& t = tensor(name);
    require(t.dtype == SafetensorsDtype::I32, path_, ": tensor '", name, "' has dtype ", dtype_name(t.dtype),
            ", expected I32");
    std::vector<std::int32_t> out(static_cast<std::size_t>(t.elements()));
    std::ifstream in = open_at(t);
    read_bytes(in, t, out.data(), out.size() * 4);
    return out;
  }

 private:
  void parse_header(const json::Value& header) {
    require(header.is_object(), path_, ": header must be a JSON object");
    for (const auto& [name, entry] : header.as_object()) {
      if (name == "__metadata__") {
        for (const auto& [key, value] : entry.as_object(path_ + ": __metadata__"))
          metadata_[key] = value.as_string(detail::concat(path_, ": __metadata__ value of '", key, "'"));
        continue;
      }
      index_.emplace(name, tensors_.size());
      tensors_.push_back(detail::parse_tensor_entry(path_, name, entry, data_size_));
    }
    // No two tensors may share bytes: sort the non-empty ranges and compare neighbours.
    std::vector<const SafetensorsTensor*> order;
    for (const auto& t : tensors_)
      if (t.end > t.begin) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < order.size(); ++i)
      require(order[i]->begin >= order[i - 1]->end, path_, ": tensor '", order[i]->name, "' [", order[i]->begin,
              ", ", order[i]->end, ") overlaps tensor '", order[i - 1]->name, "' [", order[i - 1]->begin, ", ",
              order[i - 1]->end, ")");
  }

  std::ifstream open_at(const SafetensorsTensor& t) const {
    std::ifstream in(path_, std::ios::binary);
    require(static_cast<bool>(in), path_, ": cannot open file to read tensor '", t.name, "'");
    in.seekg(static_cast<std::streamoff>(data_start_ + t.begin));
    return in;
  }

  void read_bytes(std::ifstream& in, const SafetensorsTensor& t, void* dst, std::size_t bytes) const {
    in.read(static_cast<char*>(dst), static_cast<std::streamsize>(bytes));
    require(in.good() && static_cast<std::size_t>(in.gcount()) == bytes, path_, ": tensor '", t.name,
            "': file truncated while reading its data");
  }

  template <typename Half>
  void convert_chunks(std::ifstream& in, const SafetensorsTensor& t, float* dst, std::size_t count,
                      std::size_t chunk) const {
    std::vector<Half> buffer(std::min(count, chunk));
    for (std::size_t done = 0; done < count; done += buffer.size()) {
      const std::size_t n = std::min(buffer.size(), count - done);
      read_bytes(in, t, buffer.data(), n * sizeof(Half));
      to_float(buffer.data(), dst + done, static_cast<int>(n));
    }
  }

  std::string path_;
  std::uint64_t data_start_ = 0, data_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one .safetensors file, or the shards named by a
// model.safetensors.index.json. A directory stands for the index inside it when there
// is one, else for its model.safetensors.
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& path) {
    const std::string source = resolve(path);
    if (ends_with(source, ".json")) {
      open_index(source);
    } else {
      files_.push_back(std::make_unique<SafetensorsFile>(source));
      for (const auto& t : files_.front()->tensors()) {
        owner_.emplace(t.name, files_.front().get());
        names_.push_back(t.name);
      }
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
  static bool ends_with(const std::string& s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  }

  static bool exists(const std::string& path) { return static_cast<bool>(std::ifstream(path)); }

  std::string resolve(const std::string& path) {
    source_ = path;
    if (ends_with(path, ".json") || ends_with(path, ".safetensors")) return path;
    const std::string dir = ends_with(path, "/") ? path : path + "/";
    if (exists(dir + "model.safetensors.index.json")) source_ = dir + "model.safetensors.index.json";
    else if (exists(dir + "model.safetensors")) source_ = dir + "model.safetensors";
    else throw error(detail::concat(path, ": neither model.safetensors.index.json nor model.safetensors found"));
    return source_;
  }

  void open_index(const std::string& index_path) {
    const json::Value index = json::parse_file(index_path);
    const std::string folder = index_path.substr(0, index_path.find_last_of('/') + 1);
    std::map<std::string, SafetensorsFile*> shards;
    for (const auto& [name, shard] : index.at("weight_map", index_path).as_object(index_path + ": weight_map")) {
      const std::string& file = shard.as_string(detail::concat(index_path, ": weight_map entry '", name, "'"));
      auto it = shards.find(file);
      if (it == shards.end()) {
        files_.push_back(std::make_unique<SafetensorsFile>(folder + file));
        it = shards.emplace(file, files_.back().get()).first;
      }
      require(it->second->contains(name), index_path, ": tensor '", name, "' is mapped to ", file,
              ", which does not hold it");
      owner_.emplace(name, it->second);
      names_.push_back(name);
    }
  }

  std::string source_;
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

  void write(const std::string& path) const {
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
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    require(static_cast<bool>(out), path, ": cannot open for writing");
    unsigned char length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(header.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(length), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(data_.data(), static_cast<std::streamsize>(data_.size()));
    out.close();
    require(out.good(), path, ": write error");
  }

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
    const std::size_t bytes = static_cast<std::size_t>(t.elements()) * dtype_size(dtype);
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
