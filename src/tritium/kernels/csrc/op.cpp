// The CPU kernel of the custom op tritium::ternary_linears in C++, so that a call from compiled code reaches the
// native kernels without re-entering Python. It computes exactly what the Python implementation in
// tritium/kernels/__init__.py (_frozen_linears_impl) computes: the same ATen norm, then the same entry points of
// the kernel library (ternary.c), whose addresses Python binds once with tritium::_bind_native.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <cstdarg>

#include <cstdint>
#include <new>
#include <optional>
#include <vector>

namespace {

using linear_fn = int (*)(int, const float *, const uint8_t *, const float *, int, const float *, float *, int64_t,
                          int64_t, int64_t, int);
using multi_fn = int (*)(int, const float *, int, const int64_t *, float *const *, int64_t, int64_t, int);

constexpr int64_t kMaxWeights = 8;  // tk_ternary_linear_multi's limit (MAX_MULTI in ternary.c)

linear_fn g_linear = nullptr;
multi_fn g_multi = nullptr;
int g_backend = -1;

void bind_native(int64_t linear, int64_t multi, int64_t backend) {
  g_linear = reinterpret_cast<linear_fn>(static_cast<intptr_t>(linear));
  g_multi = reinterpret_cast<multi_fn>(static_cast<intptr_t>(multi));
  g_backend = static_cast<int>(backend);
}

// Out of memory in a kernel: Python's MemoryError, as from the Python op.
struct KernelOutOfMemory : std::bad_alloc {
  const char *what() const noexcept override { return "tritium kernel: out of memory"; }
};

void check_rc(int rc) {
  if (rc == -2) throw KernelOutOfMemory();
  TORCH_CHECK(rc == 0, "tritium kernel failed with code ", rc);
}

std::vector<at::Tensor> ternary_linears(const at::Tensor &x_in, at::TensorList packed, at::IntArrayRef n, int64_t k,
                                        at::TensorList sw, const c10::List<std::optional<at::Tensor>> &bias,
                                        std::optional<c10::string_view> norm) {
  TORCH_CHECK(g_linear != nullptr && g_backend >= 0,
              "tritium::ternary_linears_native runs the native kernels only, and the backend in use is the reference");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(1) == k,
              "tritium::ternary_linears_native: x must be float32 (M, k)");
  const int64_t count = static_cast<int64_t>(packed.size());
  TORCH_CHECK(count >= 1 && static_cast<int64_t>(n.size()) == count && static_cast<int64_t>(sw.size()) == count &&
                  static_cast<int64_t>(bias.size()) == count,
              "tritium::ternary_linears_native: one packed, n, sw and bias per weight");
  at::Tensor x = x_in;
  if (norm.has_value()) {
    if (*norm == "rmsnorm") {
      x = at::rms_norm(x, {k}, std::nullopt, 1e-6);
    } else if (*norm == "layernorm") {
      x = at::layer_norm(x, {k}, std::nullopt, std::nullopt, 1e-5);
    } else {
      TORCH_CHECK(false, "tritium::ternary_linears_native: unknown norm ", *norm);
    }
  }
  x = x.contiguous();
  const int64_t m = x.size(0);
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> ys, keep;
  ys.reserve(count);
  keep.reserve(3 * count);
  const bool one_call = count > 1 && count <= kMaxWeights && g_multi != nullptr;  // else one call per weight
  int64_t desc[5 * kMaxWeights];
  float *outs[kMaxWeights];
  for (int64_t i = 0; i < count; i++) {
    const at::Tensor &p = keep.emplace_back(packed[i].contiguous());
    const at::Tensor &s = keep.emplace_back(sw[i].contiguous());
    std::optional<at::Tensor> b = bias.get(i);
    const float *bp = nullptr;
    if (b.has_value()) bp = keep.emplace_back(b->contiguous()).data_ptr<float>();
    at::Tensor &y = ys.emplace_back(at::empty({m, n[i]}, x.options()));
    if (!one_call) {
      check_rc(g_linear(g_backend, x.data_ptr<float>(), p.data_ptr<uint8_t>(), s.data_ptr<float>(), s.numel() != 1,
                        bp, y.data_ptr<float>(), m, n[i], k, threads));
      continue;
    }
    int64_t *d = desc + 5 * i;
    d[0] = reinterpret_cast<intptr_t>(p.data_ptr<uint8_t>());
    d[1] = n[i];
    d[2] = reinterpret_cast<intptr_t>(s.data_ptr<float>());
    d[3] = s.numel() != 1;
    d[4] = reinterpret_cast<intptr_t>(bp);
    outs[i] = y.data_ptr<float>();
  }
  if (one_call) {
    check_rc(g_multi(g_backend, x.data_ptr<float>(), static_cast<int>(count), desc, outs, m, k, threads));
  }
  return ys;
}

// Eager ATen ops that AOTInductor has no C shim for, as tritium ops that have one (below).
at::Tensor eager_silu(const at::Tensor &x) { return at::silu(x); }
at::Tensor eager_cos(const at::Tensor &x) { return at::cos(x); }
at::Tensor eager_sin(const at::Tensor &x) { return at::sin(x); }
at::Tensor eager_sum(const at::Tensor &x, at::IntArrayRef dim, bool keepdim) { return at::sum(x, dim, keepdim); }

}  // namespace

// C shims: AOTInductor's C++ code calls these directly instead of through its generic proxy executor.
using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;

extern "C" AOTITorchError aoti_torch_cpu_ternary_linears_native(AtenTensorHandle x, const AtenTensorHandle *packed,
                                                                 int64_t packed_len, const int64_t *n, int64_t n_len,
                                                                 int64_t k, const AtenTensorHandle *sw, int64_t sw_len,
                                                                 const AtenTensorHandle **bias, int64_t bias_len,
                                                                 const char **norm, ...) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    std::vector<at::Tensor> p, s;
    c10::List<std::optional<at::Tensor>> b;
    for (int64_t i = 0; i < packed_len; i++) p.push_back(*tensor_handle_to_tensor_pointer(packed[i]));
    for (int64_t i = 0; i < sw_len; i++) s.push_back(*tensor_handle_to_tensor_pointer(sw[i]));
    for (int64_t i = 0; i < bias_len; i++)
      b.push_back(bias[i] ? std::optional<at::Tensor>(*tensor_handle_to_tensor_pointer(*bias[i])) : std::nullopt);
    std::optional<c10::string_view> nm;
    if (norm) nm = c10::string_view(*norm);
    auto ys = ternary_linears(*tensor_handle_to_tensor_pointer(x), p, at::IntArrayRef(n, n_len), k, s, b, nm);
    va_list ap;
    va_start(ap, norm);
    for (auto &y : ys) *va_arg(ap, AtenTensorHandle *) = new_tensor_handle(std::move(y));
    va_end(ap);
  });
}

#define UNARY_SHIM(name)                                                                                        \
  extern "C" AOTITorchError aoti_torch_cpu_eager_##name(AtenTensorHandle x, AtenTensorHandle *ret0) {            \
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(                                                                  \
        { *ret0 = new_tensor_handle(eager_##name(*tensor_handle_to_tensor_pointer(x))); });                      \
  }
UNARY_SHIM(silu)
UNARY_SHIM(cos)
UNARY_SHIM(sin)

extern "C" AOTITorchError aoti_torch_cpu_eager_sum(AtenTensorHandle x, const int64_t *dim, int64_t dim_len,
                                                    int32_t keepdim, AtenTensorHandle *ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = new_tensor_handle(eager_sum(*tensor_handle_to_tensor_pointer(x), at::IntArrayRef(dim, dim_len), keepdim));
  });
}

TORCH_LIBRARY_FRAGMENT(tritium, m) {
  m.def("_bind_native(int linear, int multi, int backend) -> ()", &bind_native);
  m.def("ternary_linears_native(Tensor x, Tensor[] packed, int[] n, int k, Tensor[] sw, Tensor?[] bias, str? norm)"
        " -> Tensor[]");
  m.def("eager_silu(Tensor x) -> Tensor");
  m.def("eager_cos(Tensor x) -> Tensor");
  m.def("eager_sin(Tensor x) -> Tensor");
  m.def("eager_sum(Tensor x, int[] dim, bool keepdim) -> Tensor");
}

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("ternary_linears_native", &ternary_linears);
  m.impl("eager_silu", &eager_silu);
  m.impl("eager_cos", &eager_cos);
  m.impl("eager_sin", &eager_sin);
  m.impl("eager_sum", &eager_sum);
}

TORCH_LIBRARY_IMPL(tritium, Meta, m) {
  m.impl("eager_silu", &eager_silu);
  m.impl("eager_cos", &eager_cos);
  m.impl("eager_sin", &eager_sin);
  m.impl("eager_sum", &eager_sum);
}
