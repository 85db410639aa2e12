#include "image_io.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>

namespace mtssm_deploy {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("image '" + path + "': " + what);
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot be opened");
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

void put_be32(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(uint8_t(v >> s));
}

const uint8_t kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

uint8_t paeth(int a, int b, int c) {
  const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  return uint8_t(pa <= pb && pa <= pc ? a : pb <= pc ? b : c);
}

// Undoes the PNG row filters in place; `data` holds height rows of (1 filter byte + stride bytes).
void unfilter(const std::string& path, std::vector<uint8_t>& data, size_t height, size_t stride,
              size_t bpp) {
  std::vector<uint8_t> zero(stride, 0);
  for (size_t y = 0; y < height; ++y) {
    uint8_t* row = &data[y * (stride + 1)];
    const uint8_t filter = row[0];
    uint8_t* cur = row + 1;
    const uint8_t* prev = y ? &data[(y - 1) * (stride + 1) + 1] : zero.data();
    for (size_t i = 0; i < stride; ++i) {
      const int a = i >= bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
      switch (filter) {
        case 0: break;
        case 1: cur[i] = uint8_t(cur[i] + a); break;
        case 2: cur[i] = uint8_t(cur[i] + b); break;
        case 3: cur[i] = uint8_t(cur[i] + ((a + b) >> 1)); break;
        case 4: cur[i] = uint8_t(cur[i] + paeth(a, b, c)); break;
        default: fail(path, "corrupt PNG (row filter " + std::to_string(filter) + ")");
      }
    }
  }
}

RgbImage read_png(const std::string& path, const std::vector<uint8_t>& file) {
  size_t pos = 8;
  uint32_t width = 0, height = 0;
  int depth = 0, colour = -1;
  std::vector<uint8_t> idat, palette;
  while (pos + 12 <= file.size()) {
    const uint32_t len = be32(&file[pos]);
    const std::string type(reinterpret_cast<const char*>(&file[pos + 4]), 4);
    if (pos + 12 + size_t(len) > file.size()) break;
    const uint8_t* d = &file[pos + 8];
    if (type == "IHDR" && len >= 13) {
      width = be32(d), height = be32(d + 4), depth = d[8], colour = d[9];
      if (d[12] != 0) fail(path, "interlaced PNGs are not supported; save it without interlacing");
    } else if (type == "PLTE") {
      palette.assign(d, d + len);
    } else if (type == "IDAT") {
      idat.insert(idat.end(), d, d + len);
    } else if (type == "IEND") {
      break;
    }
    pos += 12 + size_t(len);
  }
  static const int kChannels[7] = {1, 0, 3, 1, 2, 0, 4};  // by PNG colour type
  if (width == 0 || height == 0 || colour < 0 || colour > 6 || kChannels[colour] == 0 ||
      (depth != 1 && depth != 2 && depth != 4 && depth != 8 && depth != 16) || idat.empty())
    fail(path, "corrupt or unsupported PNG (no IHDR/IDAT, or an unknown colour type or depth)");
  if (width > 65535 || height > 65535) fail(path, "PNG larger than 65535 pixels on a side");
  const size_t channels = size_t(kChannels[colour]);
  const size_t stride = (size_t(width) * channels * size_t(depth) + 7) / 8;
  const size_t bpp = std::max<size_t>(1, channels * size_t(depth) / 8);
  std::vector<uint8_t> raw(size_t(height) * (stride + 1));
  uLongf raw_len = raw.size();
  if (uncompress(raw.data(), &raw_len, idat.data(), idat.size()) != Z_OK || raw_len != raw.size())
    fail(path, "corrupt PNG (its compressed data does not inflate to the image size)");
  unfilter(path, raw, height, stride, bpp);

  RgbImage img{int(width), int(height), std::vector<uint8_t>(size_t(width) * height * 3)};
  for (size_t y = 0; y < height; ++y) {
    const uint8_t* row = &raw[y * (stride + 1) + 1];
    auto sample = [&](size_t x, size_t c) -> int {  // sample c of pixel x, as 0..255 (or index)
      const size_t i = x * channels + c;
      if (depth == 16) return row[2 * i];
      if (depth == 8) return row[i];
      const int per_byte = 8 / depth, shift = 8 - depth * (int(i % per_byte) + 1);
      const int v = (row[i / per_byte] >> shift) & ((1 << depth) - 1);
      return colour == 3 ? v : v * 255 / ((1 << depth) - 1);
    };
    for (size_t x = 0; x < width; ++x) {
      uint8_t* px = &img.pixels[(y * width + x) * 3];
      if (colour == 3) {
        const size_t k = size_t(sample(x, 0));
        if (3 * k + 2 >= palette.size()) fail(path, "corrupt PNG (palette index out of range)");
        std::memcpy(px, &palette[3 * k], 3);
      } else if (channels <= 2) {  // grey, grey + alpha
        px[0] = px[1] = px[2] = uint8_t(sample(x, 0));
      } else {  // RGB, RGBA
        for (size_t c = 0; c < 3; ++c) px[c] = uint8_t(sample(x, c));
      }
    }
  }
  return img;
}

// Binary PPM (P6, RGB) or PGM (P5, grey), maxval up to 65535.
RgbImage read_pnm(const std::string& path, const std::vector<uint8_t>& file) {
  size_t pos = 2;
  auto next_int = [&]() -> long {
    while (pos < file.size()) {
      if (file[pos] == '#') {
        while (pos < file.size() && file[pos] != '\n') ++pos;
      } else if (std::isspace(file[pos])) {
        ++pos;
      } else {
        break;
      }
    }
    long v = 0;
    bool any = false;
    while (pos < file.size() && std::isdigit(file[pos])) v = v * 10 + (file[pos++] - '0'), any = true;
    if (!any) fail(path, "corrupt PPM/PGM header");
    return v;
  };
  const bool rgb = file[1] == '6';
  const long width = next_int(), height = next_int(), maxval = next_int();
  ++pos;  // the single whitespace after maxval
  if (width <= 0 || height <= 0 || width > 65535 || height > 65535 || maxval <= 0 || maxval > 65535)
    fail(path, "unsupported PPM/PGM size or maxval");
  const size_t channels = rgb ? 3 : 1, bytes = maxval > 255 ? 2 : 1;
  if (file.size() < pos + size_t(width) * height * channels * bytes) fail(path, "truncated PPM/PGM");
  RgbImage img{int(width), int(height), std::vector<uint8_t>(size_t(width) * height * 3)};
  for (size_t i = 0; i < size_t(width) * height; ++i) {
    for (size_t c = 0; c < 3; ++c) {
      const size_t s = pos + (i * channels + (rgb ? c : 0)) * bytes;
      const long v = bytes == 2 ? (long(file[s]) << 8) | file[s + 1] : file[s];
      img.pixels[i * 3 + c] = uint8_t((v * 255 + maxval / 2) / maxval);
    }
  }
  return img;
}

void write_chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& data) {
  put_be32(out, uint32_t(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_be32(out, uint32_t(crc32(0, &out[start], uInt(out.size() - start))));
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

}  // namespace

RgbImage read_image(const std::string& path) {
  const std::vector<uint8_t> file = read_file(path);
  if (file.size() >= 8 && std::memcmp(file.data(), kPngSignature, 8) == 0) return read_png(path, file);
  if (file.size() >= 2 && file[0] == 'P' && (file[1] == '6' || file[1] == '5')) return read_pnm(path, file);
  fail(path, "not a PNG or binary PPM/PGM file");
}

void write_png(const std::string& path, const RgbImage& image) {
  const size_t stride = size_t(image.width) * 3;
  std::vector<uint8_t> raw;
  raw.reserve(size_t(image.height) * (stride + 1));
  for (int y = 0; y < image.height; ++y) {
    raw.push_back(0);  // filter: none
    raw.insert(raw.end(), image.pixels.begin() + y * stride, image.pixels.begin() + (y + 1) * stride);
  }
  std::vector<uint8_t> packed(compressBound(uLong(raw.size())));
  uLongf packed_len = packed.size();
  if (compress2(packed.data(), &packed_len, raw.data(), uLong(raw.size()), 6) != Z_OK)
    throw std::runtime_error("cannot compress '" + path + "'");
  packed.resize(packed_len);

  std::vector<uint8_t> out(kPngSignature, kPngSignature + 8), header;
  put_be32(header, uint32_t(image.width));
  put_be32(header, uint32_t(image.height));
  header.insert(header.end(), {8, 2, 0, 0, 0});  // 8 bits, RGB, deflate, adaptive filters, no interlace
  write_chunk(out, "IHDR", header);
  write_chunk(out, "IDAT", packed);
  write_chunk(out, "IEND", {});
  write_file(path, out);
}

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::ostringstream dict;
  dict << "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  size_t n = 1;
  for (int64_t d : shape) dict << d << ", ", n *= size_t(d);
  dict << "), }";
  std::string header = dict.str();
  header.append(64 - (10 + header.size() + 1) % 64, ' ').push_back('\n');  // 64-byte aligned data
  std::vector<uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                              uint8_t(header.size() & 0xff), uint8_t(header.size() >> 8)};
  out.insert(out.end(), header.begin(), header.end());
  const auto* bytes = reinterpret_cast<const uint8_t*>(data);  // little-endian hosts (x86, Arm)
  out.insert(out.end(), bytes, bytes + n * sizeof(float));
  write_file(path, out);
}

}  // namespace mtssm_deploy
