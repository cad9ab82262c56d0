// CPU kernels for what torch's own ops do in several passes over memory; built on first use by
// models/fast/kernels.py, which falls back to torch ops where they cannot be built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int LANES = 16;  // float32 lanes of a vector; the compiler splits them for narrower ISAs
// Rows and 16-code vectors per block of distances, kept in registers: 8 x 2 measured the fastest
// of 4 x 2, 4 x 4, 6 x 2 and 8 x 2 (bench/README.md).
constexpr int ROW_BLOCK = 8;
constexpr int CODE_VECTORS = 2;

typedef float floats __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ints __attribute__((vector_size(LANES * sizeof(int32_t))));

inline floats load(const float* p) {
  floats v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

static_assert(LANES == 16, "splat and lane list 16 values");
inline floats splat(float s) { return (floats){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// Whether (b, ib) comes before (a, ia) in argmin's order: NaN first, then the smaller value, then
// the smaller index.
inline bool before(float b, int64_t ib, float a, int64_t ia) {
  bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan || b_nan) return b_nan && (!a_nan || ib < ia);
  return b < a || (b == a && ib < ia);
}

// Distances of `RB` rows of x to the `CV` * LANES codes from `first`, folded into each row's
// running minimum per lane. Each distance is ||e||^2 + sum_j x_j (-2 e_j), summed in order of j.
template <int RB, int CV>
inline void code_block(const float* x, int64_t dim, const float* scaled_t, const float* norms,
                       int64_t codes, int64_t first, floats* best, ints* where) {
  floats acc[RB][CV];
  for (int v = 0; v < CV; ++v) {
    floats norm = load(norms + first + v * LANES);
    for (int r = 0; r < RB; ++r) acc[r][v] = norm;
  }
  for (int64_t j = 0; j < dim; ++j) {
    const float* column = scaled_t + j * codes + first;
    floats code[CV];
    for (int v = 0; v < CV; ++v) code[v] = load(column + v * LANES);
    for (int r = 0; r < RB; ++r) {
      floats value = splat(x[r * dim + j]);
      for (int v = 0; v < CV; ++v) acc[r][v] += value * code[v];
    }
  }
  const ints lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int v = 0; v < CV; ++v) {
    ints index = lane + (int32_t)(first + v * LANES);
    for (int r = 0; r < RB; ++r) {
      // A lane sees its codes in increasing order, so a strict comparison keeps the first of
      // equal minima; a NaN best stays, and a NaN distance replaces a number.
      ints take = (best[r] == best[r]) & ~(acc[r][v] >= best[r]);
      best[r] = take ? acc[r][v] : best[r];
      where[r] = take ? index : where[r];
    }
  }
}

template <int RB>
void nearest_rows(const float* x, int64_t dim, const float* scaled_t, const float* norms,
                  int64_t codes, int64_t* out) {
  floats best[RB];
  ints where[RB];
  for (int r = 0; r < RB; ++r) {
    best[r] = splat(std::numeric_limits<float>::infinity());
    where[r] = ints{};
  }
  int64_t first = 0;
  for (; first + CODE_VECTORS * LANES <= codes; first += CODE_VECTORS * LANES)
    code_block<RB, CODE_VECTORS>(x, dim, scaled_t, norms, codes, first, best, where);
  for (; first < codes; first += LANES) code_block<RB, 1>(x, dim, scaled_t, norms, codes, first, best, where);
  for (int r = 0; r < RB; ++r) {
    float value = best[r][0];
    int64_t index = where[r][0];
    for (int l = 1; l < LANES; ++l)
      if (before(best[r][l], where[r][l], value, index)) {
        value = best[r][l];
        index = where[r][l];
      }
    out[r] = index;
  }
}

// For each row of x [R, D], the index of the smallest ||e||^2 - 2 x.e over the codes e, given
// scaled_t = (-2 * codebook).t() [D, K] and norms = ||e||^2 [K]: argmin over the distances that
// torch.addmm(norms, x, codebook.t(), alpha=-2) gives, without writing them out. K is a multiple
// of 16.
at::Tensor nearest_code(const at::Tensor& x, const at::Tensor& scaled_t, const at::Tensor& norms) {
  TORCH_CHECK(x.dim() == 2 && scaled_t.dim() == 2 && norms.dim() == 1,
              "nearest_code: x [R, D], scaled_t [D, K] and norms [K]");
  TORCH_CHECK(x.device().is_cpu() && scaled_t.device().is_cpu() && norms.device().is_cpu(),
              "nearest_code: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && scaled_t.scalar_type() == at::kFloat &&
                  norms.scalar_type() == at::kFloat,
              "nearest_code: float32 tensors");
  const int64_t rows = x.size(0), dim = x.size(1), codes = scaled_t.size(1);
  TORCH_CHECK(scaled_t.size(0) == dim && norms.size(0) == codes, "nearest_code: shapes do not agree");
  TORCH_CHECK(codes > 0 && codes % LANES == 0, "nearest_code: codes must be a positive multiple of 16");
  const at::Tensor xs = x.contiguous(), es = scaled_t.contiguous(), ns = norms.contiguous();
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float *xp = xs.data_ptr<float>(), *ep = es.data_ptr<float>(), *np = ns.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t blocks = rows / ROW_BLOCK;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      nearest_rows<ROW_BLOCK>(xp + b * ROW_BLOCK * dim, dim, ep, np, codes, op + b * ROW_BLOCK);
  });
  for (int64_t r = blocks * ROW_BLOCK; r < rows; ++r) nearest_rows<1>(xp + r * dim, dim, ep, np, codes, op + r);
  return out;
}

constexpr int64_t SUM_ROWS = 256;  // rows summed in float32 before each addition into the double sums

inline void store(float* p, floats v) { __builtin_memcpy(p, &v, sizeof(v)); }

// f(i, v) for every vector of rows [N, C]: i is the offset of its first value, v its index within
// the row; rows are split between torch's threads.
template <typename F>
void each_vector(int64_t rows, int64_t channels, F f) {
  const int64_t vectors = channels / LANES;
  at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t v = 0; v < vectors; ++v) f(r * channels + v * LANES, v);
  });
}

// Per-channel sums over the rows of `TERMS` quantities: f(row, vector, acc) adds the terms of
// channels [16 vector, 16 vector + 16) of one row into acc[term]. Each thread sums its share of
// the rows, row by row in float32 over blocks of SUM_ROWS rows and in double over the blocks; the
// shares are then added in a fixed order, so the result does not depend on the threads' timing.
template <int TERMS, typename F>
std::vector<double> channel_sums(int64_t rows, int64_t channels, F f) {
  const int64_t vectors = channels / LANES;
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / SUM_ROWS));
  std::vector<double> partial(shares * TERMS * channels, 0.0);
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    std::vector<floats> acc(vectors * TERMS);
    for (int64_t s = begin; s < end; ++s) {
      double* total = partial.data() + s * TERMS * channels;
      const int64_t first = rows * s / shares, last = rows * (s + 1) / shares;
      for (int64_t r0 = first; r0 < last; r0 += SUM_ROWS) {
        std::fill(acc.begin(), acc.end(), floats{});
        const int64_t r1 = std::min(r0 + SUM_ROWS, last);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t v = 0; v < vectors; ++v) f(r, v, acc.data() + v * TERMS);
        for (int64_t v = 0; v < vectors; ++v)
          for (int t = 0; t < TERMS; ++t)
            for (int l = 0; l < LANES; ++l) total[t * channels + v * LANES + l] += acc[v * TERMS + t][l];
      }
    }
  });
  std::vector<double> total(TERMS * channels, 0.0);
  for (int64_t s = 0; s < shares; ++s)
    for (int64_t i = 0; i < TERMS * channels; ++i) total[i] += partial[s * TERMS * channels + i];
  return total;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
                  t.size(1) % LANES == 0,
              "batch_norm_relu: ", name, " must be contiguous float32 rows [N, C] on the CPU, C a multiple of 16");
}

std::vector<float> as_floats(const at::Tensor& t) {
  const at::Tensor c = t.contiguous().to(at::kFloat);
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

// BatchNorm in training mode followed by ReLU, on rows [N, C] (a channels-last activation), C a
// multiple of 16: returns (output, batch mean, biased batch variance, scale, shift), the output
// being max(x * scale + shift, 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), channels = x.size(1);
  TORCH_CHECK(rows > 1 && weight.numel() == channels && bias.numel() == channels,
              "batch_norm_relu: more than one row, and a weight and bias per channel");
  const float* xp = x.data_ptr<float>();
  // Two passes, the mean and then the spread about it: the variance of pre-activations whose mean
  // is large beside their spread would cancel in E[x^2] - E[x]^2. The mean is summed as the
  // difference from the first row, which float32 block sums of large values would lose.
  const std::vector<double> sums = channel_sums<1>(rows, channels, [&](int64_t r, int64_t v, floats* acc) {
    acc[0] += load(xp + r * channels + v * LANES) - load(xp + v * LANES);
  });
  std::vector<float> mean(channels);
  for (int64_t c = 0; c < channels; ++c) mean[c] = (float)(xp[c] + sums[c] / rows);
  const std::vector<double> squares = channel_sums<1>(rows, channels, [&](int64_t r, int64_t v, floats* acc) {
    const floats centred = load(xp + r * channels + v * LANES) - load(mean.data() + v * LANES);
    acc[0] += centred * centred;
  });
  at::Tensor mean_t = at::empty({channels}, x.options()), var_t = at::empty({channels}, x.options());
  at::Tensor scale_t = at::empty({channels}, x.options()), shift_t = at::empty({channels}, x.options());
  const std::vector<float> w = as_floats(weight), b = as_floats(bias);
  float *scale = scale_t.data_ptr<float>(), *shift = shift_t.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const double var = squares[c] / rows;
    const float invstd = (float)(1.0 / std::sqrt(var + eps));
    mean_t.data_ptr<float>()[c] = mean[c];
    var_t.data_ptr<float>()[c] = (float)var;
    scale[c] = w[c] * invstd;
    shift[c] = b[c] - mean[c] * scale[c];
  }
  at::Tensor out = at::empty_like(x);
  float* yp = out.data_ptr<float>();
  each_vector(rows, channels, [&](int64_t i, int64_t v) {
    const floats y = load(xp + i) * load(scale + v * LANES) + load(shift + v * LANES);
    store(yp + i, y > 0.0f ? y : floats{});
  });
  return {out, mean_t, var_t, scale_t, shift_t};
}

// The gradients of `batch_norm_relu` with respect to x, weight and bias, from the gradient g of
// its output, its input x and the batch mean, biased variance, scale and shift it returned. Where
// the ReLU passed is recomputed from x, as the forward pass computed it, so the output need not
// be read: two passes over g and x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight, double eps) {
  check_rows(g, "g");
  check_rows(x, "x");
  const int64_t rows = x.size(0), channels = x.size(1);
  TORCH_CHECK(g.sizes() == x.sizes() && mean.numel() == channels && var.numel() == channels &&
                  scale.numel() == channels && shift.numel() == channels && weight.numel() == channels,
              "batch_norm_relu_backward: shapes differ");
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>();
  const std::vector<float> m = as_floats(mean), variance = as_floats(var), w = as_floats(weight);
  const std::vector<float> forward_scale = as_floats(scale), forward_shift = as_floats(shift);
  const float *fs = forward_scale.data(), *ft = forward_shift.data();
  auto passed = [&](int64_t i, int64_t v) {
    const floats y = load(xp + i) * load(fs + v * LANES) + load(ft + v * LANES);
    return y > 0.0f ? load(gp + i) : floats{};
  };
  // Sums of the gradient past the ReLU, and of it times x - mean, over the rows.
  const std::vector<double> sums = channel_sums<2>(rows, channels, [&](int64_t r, int64_t v, floats* acc) {
    const int64_t i = r * channels + v * LANES;
    const floats through = passed(i, v);
    acc[0] += through;
    acc[1] += through * (load(xp + i) - load(m.data() + v * LANES));
  });
  at::Tensor grad_weight = at::empty({channels}, x.options()), grad_bias = at::empty({channels}, x.options());
  std::vector<float> gain(channels), slope(channels), offset(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double invstd = 1.0 / std::sqrt((double)variance[c] + eps);
    const double sum_g = sums[c], sum_g_xhat = sums[channels + c] * invstd;
    const double s = w[c] * invstd;
    grad_bias.data_ptr<float>()[c] = (float)sum_g;
    grad_weight.data_ptr<float>()[c] = (float)sum_g_xhat;
    // grad_x = s * (g' - sum_g / N - xhat * sum_g_xhat / N), as g' * s + x * slope + offset.
    gain[c] = (float)s;
    slope[c] = (float)(-s * invstd * sum_g_xhat / rows);
    offset[c] = (float)(-s * sum_g / rows + m[c] * s * invstd * sum_g_xhat / rows);
  }
  at::Tensor grad_x = at::empty_like(x);
  float* op = grad_x.data_ptr<float>();
  each_vector(rows, channels, [&](int64_t i, int64_t v) {
    store(op + i, passed(i, v) * load(gain.data() + v * LANES) + load(xp + i) * load(slope.data() + v * LANES) +
                      load(offset.data() + v * LANES));
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY(pixel_vqvae, m) {
  m.def("nearest_code(Tensor x, Tensor scaled_t, Tensor norms) -> Tensor");
  m.def("batch_norm_relu(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_relu_backward(Tensor g, Tensor x, Tensor mean, Tensor var, Tensor scale, Tensor shift, "
        "Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pixel_vqvae, CPU, m) {
  m.impl("nearest_code", nearest_code);
  m.impl("batch_norm_relu", batch_norm_relu);
  m.impl("batch_norm_relu_backward", batch_norm_relu_backward);
}
