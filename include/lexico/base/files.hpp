#pragma once
// Where outside bytes come from and how outputs reach the disk.
//
// ByteSource: bytes read by offset, from a file or from memory. Every reader of an outside
// format takes one (the path readers are thin wrappers), so the same parser runs on files
// and, without a temporary file, on a fuzzer's input. Folder: named files, on disk or in
// memory, with names from checkpoints and manifests confined to the folder. AtomicFile:
// outputs written to a temporary file beside the target, flushed and renamed into place,
// so an interrupted writer leaves the previous file or the complete new one.
//
// Concurrency: a ByteSource or Folder may be read from several threads (FileBytes holds
// one stream behind a mutex); an AtomicFile belongs to one writer.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc 2.28)
#include <unistd.h>

#include "error.hpp"

namespace lexico {

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Names the source at the start of every error ("dicts/x/manifest.json").
  virtual const std::string& name() const = 0;
  virtual std::uint64_t size() const = 0;
  // Exactly `bytes` bytes at `offset` into dst; throws naming the source and `what`
  // ("the header length") when the source ends before them.
  void read(std::uint64_t offset, void* dst, std::size_t bytes, std::string_view what) const {
    require(offset <= size() && bytes <= size() - offset, name(), ": truncated: ", what, " needs ", bytes,
            " bytes at offset ", offset, " but the source has ", size());
    if (bytes > 0) read_in_range(offset, dst, bytes);
  }
  // The whole source as a string; refused, before anything is allocated, above max_bytes.
  std::string read_all(std::uint64_t max_bytes) const {
    require(size() <= max_bytes, name(), ": ", size(), " bytes, above the limit of ", max_bytes,
            " for this kind of file");
    std::string text(static_cast<std::size_t>(size()), '\0');
    read(0, text.data(), text.size(), "the file");
    return text;
  }

 protected:
  virtual void read_in_range(std::uint64_t offset, void* dst, std::size_t bytes) const = 0;
};

// Bytes in memory, not owned: they must outlive the source.
class MemoryBytes final : public ByteSource {
 public:
  explicit MemoryBytes(std::string_view bytes, std::string name = "<memory>")
      : bytes_(bytes), name_(std::move(name)) {}
  const std::string& name() const override { return name_; }
  std::uint64_t size() const override { return bytes_.size(); }
  std::string_view bytes() const { return bytes_; }

 private:
  void read_in_range(std::uint64_t offset, void* dst, std::size_t bytes) const override {
    std::memcpy(dst, bytes_.data() + offset, bytes);
  }
  std::string_view bytes_;
  std::string name_;
};

// A regular file (a folder or a device is refused when opened, never read as bytes).
class FileBytes final : public ByteSource {
 public:
  explicit FileBytes(std::string path) : path_(std::move(path)) {
    std::error_code ec;
    const auto status = std::filesystem::status(path_, ec);
    require(!ec && std::filesystem::exists(status), path_, ": cannot open file (does not exist)");
    require(std::filesystem::is_regular_file(status), path_, ": not a regular file");
    in_.open(path_, std::ios::binary);
    require(in_.good(), path_, ": cannot open file");
    in_.seekg(0, std::ios::end);
    const std::streamoff end = in_.tellg();
    require(in_.good() && end >= 0, path_, ": cannot determine the file size");
    size_ = static_cast<std::uint64_t>(end);
  }
  const std::string& name() const override { return path_; }
  std::uint64_t size() const override { return size_; }

 private:
  void read_in_range(std::uint64_t offset, void* dst, std::size_t bytes) const override {
    std::lock_guard<std::mutex> lock(mutex_);
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(bytes));
    require(in_.good() && static_cast<std::size_t>(in_.gcount()) == bytes, path_, ": read error at offset ", offset,
            " (the file changed while it was read?)");
  }
  std::string path_;
  std::uint64_t size_ = 0;
  mutable std::ifstream in_;
  mutable std::mutex mutex_;
};

// Reads a whole file of at most max_bytes (config.json, manifest.json, tokenizer.json).
inline std::string read_file(const std::string& path, std::uint64_t max_bytes) {
  return FileBytes(path).read_all(max_bytes);
}

// Named files that belong together: a checkpoint's config and shards, a dictionary set.
class Folder {
 public:
  virtual ~Folder() = default;
  virtual const std::string& name() const = 0;
  // `file` is a name relative to the folder; names that could leave it are refused.
  virtual bool contains(std::string_view file) const = 0;
  virtual std::unique_ptr<ByteSource> open(std::string_view file) const = 0;
  std::string read_text(std::string_view file, std::uint64_t max_bytes) const { return open(file)->read_all(max_bytes); }

  // Throws unless `file` is a relative name inside the folder: not empty, not absolute, no
  // ".." or "." component, no backslash or NUL. `what` names who asked ("manifest.json: layers[3].keys").
  static void check_name(std::string_view file, std::string_view what) {
    require(!file.empty(), what, ": empty file name");
    require(file.front() != '/', what, ": file name '", file, "' is absolute; only names inside the folder are read");
    require(file.find('\\') == std::string_view::npos && file.find('\0') == std::string_view::npos, what,
            ": file name '", file, "' holds a backslash or NUL");
    std::size_t start = 0;
    while (start <= file.size()) {
      const std::size_t end = std::min(file.find('/', start), file.size());
      const std::string_view part = file.substr(start, end - start);
      require(!part.empty() && part != "." && part != "..", what, ": file name '", file,
              "' leaves its folder or has an empty, '.' or '..' component");
      start = end + 1;
    }
  }
};

class DiskFolder final : public Folder {
 public:
  explicit DiskFolder(std::string path) : path_(std::move(path)) {
    std::error_code ec;
    require(std::filesystem::is_directory(path_, ec), path_, ": not a folder");
  }
  const std::string& name() const override { return path_; }
  bool contains(std::string_view file) const override {
    check_name(file, path_);
    std::error_code ec;
    return std::filesystem::is_regular_file(path_of(file), ec);
  }
  std::unique_ptr<ByteSource> open(std::string_view file) const override {
    check_name(file, path_);
    return std::make_unique<FileBytes>(path_of(file));
  }
  std::string path_of(std::string_view file) const { return (std::filesystem::path(path_) / std::string(file)).string(); }

 private:
  std::string path_;
};

// Files in memory (fuzzing, tests, files embedded in a program); owns their bytes.
class MemoryFolder final : public Folder {
 public:
  explicit MemoryFolder(std::string name = "<memory>") : name_(std::move(name)) {}
  MemoryFolder& add(std::string file, std::string bytes) {
    files_[std::move(file)] = std::move(bytes);
    return *this;
  }
  const std::string& name() const override { return name_; }
  bool contains(std::string_view file) const override {
    check_name(file, name_);
    return files_.count(std::string(file)) != 0;
  }
  std::unique_ptr<ByteSource> open(std::string_view file) const override {
    check_name(file, name_);
    const auto it = files_.find(std::string(file));
    require(it != files_.end(), name_, "/", file, ": cannot open file (does not exist)");
    return std::make_unique<MemoryBytes>(it->second, name_ + "/" + it->first);
  }

 private:
  std::string name_;
  std::map<std::string, std::string> files_;
};

// A file written so that, whatever interrupts the writer, the target holds its previous
// content or the complete new one: bytes go to a temporary file in the same folder, which
// commit() flushes to disk and renames over the target. Without commit() (an exception,
// an early return) the destructor removes the temporary file and the target is untouched.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    static std::atomic<unsigned> counter{0};
    temp_ = detail::concat(path_, ".tmp-", ::getpid(), "-", counter++);
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    require(fd_ >= 0, path_, ": cannot create the temporary file '", temp_, "': ", std::strerror(errno));
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(temp_.c_str());
  }

  const std::string& path() const { return path_; }

  void write(const void* data, std::size_t bytes) {
    require(fd_ >= 0, path_, ": write after commit");
    const char* p = static_cast<const char*>(data);
    while (bytes > 0) {
      const ssize_t n = ::write(fd_, p, bytes);
      if (n < 0 && errno == EINTR) continue;
      require(n > 0, path_, ": write error: ", std::strerror(errno));
      p += n;
      bytes -= static_cast<std::size_t>(n);
    }
  }
  void write(std::string_view text) { write(text.data(), text.size()); }
  // Overwrites bytes already written (a header whose counts are known at the end).
  void write_at(std::uint64_t offset, const void* data, std::size_t bytes) {
    require(fd_ >= 0, path_, ": write after commit");
    const ssize_t n = ::pwrite(fd_, data, bytes, static_cast<off_t>(offset));
    require(n == static_cast<ssize_t>(bytes), path_, ": write error at offset ", offset, ": ", std::strerror(errno));
  }

  void commit() {
    require(fd_ >= 0, path_, ": committed twice");
    require(::fsync(fd_) == 0, path_, ": cannot flush to disk: ", std::strerror(errno));
    const int closed = ::close(fd_);
    fd_ = -1;
    require(closed == 0, path_, ": close failed: ", std::strerror(errno));
    require(::rename(temp_.c_str(), path_.c_str()) == 0, path_, ": cannot rename '", temp_, "' into place: ",
            std::strerror(errno));
    committed_ = true;
    // The rename itself reaches the disk once the folder is flushed.
    const std::string folder = std::filesystem::path(path_).parent_path().string();
    const int dir = ::open(folder.empty() ? "." : folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0) {
      ::fsync(dir);
      ::close(dir);
    }
  }

 private:
  std::string path_, temp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Puts folder `from` where folder `to` is in one step: when `to` exists the two are
// swapped (Linux renameat2 RENAME_EXCHANGE) and `from` then names the old folder, which
// the caller removes; otherwise `from` is renamed to `to`. Returns whether `to` existed.
// Where the file system cannot swap, `to` is moved aside to `to`.old first: an
// interruption between the two renames leaves the old folder there, where
// restore_moved_aside_folder() finds it.
inline bool swap_folder_into_place(const std::string& from, const std::string& to) {
  std::error_code ec;
  if (!std::filesystem::exists(to, ec)) {
    require(::rename(from.c_str(), to.c_str()) == 0, to, ": cannot rename '", from, "' into place: ", std::strerror(errno));
    return false;
  }
#if defined(__linux__) && defined(RENAME_EXCHANGE)
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) return true;
  require(errno == EINVAL || errno == ENOSYS, to, ": cannot swap in '", from, "': ", std::strerror(errno));
#endif
  const std::string aside = to + ".old";
  std::filesystem::remove_all(aside, ec);
  require(::rename(to.c_str(), aside.c_str()) == 0, to, ": cannot move the old folder aside: ", std::strerror(errno));
  require(::rename(from.c_str(), to.c_str()) == 0, to, ": cannot rename '", from, "' into place: ", std::strerror(errno));
  require(::rename(aside.c_str(), from.c_str()) == 0, to, ": cannot move the old folder to '", from, "': ",
          std::strerror(errno));
  return true;
}

// After an interruption inside swap_folder_into_place's fallback: `to` missing and
// `to`.old present means the old folder was moved aside; it goes back.
inline void restore_moved_aside_folder(const std::string& to) {
  std::error_code ec;
  const std::string aside = to + ".old";
  if (!std::filesystem::exists(to, ec) && std::filesystem::is_directory(aside, ec))
    require(::rename(aside.c_str(), to.c_str()) == 0, to, ": cannot restore '", aside, "': ", std::strerror(errno));
}

inline void write_file_atomically(const std::string& path, std::string_view bytes) {
  AtomicFile file(path);
  file.write(bytes);
  file.commit();
}

}  // namespace lexico
