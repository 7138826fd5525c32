// sid_sample: run a one-step SiD generator exported by `python -m sid_fast.export` (an AOTInductor package) without
// Python, and write PNG images.
//
//   sid_sample --package gen.pt2 --seeds 0-63 --outdir out [--class K] [--batch N] [--raw out.npy]
//
// Latents are drawn per seed exactly as sid_fast's Python sampler (EDM's StackedRandomGenerator) draws them: a
// generator seeded with seed mod 2^32, randn([C, H, W]), then for conditional models randint(label_dim) from the same
// generator. torch::manual_seed seeds a fresh state of the CPU (and CUDA) default generator, so on the device the
// package was compiled for the numbers are the Python sampler's. Images are quantised as EDM does:
// (x * 127.5 + 128).clamp(0, 255) -> uint8, and written as PNG (stored deflate blocks, no zlib dependency) as
// out/<seed:06d>.png. --raw writes the float32 generator output [N, C, H, W] as a .npy file.
//
// Exit status: 0 on success, 1 on a bad package or a runtime failure, 2 on a bad command line.

#include <torch/torch.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------------------------
// PNG (8-bit grey or RGB), zlib stream of stored blocks.

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

void put_be32(std::vector<uint8_t>& v, uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<uint8_t>(x >> s));
}

void put_chunk(std::vector<uint8_t>& png, const char* type, const std::vector<uint8_t>& data) {
  put_be32(png, static_cast<uint32_t>(data.size()));
  std::vector<uint8_t> body(type, type + 4);
  body.insert(body.end(), data.begin(), data.end());
  png.insert(png.end(), body.begin(), body.end());
  put_be32(png, crc32(body.data(), body.size()));
}

// pixels: HWC uint8, channels 1 or 3.
void write_png(const fs::path& path, const uint8_t* pixels, int height, int width, int channels) {
  std::vector<uint8_t> raw;  // one filter byte (0) per row
  raw.reserve(static_cast<size_t>(height) * (width * channels + 1));
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), pixels + static_cast<size_t>(y) * width * channels,
               pixels + static_cast<size_t>(y + 1) * width * channels);
  }
  std::vector<uint8_t> z = {0x78, 0x01};
  uint32_t a = 1, b = 0;  // Adler-32
  for (uint8_t c : raw) {
    a = (a + c) % 65521;
    b = (b + a) % 65521;
  }
  size_t pos = 0;
  do {
    size_t n = std::min<size_t>(65535, raw.size() - pos);
    z.push_back(pos + n == raw.size() ? 1 : 0);
    z.push_back(static_cast<uint8_t>(n & 0xFF));
    z.push_back(static_cast<uint8_t>(n >> 8));
    z.push_back(static_cast<uint8_t>(~n & 0xFF));
    z.push_back(static_cast<uint8_t>((~n >> 8) & 0xFF));
    z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + n);
    pos += n;
  } while (pos < raw.size());
  put_be32(z, (b << 16) | a);

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_be32(ihdr, static_cast<uint32_t>(width));
  put_be32(ihdr, static_cast<uint32_t>(height));
  ihdr.insert(ihdr.end(), {8, static_cast<uint8_t>(channels == 1 ? 0 : 2), 0, 0, 0});
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", z);
  put_chunk(png, "IEND", {});
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
  if (!f) throw std::runtime_error(path.string() + ": cannot write the image");
}

// float32 C-contiguous array as .npy (format 1.0).
void write_npy(const fs::path& path, const at::Tensor& t) {
  at::Tensor c = t.to(torch::kCPU, torch::kFloat32).contiguous();
  std::ostringstream shape;
  shape << "(";
  for (int64_t i = 0; i < c.dim(); ++i) shape << c.size(i) << (c.dim() == 1 || i + 1 < c.dim() ? "," : "");
  shape << ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape.str() + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  f.put(static_cast<char>(len & 0xFF));
  f.put(static_cast<char>(len >> 8));
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(reinterpret_cast<const char*>(c.data_ptr<float>()), static_cast<std::streamsize>(c.numel() * sizeof(float)));
  if (!f) throw std::runtime_error(path.string() + ": cannot write the raw output");
}

// ---------------------------------------------------------------------------------------------------------------
// Command line.

std::vector<int64_t> parse_seeds(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    size_t dash = part.find('-', 1);
    try {
      size_t used = 0;
      if (dash == std::string::npos) {
        int64_t v = std::stoll(part, &used);
        if (used != part.size() || v < 0) throw std::invalid_argument(part);
        out.push_back(v);
      } else {
        std::string lo_s = part.substr(0, dash), hi_s = part.substr(dash + 1);
        size_t u1 = 0, u2 = 0;
        int64_t lo = std::stoll(lo_s, &u1), hi = std::stoll(hi_s, &u2);
        if (u1 != lo_s.size() || u2 != hi_s.size() || lo < 0 || hi < lo) throw std::invalid_argument(part);
        for (int64_t v = lo; v <= hi; ++v) out.push_back(v);
      }
    } catch (const std::exception&) {
      throw UsageError("--seeds " + s + ": expected a list of non-negative integers and ranges like 0-63,100");
    }
  }
  if (out.empty()) throw UsageError("--seeds is empty");
  return out;
}

int64_t parse_int(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    int64_t x = std::stoll(v, &used);
    if (used != v.size()) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    throw UsageError(flag + " " + v + ": expected an integer");
  }
}

struct Options {
  std::string package, outdir, raw, seeds = "0-63";
  int64_t class_idx = -1, batch = -1;  // -1: not given
};

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << "usage: sid_sample --package GEN.pt2 --outdir DIR [--seeds 0-63] [--class K] [--batch N] [--raw OUT.npy]\n";
      std::exit(0);
    }
    if (i + 1 >= argc) throw UsageError(a + " needs a value");
    std::string v = argv[++i];
    if (a == "--package") o.package = v;
    else if (a == "--outdir") o.outdir = v;
    else if (a == "--seeds") o.seeds = v;
    else if (a == "--raw") o.raw = v;
    else if (a == "--class") o.class_idx = parse_int(a, v);
    else if (a == "--batch") o.batch = parse_int(a, v);
    else throw UsageError("unknown option " + a);
  }
  if (o.package.empty()) throw UsageError("--package is required");
  if (o.outdir.empty()) throw UsageError("--outdir is required");
  return o;
}

int64_t meta_int(const std::unordered_map<std::string, std::string>& meta, const std::string& key, const std::string& pkg) {
  auto it = meta.find(key);
  if (it == meta.end())
    throw std::runtime_error(pkg + ": no '" + key + "' in the package metadata; was it written by python -m sid_fast.export?");
  return std::stoll(it->second);
}

int run(const Options& o) {
  if (!fs::is_regular_file(o.package)) throw std::runtime_error(o.package + ": no such package file");
  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(o.package, "model");
  } catch (const std::exception& e) {
    std::string why = e.what();
    why = why.substr(0, why.find('\n'));
    throw std::runtime_error(o.package + ": not an AOTInductor package (" + why + ")");
  }
  if (meta.find("sid_fast_format") == meta.end())
    throw std::runtime_error(o.package + ": an AOTInductor package, but not a generator written by python -m sid_fast.export");
  const int64_t res = meta_int(meta, "img_resolution", o.package), ch = meta_int(meta, "img_channels", o.package);
  const int64_t label_dim = meta_int(meta, "label_dim", o.package), max_batch = meta_int(meta, "max_batch", o.package);
  const bool cuda = meta["device"] == "cuda";
  if (cuda && !torch::cuda::is_available())
    throw std::runtime_error(o.package + ": compiled for CUDA, but no CUDA device is available");
  const int64_t batch = o.batch >= 0 ? o.batch : max_batch;
  if (batch < 1 || batch > max_batch)
    throw UsageError("--batch " + std::to_string(batch) + ": the package accepts batches of 1.." + std::to_string(max_batch));
  if (o.class_idx >= 0 && label_dim == 0) throw UsageError("--class: the generator is unconditional");
  if (o.class_idx >= label_dim && label_dim > 0)
    throw UsageError("--class " + std::to_string(o.class_idx) + ": the generator has classes 0.." + std::to_string(label_dim - 1));
  if (o.class_idx < -1) throw UsageError("--class must be a non-negative class index");
  const std::vector<int64_t> seeds = parse_seeds(o.seeds);

  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(o.package);
  const torch::Device dev = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  fs::create_directories(o.outdir);
  std::vector<at::Tensor> raw_parts;
  for (size_t start = 0; start < seeds.size(); start += batch) {
    const size_t n = std::min<size_t>(batch, seeds.size() - start);
    std::vector<at::Tensor> zs, ls;
    for (size_t i = 0; i < n; ++i) {
      // One fresh generator state per seed, as torch.Generator(device).manual_seed(seed % 2**32) in Python.
      torch::manual_seed(static_cast<uint64_t>(seeds[start + i]) % (uint64_t(1) << 32));
      zs.push_back(torch::randn({ch, res, res}, torch::TensorOptions().dtype(torch::kFloat32).device(dev)));
      if (label_dim) {
        at::Tensor l = torch::randint(label_dim, std::vector<int64_t>{}, torch::TensorOptions().dtype(torch::kLong).device(dev));
        ls.push_back(o.class_idx >= 0 ? torch::full({}, o.class_idx, l.options()) : l);
      }
    }
    std::vector<at::Tensor> inputs = {torch::stack(zs)};
    if (label_dim) inputs.push_back(torch::stack(ls));
    at::Tensor x = loader.run(inputs).at(0);
    if (!o.raw.empty()) raw_parts.push_back(x.to(torch::kCPU));
    at::Tensor img = (x * 127.5 + 128).clamp(0, 255).to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous().to(torch::kCPU);
    for (size_t i = 0; i < n; ++i) {
      char name[32];
      std::snprintf(name, sizeof(name), "%06lld.png", static_cast<long long>(seeds[start + i]));
      write_png(fs::path(o.outdir) / name, img[static_cast<int64_t>(i)].data_ptr<uint8_t>(), static_cast<int>(res),
                static_cast<int>(res), static_cast<int>(ch));
    }
  }
  if (!o.raw.empty()) write_npy(o.raw, torch::cat(raw_parts));
  std::cout << "Saved " << seeds.size() << " images to " << o.outdir << (o.raw.empty() ? "" : " and raw output to " + o.raw)
            << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "sid_sample: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "sid_sample: " << e.what() << "\n";
    return 1;
  }
}
