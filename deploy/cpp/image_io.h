// Small image and array files for the deployment program: PNG and PPM/PGM in, PNG and .npy out.
//
// PNG reading covers what cameras and image tools write: greyscale, RGB, palette, with or without
// alpha (dropped), 1 to 16 bits per sample (16-bit samples keep their high byte), not interlaced.
// Compression goes through zlib.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mtssm_deploy {

// An 8-bit RGB image, rows top to bottom, pixels interleaved: pixels[(y * width + x) * 3 + c].
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;
};

// Reads a PNG (by its signature) or a binary PPM/PGM (P6/P5) file; throws std::runtime_error with
// a one-line message naming the file on anything else.
RgbImage read_image(const std::string& path);

// Writes an RGB PNG (8 bits per sample, no filtering, zlib level 6).
void write_png(const std::string& path, const RgbImage& image);

// Writes a float32 array of the given shape, C order, as a NumPy .npy file (version 1.0).
void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape);

}  // namespace mtssm_deploy
