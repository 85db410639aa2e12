// mtssm_run: runs an AOTInductor package written by `mtssm export --format aoti` on images, with
// libtorch alone (no Python in the process), and writes one PNG per task per image.
//
//   mtssm_run MODEL.pt2 IMAGE... [--out DIR] [--ops LIB] [--threads N] [--npy]
//
// IMAGE: PNG (8/16-bit grey, RGB, palette, with or without alpha) or binary PPM/PGM. Each image is
// normalised with the package's mean/std, zero-padded at the bottom/right up to the package's input
// size (as `mtssm predict` pads to the encoder stride) and the outputs are cropped back; images
// larger than the input size are refused (export the package at the camera's size with --size).
// Writes DIR/<stem>_<task>.png with the colour maps of `mtssm predict` (mtssm/engine/predict.py),
// and with --npy the raw outputs DIR/<stem>_<task>.npy, float32 (C_t, H, W). Prints one line per
// image with the model's run time. LIB, the scan op library, defaults to libmtssm_ops.so next to
// MODEL.pt2 (where `mtssm export` copies it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "image_io.h"

namespace fs = std::filesystem;
using mtssm_deploy::RgbImage;

namespace {

struct Options {
  std::string package, ops, out = ".";
  std::vector<std::string> images;
  int threads = 0;
  bool npy = false;
};

const char kUsage[] =
    "usage: mtssm_run MODEL.pt2 IMAGE... [--out DIR] [--ops LIB] [--threads N] [--npy]";

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value; " + kUsage);
      return argv[++i];
    };
    if (a == "--out") o.out = value();
    else if (a == "--ops") o.ops = value();
    else if (a == "--threads") o.threads = std::stoi(value());
    else if (a == "--npy") o.npy = true;
    else if (a == "-h" || a == "--help") { std::cout << kUsage << "\n"; std::exit(0); }
    else if (a.rfind("--", 0) == 0) throw std::runtime_error("unknown option " + a + "; " + kUsage);
    else positional.push_back(a);
  }
  if (positional.size() < 2) throw std::runtime_error(kUsage);
  o.package = positional[0];
  o.images.assign(positional.begin() + 1, positional.end());
  if (o.ops.empty()) o.ops = (fs::path(o.package).parent_path() / "libmtssm_ops.so").string();
  return o;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string p; std::getline(in, p, sep);) parts.push_back(p);
  return parts;
}

// The package's metadata written by mtssm.engine.export.package_metadata.
struct Metadata {
  std::vector<std::string> tasks;
  int64_t batch = 1, height = 0, width = 0;
  float mean[3], std[3];
};

Metadata read_metadata(const std::unordered_map<std::string, std::string>& m, const std::string& pkg) {
  auto get = [&](const std::string& key) {
    auto it = m.find(key);
    if (it == m.end() || it->second.empty())
      throw std::runtime_error("package '" + pkg + "' has no '" + key +
                               "' metadata; export it with `mtssm export --format aoti`");
    return it->second;
  };
  Metadata md;
  md.tasks = split(get("mtssm.tasks"), ',');
  const auto shape = split(get("mtssm.input"), 'x');
  const auto mean = split(get("mtssm.mean"), ','), std_ = split(get("mtssm.std"), ',');
  if (shape.size() != 4 || mean.size() != 3 || std_.size() != 3)
    throw std::runtime_error("package '" + pkg + "': malformed mtssm.input/mean/std metadata");
  md.batch = std::stoll(shape[0]), md.height = std::stoll(shape[2]), md.width = std::stoll(shape[3]);
  for (int c = 0; c < 3; ++c) md.mean[c] = std::stof(mean[c]), md.std[c] = std::stof(std_[c]);
  return md;
}

// (B, 3, H, W) input: the image normalised into batch entry 0, zero elsewhere (the pad value).
at::Tensor make_input(const RgbImage& img, const Metadata& md, const std::string& path) {
  if (img.height > md.height || img.width > md.width)
    throw std::runtime_error("image '" + path + "' is " + std::to_string(img.height) + "x" +
                             std::to_string(img.width) + ", larger than the package's input " +
                             std::to_string(md.height) + "x" + std::to_string(md.width) +
                             "; export at that size with `mtssm export --size HxW`");
  auto x = at::zeros({md.batch, 3, md.height, md.width}, at::kFloat);
  auto acc = x.accessor<float, 4>();
  for (int y = 0; y < img.height; ++y)
    for (int col = 0; col < img.width; ++col)
      for (int c = 0; c < 3; ++c) {
        const float v = img.pixels[(size_t(y) * img.width + col) * 3 + c] / 255.0f;
        acc[0][c][y][col] = (v - md.mean[c]) / md.std[c];
      }
  return x;
}

// PASCAL VOC colour map (mtssm.engine.predict.voc_palette).
void voc_colour(int i, uint8_t* rgb) {
  int r = 0, g = 0, b = 0;
  for (int j = 0; j < 8; ++j, i >>= 3) {
    r |= (i & 1) << (7 - j), g |= ((i >> 1) & 1) << (7 - j), b |= ((i >> 2) & 1) << (7 - j);
  }
  rgb[0] = uint8_t(r), rgb[1] = uint8_t(g), rgb[2] = uint8_t(b);
}

uint8_t round_byte(double v) { return uint8_t(std::nearbyint(std::min(255.0, std::max(0.0, v)))); }

// An RGB image of one task's output `pred` (C, H, W), as mtssm.engine.predict.colorize draws it.
RgbImage colorize(const std::string& task, const at::Tensor& pred) {
  const int64_t h = pred.size(1), w = pred.size(2), n = h * w;
  RgbImage img{int(w), int(h), std::vector<uint8_t>(size_t(n) * 3)};
  auto grey = [&](const at::Tensor& p) {  // probabilities (H, W) in grey
    auto v = p.contiguous();
    const float* d = v.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) img.pixels[3 * i] = img.pixels[3 * i + 1] = img.pixels[3 * i + 2] = round_byte(d[i] * 255.0);
  };
  if (task == "semseg" || task == "human_parts") {
    auto idx = pred.argmax(0).contiguous();
    const int64_t* d = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) voc_colour(int(d[i] & 255), &img.pixels[3 * i]);
  } else if (task == "depth") {  // viridis-like ramp over the 2nd..98th percentile
    static const double ramp[5][3] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
    auto d = pred[0].contiguous();
    const auto q = at::quantile(d.flatten().to(at::kDouble), at::tensor({0.02, 0.98}, at::kDouble));
    const double lo = q[0].item<double>(), hi = q[1].item<double>(), span = std::max(hi - lo, 1e-6);
    const float* v = d.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const double pos = std::min(1.0, std::max(0.0, (v[i] - lo) / span)) * 4;
      const int k = std::min(3, int(std::floor(pos)));
      const double f = pos - k;
      for (int c = 0; c < 3; ++c) img.pixels[3 * i + c] = round_byte(ramp[k][c] * (1 - f) + ramp[k + 1][c] * f);
    }
  } else if (task == "normals") {  // (n + 1) / 2 of unit vectors
    auto u = (pred.slice(0, 0, 3) / pred.slice(0, 0, 3).norm(2, 0, true).clamp_min(1e-12)).contiguous();
    const float* d = u.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int c = 0; c < 3; ++c) img.pixels[3 * i + c] = round_byte((d[c * n + i] + 1) * 127.5);
  } else if (task == "sal") {
    grey(pred.size(0) > 1 ? pred.softmax(0)[1] : pred[0].sigmoid());
  } else {  // boundaries ("edge") and any other map: probability in grey
    grey(pred.size(0) == 1 ? pred[0].sigmoid() : pred.softmax(0)[pred.size(0) - 1]);
  }
  return img;
}

int run(const Options& o) {
  if (o.threads > 0) at::set_num_threads(o.threads);
  // The package calls mtssm::selective_scan through the dispatcher: its library must be loaded
  // (it registers the op with TORCH_LIBRARY when loaded) before the package is.
  if (!dlopen(o.ops.c_str(), RTLD_NOW | RTLD_GLOBAL))
    throw std::runtime_error("cannot load the op library '" + o.ops + "' (" + dlerror() +
                             "); pass --ops PATH or copy it next to the package");
  if (!fs::is_regular_file(o.package)) throw std::runtime_error("package '" + o.package + "' does not exist");
  torch::inductor::AOTIModelPackageLoader loader(o.package);
  const Metadata md = read_metadata(loader.get_metadata(), o.package);
  fs::create_directories(o.out);
  c10::InferenceMode inference;
  for (const auto& path : o.images) {
    const RgbImage img = mtssm_deploy::read_image(path);
    std::vector<at::Tensor> inputs = {make_input(img, md, path)};
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<at::Tensor> outputs = loader.run(inputs);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (outputs.size() != md.tasks.size())
      throw std::runtime_error("package '" + o.package + "' gave " + std::to_string(outputs.size()) +
                               " outputs for " + std::to_string(md.tasks.size()) + " tasks");
    const std::string stem = (fs::path(o.out) / fs::path(path).stem()).string();
    for (size_t t = 0; t < outputs.size(); ++t) {
      const auto pred = outputs[t][0].slice(1, 0, img.height).slice(2, 0, img.width).to(at::kFloat).contiguous();
      mtssm_deploy::write_png(stem + "_" + md.tasks[t] + ".png", colorize(md.tasks[t], pred));
      if (o.npy) {
        std::vector<int64_t> shape(pred.sizes().begin(), pred.sizes().end());
        mtssm_deploy::write_npy(stem + "_" + md.tasks[t] + ".npy", pred.data_ptr<float>(), shape);
      }
    }
    std::printf("%s: %.1f ms\n", path.c_str(), ms);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "Error: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "Error: %s\n", e.what());
  }
  return 1;
}
