// The fused DSR neuron on the CPU: the whole time loop in one pass over memory.
//
// Contract and math: harness/snn/kernels/reference.py, whose results these functions reproduce (spikes and
// representations bit for bit: the same operations rounded in the same order; compiled with -ffp-contract=off so
// that no multiply-add is fused). Tensors are dense (contiguous or channels-last), x and grad_out viewed as
// [T, N] in memory order; representations are [N] in the same order.
//
// Each thread takes a range of the N elements and walks it in blocks of kBlock: the block's membrane
// potentials and sums live in registers/L1 while t runs over the T steps, so the input is read once and the
// spikes written once (the reference makes several passes per step).

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t kBlock = 1024;
constexpr int64_t kGrain = 16384;

// The forward's shared walk: each thread takes a range of the N units, in blocks whose membrane potentials u and
// input sums s stay in L1 while t runs over the T steps. The neuron is `at_step(t)`, which returns step t's
// update `update(u, s, x_t)`: integrate one input, fire, reset, return the output in acc_t (made once per step, so
// that per-step constants are values in registers, not loads repeated per element). The representation is
// s / `divisor` (a true division, as torch's on the CPU).
template <typename scalar_t, typename acc_t, typename AtStep>
void forward_walk(const scalar_t* x, scalar_t* out, acc_t* rep, int64_t T, int64_t N, acc_t divisor,
                  AtStep at_step) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    acc_t u[kBlock];
    acc_t s[kBlock];
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t n = std::min(kBlock, end - b0);
      std::fill(u, u + n, acc_t(0));
      std::fill(s, s + n, acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* xt = x + t * N + b0;
        scalar_t* yt = out + t * N + b0;
        const auto update = at_step(t);
        for (int64_t i = 0; i < n; ++i) yt[i] = static_cast<scalar_t>(update(u[i], s[i], static_cast<acc_t>(xt[i])));
      }
      for (int64_t i = 0; i < n; ++i) rep[b0 + i] = s[i] / divisor;
    }
  });
}

// IF: S += x_t; u += x_t; y = (u >= alpha*V) * V; u -= y.
template <typename scalar_t, typename acc_t>
void if_forward_kernel(const scalar_t* x, scalar_t* out, acc_t* xbar, int64_t T, int64_t N, acc_t v,
                       acc_t threshold) {
  forward_walk<scalar_t, acc_t>(x, out, xbar, T, N, static_cast<acc_t>(T),
                                [v, threshold](int64_t) {
                                  return [v, threshold](acc_t& u, acc_t& s, acc_t xi) {
                                    s += xi;
                                    u += xi;
                                    const acc_t spike = static_cast<acc_t>(u >= threshold) * v;
                                    u -= spike;
                                    return spike;
                                  };
                                });
}

// LIF: S += w_t*x_t; u = u*beta; u = u + x_t*(1-beta); f = u >= alpha*V; u -= f*V; y = f * V/dt.
template <typename scalar_t, typename acc_t>
void lif_forward_kernel(const scalar_t* x, scalar_t* out, acc_t* xhat, const acc_t* w, acc_t w_sum, int64_t T,
                        int64_t N, acc_t v, acc_t threshold, acc_t amp, acc_t beta, acc_t decay) {
  forward_walk<scalar_t, acc_t>(x, out, xhat, T, N, w_sum,
                                [=](int64_t t) {
                                  const acc_t wt = w[t];
                                  return [=](acc_t& u, acc_t& s, acc_t xi) {
                                    const acc_t wx = wt * xi;
                                    s += wx;
                                    u = u * beta;
                                    const acc_t dx = xi * decay;
                                    u = u + dx;
                                    const acc_t fired = static_cast<acc_t>(u >= threshold);
                                    u -= fired * v;
                                    return fired * amp;
                                  };
                                });
}

// IF: G = sum_t g_t; dx_t = (G/T) * 1[0 <= xbar <= V]; above = G * 1[xbar > V].
// LIF (weighted): G = T * sum_t w_t g_t / W; dx_t = (G/(tau*T)) * 1[0 < xhat < upper]; above = G * 1[xhat > upper].
template <typename scalar_t, typename acc_t, bool kLeaky>
void backward_kernel(const scalar_t* grad_out, const acc_t* rep, scalar_t* grad_x, acc_t* above, const acc_t* w,
                     int64_t T, int64_t N, acc_t upper, acc_t w_div, acc_t dx_div) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    acc_t G[kBlock];
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t n = std::min(kBlock, end - b0);
      std::fill(G, G + n, acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* gt = grad_out + t * N + b0;
        if constexpr (kLeaky) {
          const acc_t wt = w[t];
          for (int64_t i = 0; i < n; ++i) G[i] += wt * static_cast<acc_t>(gt[i]);
        } else {
          for (int64_t i = 0; i < n; ++i) G[i] += static_cast<acc_t>(gt[i]);
        }
      }
      for (int64_t i = 0; i < n; ++i) {  // masks as 0/1 products: no branch, so the loop vectorises
        const acc_t r = rep[b0 + i];
        acc_t in_range;
        if constexpr (kLeaky) {
          G[i] = static_cast<acc_t>(T) * G[i] / w_div;  // T * S / W
          in_range = static_cast<acc_t>(r > acc_t(0)) * static_cast<acc_t>(r < upper);
        } else {
          in_range = static_cast<acc_t>(r >= acc_t(0)) * static_cast<acc_t>(r <= upper);
        }
        above[b0 + i] = G[i] * static_cast<acc_t>(r > upper);
        G[i] = G[i] / dx_div * in_range;
      }
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* dt = grad_x + t * N + b0;
        for (int64_t i = 0; i < n; ++i) dt[i] = static_cast<scalar_t>(G[i]);
      }
    }
  });
}

void check_input(const torch::Tensor& x, int64_t T, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": the CPU kernel got a tensor on ", x.device());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              ": expected a contiguous or channels-last tensor");
  TORCH_CHECK(T >= 1 && x.dim() >= 1 && x.size(0) % T == 0, name, ": first dimension ", x.size(0),
              " is not divisible by T=", T);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [B, ...] in the accumulation dtype and in x's memory layout (step 0 of x), so that element i of a time step
// and of the representation are the same unit
torch::Tensor rep_like(const torch::Tensor& x, int64_t T) {
  return torch::empty_like(x.narrow(0, 0, x.size(0) / T), x.options().dtype(acc_type(x.scalar_type())));
}

std::vector<torch::Tensor> if_forward(torch::Tensor x, torch::Tensor v, torch::Tensor threshold, int64_t T) {
  check_input(x, T, "if_forward");
  auto out = torch::empty_like(x);
  auto xbar = rep_like(x, T);
  const int64_t N = x.numel() / T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsr_if_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if_forward_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), xbar.data_ptr<acc_t>(), T,
                                       N, v.item<acc_t>(), threshold.item<acc_t>());
  });
  return {out, xbar};
}

std::vector<torch::Tensor> lif_forward(torch::Tensor x, torch::Tensor v, torch::Tensor threshold, torch::Tensor amp,
                                       torch::Tensor w, torch::Tensor w_sum, int64_t T, double beta, double decay) {
  check_input(x, T, "lif_forward");
  auto out = torch::empty_like(x);
  auto xhat = rep_like(x, T);
  const int64_t N = x.numel() / T;
  auto wc = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsr_lif_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lif_forward_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        xhat.data_ptr<acc_t>(), wc.data_ptr<acc_t>(), w_sum.item<acc_t>(), T, N,
                                        v.item<acc_t>(), threshold.item<acc_t>(), amp.item<acc_t>(),
                                        static_cast<acc_t>(beta), static_cast<acc_t>(decay));
  });
  return {out, xhat};
}

std::vector<torch::Tensor> if_backward(torch::Tensor grad_out, torch::Tensor xbar, torch::Tensor v, int64_t T) {
  check_input(grad_out, T, "if_backward");
  auto grad_x = torch::empty_like(grad_out);
  auto above = torch::empty_like(xbar);
  const int64_t N = grad_out.numel() / T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "dsr_if_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t, false>(grad_out.data_ptr<scalar_t>(), xbar.data_ptr<acc_t>(),
                                            grad_x.data_ptr<scalar_t>(), above.data_ptr<acc_t>(), nullptr, T, N,
                                            v.item<acc_t>(), acc_t(1), static_cast<acc_t>(T));
  });
  return {grad_x, above};
}

std::vector<torch::Tensor> lif_backward(torch::Tensor grad_out, torch::Tensor xhat, torch::Tensor upper,
                                        torch::Tensor w, int64_t T, double tau, double w_sum) {
  check_input(grad_out, T, "lif_backward");
  auto grad_x = torch::empty_like(grad_out);
  auto above = torch::empty_like(xhat);
  const int64_t N = grad_out.numel() / T;
  auto wc = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "dsr_lif_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // G = T*S/W, then dx = G / (tau*T)
    backward_kernel<scalar_t, acc_t, true>(grad_out.data_ptr<scalar_t>(), xhat.data_ptr<acc_t>(),
                                           grad_x.data_ptr<scalar_t>(), above.data_ptr<acc_t>(), wc.data_ptr<acc_t>(),
                                           T, N, upper.item<acc_t>(), static_cast<acc_t>(w_sum),
                                           static_cast<acc_t>(tau * static_cast<double>(T)));
  });
  return {grad_x, above};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("if_forward", &if_forward, "DSR IF forward over T steps, fused");
  m.def("lif_forward", &lif_forward, "DSR LIF forward over T steps, fused");
  m.def("if_backward", &if_backward, "DSR IF backward, fused");
  m.def("lif_backward", &lif_backward, "DSR LIF backward, fused");
}
