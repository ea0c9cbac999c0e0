// Calls flash_attn_ext's ops from a C++ program through the PyTorch dispatcher (no Python):
// loads the extension library, whose static initialisers register torch.ops.flash_attn_ext.*,
// then runs attention_forward and attention_backward on GQA inputs with a causal mask and
// checks them against the same attention written with ATen operations and autograd.
//
//   cmake -S examples/cpp -B build/cpp -DCMAKE_PREFIX_PATH="$(python -c 'import torch;
//   print(torch.utils.cmake_prefix_path)')" \
//         -DFLASH_ATTN_EXT_LIBRARY="$(python -c 'import flash_attn_ext._C as m; print(m.__file__)')"
//   cmake --build build/cpp && ctest --test-dir build/cpp --output-on-failure
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>  // the C++ frontend: tensors, autograd, no Python

#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <tuple>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s path/to/flash_attn_ext/_C.abi3.so\n", argv[0]);
    return 2;
  }
  // A CUDA build of the extension needs torch's CUDA libraries: load them as `import torch`
  // does (their own run paths find the CUDA wheels); absent on a CPU-only torch, which is fine.
  dlopen(TORCH_LIB_DIR "/libtorch_global_deps.so", RTLD_LAZY | RTLD_GLOBAL);
  dlopen(TORCH_LIB_DIR "/libtorch_cuda.so", RTLD_LAZY | RTLD_GLOBAL);
  // RTLD_LAZY: the library is also a Python module, whose one Python symbol is never called here.
  if (dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto forward =
      dispatcher.findSchemaOrThrow("flash_attn_ext::attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double,
              int64_t, int64_t, bool, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&)>();
  const auto backward =
      dispatcher.findSchemaOrThrow("flash_attn_ext::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double, int64_t, int64_t,
              bool, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool,
              const std::optional<at::Tensor>&, bool)>();

  torch::manual_seed(0);
  const int64_t B = 2, Hq = 8, Hkv = 2, L = 37, D = 32;
  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  at::Tensor q = torch::randn({B, Hq, L, D}, opts), k = torch::randn({B, Hkv, L, D}, opts);
  at::Tensor v = torch::randn({B, Hkv, L, D}, opts), grad_out = torch::randn({B, Hq, L, D}, opts);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // Causal: window (-1, 0), bottom-right (L == S, so the same as top-left); no softcap (0), no
  // ALiBi, no attention sinks, no relative bias.
  auto [out, lse, rng_state] =
      forward.call(q, k, v, std::nullopt, 0.0, scale, -1, 0, true, 0.0, std::nullopt, std::nullopt, std::nullopt);
  // grad_lse, a gradient flowing into lse as well: none here; no bias gradients asked for (the
  // last three outputs are then empty).
  auto [dq, dk, dv, grad_mask, grad_slopes, grad_relative] =
      backward.call(grad_out, q, k, v, out, lse, rng_state, std::nullopt, 0.0, scale, -1, 0, true, 0.0, std::nullopt,
                    std::nullopt, false, false, std::nullopt, false);

  // The reference: K/V heads repeated to the query heads, masked softmax, autograd.
  at::Tensor qr = q.clone().requires_grad_(), kr = k.clone().requires_grad_(), vr = v.clone().requires_grad_();
  const int64_t group = Hq / Hkv;
  at::Tensor scores = torch::matmul(qr, kr.repeat_interleave(group, 1).transpose(-1, -2)) * scale;
  scores = scores.masked_fill(torch::ones({L, L}, torch::kBool).triu(1), -INFINITY);
  at::Tensor ref = torch::matmul(torch::softmax(scores, -1), vr.repeat_interleave(group, 1));
  ref.backward(grad_out);

  const double err =
      std::max({(out - ref).abs().max().item<double>(), (dq - qr.grad()).abs().max().item<double>(),
                (dk - kr.grad()).abs().max().item<double>(), (dv - vr.grad()).abs().max().item<double>()});
  std::printf("flash_attn_ext from C++: forward + backward, max abs error vs ATen autograd %.3g\n", err);
  if (!(err < 1e-9)) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
