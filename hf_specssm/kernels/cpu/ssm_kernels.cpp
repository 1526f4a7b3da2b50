// CPU kernels for short SSM verifications: one fused loop where the torch references run 10-30 small ops.
// Built at first use by hf_specssm/kernels/cpu/__init__.py (torch.utils.cpp_extension); every op has a
// torch reference it is tested against (README.md in this folder). float32 in, float32 out; callers cast.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// exp(x) in float32 to ~2 ulp (Cephes' expf polynomial) written as plain arithmetic, so that the compiler
// vectorises the loops that call it without -ffast-math (glibc's vector expf needs it). Below -87.3 the
// result is 0 (float32's normal range ends at exp(-87.34); denormal products are slow on x86).
inline float exp_approx(float x) {
  const float clamped = x > 88.3f ? 88.3f : (x < -87.3f ? -87.3f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding then subtracting it rounds to an integer
  const float k = (clamped * 1.44269504088896341f + shifter) - shifter;
  float r = clamped - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// x rounded to bfloat16 (nearest, ties to even) and back, as a bf16 tensor op stores its result
inline float to_bf16(float x) { return static_cast<float>(c10::BFloat16(x)); }

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
}

}  // namespace

// The scan of masked_chunk_scan on raw rows: x rows of H * P values `x_stride` apart, B and C rows of
// G * N values `bc_stride` apart, dt rows of H values; mask [T, T] (per row when `mask_stride` > 0) or
// causal when null; carried [Bt, H, T, P] = C_i . h0 (`carry`), or null for a zero state; D [H] or null;
// y [Bt, T, H, P] contiguous.
void scan_rows(const float* xp, int64_t x_stride, const float* dtp, const float* ap, const float* bp,
               const float* cp, int64_t bc_stride, const float* hp, const bool* mp, int64_t mask_stride,
               const float* dp, float* yp, int64_t batch, int64_t length, int64_t heads, int64_t head_dim,
               int64_t groups, int64_t state) {
  const int64_t per_group = heads / groups;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cum(length), weights(length * length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads, g = h / per_group;
      const bool* m = mp == nullptr ? nullptr : mp + b * mask_stride;
      auto visible = [&](int64_t i, int64_t j) { return m == nullptr ? j <= i : m[i * length + j]; };
      const float a = ap[h];
      for (int64_t i = 0; i < length; ++i) {
        float total = 0.0f;
        for (int64_t j = 0; j <= i; ++j) {
          if (visible(i, j)) total += dtp[(b * length + j) * heads + h] * a;
        }
        cum[i] = total;
      }
      for (int64_t i = 0; i < length; ++i) {
        const float* ci = cp + (b * length + i) * bc_stride + g * state;
        for (int64_t j = 0; j < length; ++j) {
          float w = 0.0f;
          if (j <= i && visible(i, j)) {
            const float* bj = bp + (b * length + j) * bc_stride + g * state;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t n = 0; n < state; ++n) dot += ci[n] * bj[n];
            w = dot * exp_approx(cum[i] - cum[j]) * dtp[(b * length + j) * heads + h];
          }
          weights[i * length + j] = w;
        }
      }
      for (int64_t i = 0; i < length; ++i) {
        float* out = yp + ((b * length + i) * heads + h) * head_dim;
        const float* xi = xp + (b * length + i) * x_stride + h * head_dim;
        const float decay = hp != nullptr ? exp_approx(cum[i]) : 0.0f;
        const float skip = dp != nullptr ? dp[h] : 0.0f;
        const float* from_state = hp != nullptr ? hp + ((b * heads + h) * length + i) * head_dim : xi;
#pragma omp simd
        for (int64_t p = 0; p < head_dim; ++p) {
          out[p] = (hp != nullptr ? decay * from_state[p] : 0.0f) + skip * xi[p];
        }
        for (int64_t j = 0; j <= i; ++j) {
          const float w = weights[i * length + j];
          if (w == 0.0f) continue;
          const float* xj = xp + (b * length + j) * x_stride + h * head_dim;
#pragma omp simd
          for (int64_t p = 0; p < head_dim; ++p) out[p] += w * xj[p];
        }
      }
    }
  });
}

// acc[q][t] = sum_n rows_q[n] * ct[n * 16 + t] for q < rows (<= 8): eight state rows against a 16-position
// tile of C (transposed), accumulated in registers with one multiply-add per (row, n).
inline void tile_product(const float* r, int64_t state, int64_t rows, const float* ct, float (&acc)[8][16]) {
#if defined(__AVX512F__)
  if (rows == 8) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t n = 0; n < state; ++n) {
      if (n % 16 == 0) {
        // the next eight rows (the next block, or the next head's first): read while these compute
        for (int64_t q = 16; q < 24; ++q) __builtin_prefetch(r + q * state + n);
      }
      const __m512 c = _mm512_loadu_ps(ct + n * 16);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(r[n]), c, a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(r[state + n]), c, a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(r[2 * state + n]), c, a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(r[3 * state + n]), c, a3);
      a4 = _mm512_fmadd_ps(_mm512_set1_ps(r[4 * state + n]), c, a4);
      a5 = _mm512_fmadd_ps(_mm512_set1_ps(r[5 * state + n]), c, a5);
      a6 = _mm512_fmadd_ps(_mm512_set1_ps(r[6 * state + n]), c, a6);
      a7 = _mm512_fmadd_ps(_mm512_set1_ps(r[7 * state + n]), c, a7);
    }
    _mm512_storeu_ps(acc[0], a0);
    _mm512_storeu_ps(acc[1], a1);
    _mm512_storeu_ps(acc[2], a2);
    _mm512_storeu_ps(acc[3], a3);
    _mm512_storeu_ps(acc[4], a4);
    _mm512_storeu_ps(acc[5], a5);
    _mm512_storeu_ps(acc[6], a6);
    _mm512_storeu_ps(acc[7], a7);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  for (int64_t q0 = 0; q0 + 4 <= rows; q0 += 4) {  // four rows at a time: 8 accumulators of 8 lanes
    __m256 a[8];
    for (auto& v : a) v = _mm256_setzero_ps();
    const float* rq = r + q0 * state;
    for (int64_t n = 0; n < state; ++n) {
      const __m256 lo = _mm256_loadu_ps(ct + n * 16), hi = _mm256_loadu_ps(ct + n * 16 + 8);
      for (int64_t q = 0; q < 4; ++q) {
        const __m256 v = _mm256_set1_ps(rq[q * state + n]);
        a[2 * q] = _mm256_fmadd_ps(v, lo, a[2 * q]);
        a[2 * q + 1] = _mm256_fmadd_ps(v, hi, a[2 * q + 1]);
      }
    }
    for (int64_t q = 0; q < 4; ++q) {
      _mm256_storeu_ps(acc[q0 + q], a[2 * q]);
      _mm256_storeu_ps(acc[q0 + q] + 8, a[2 * q + 1]);
    }
  }
  if (rows % 4 == 0) return;
  const int64_t done = rows - rows % 4;
  for (int64_t q = done; q < rows; ++q) {
    for (int64_t n = 0; n < state; ++n) {
      const float v = r[q * state + n];
      for (int64_t t = 0; t < 16; ++t) acc[q][t] += v * ct[n * 16 + t];
    }
  }
  return;
#endif
  for (int64_t q = 0; q < rows; ++q) {
    for (int64_t n = 0; n < state; ++n) {
      const float v = r[q * state + n];
#pragma omp simd
      for (int64_t t = 0; t < 16; ++t) acc[q][t] += v * ct[n * 16 + t];
    }
  }
}

// C_i . h0[p] for every row b, head h, position i and row p of the state: [Bt, H, T, P], from C
// [Bt, T, G, N] (any strides) and h0 [Bt, H, P, N] (contiguous). The state is the big operand (P x N floats a
// head, read once); the positions are few, so each output tile holds 16 positions of 8 state rows in
// registers and runs over N with one broadcast and one 16-wide multiply-add per (row, n) - no horizontal
// sums (MKL's batched product of the same shapes ran ~4x slower than reading the state).
torch::Tensor carry(const torch::Tensor& C, const torch::Tensor& h0) {
  constexpr int64_t kTile = 16, kRows = 8;
  const int64_t batch = h0.size(0), heads = h0.size(1), head_dim = h0.size(2), state = h0.size(3);
  const int64_t length = C.size(1), groups = C.size(2), per_group = heads / groups;
  const int64_t tiles = (length + kTile - 1) / kTile;
  // C transposed per (row, group, tile of positions): [Bt, G, tiles, N, 16], zero past the last position
  auto transposed = torch::zeros({batch, groups, tiles, state, kTile}, h0.options());
  auto c_acc = C.accessor<float, 4>();
  float* tp = transposed.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < length; ++i)
        for (int64_t n = 0; n < state; ++n)
          tp[(((b * groups + g) * tiles + i / kTile) * state + n) * kTile + i % kTile] = c_acc[b][i][g][n];
  auto carried = torch::empty({batch, heads, length, head_dim}, h0.options());
  const float* hp = h0.data_ptr<float>();
  float* out = carried.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads, g = h / per_group;
      const float* head_state = hp + task * head_dim * state;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const float* ct = tp + ((b * groups + g) * tiles + tile) * state * kTile;
        const int64_t first = tile * kTile, count = std::min(kTile, length - first);
        for (int64_t p0 = 0; p0 < head_dim; p0 += kRows) {
          const int64_t rows = std::min(kRows, head_dim - p0);
          float acc[kRows][kTile] = {};
          tile_product(head_state + p0 * state, state, rows, ct, acc);
          for (int64_t q = 0; q < rows; ++q)
            for (int64_t t = 0; t < count; ++t) out[(task * length + first + t) * head_dim + p0 + q] = acc[q][t];
        }
      }
    }
  });
  return carried;
}

// Mamba2 (scalar decay per head) outputs of T positions whose ancestry is `mask`, from the state `h0`:
//   L_i = sum_{j: mask[i, j]} dt_j A,
//   y_i = exp(L_i) C_i . h0 + sum_{j: mask[i, j]} (C_i . B_j) exp(L_i - L_j) dt_j x_j + D x_i.
// A causal mask is the single-chunk SSD scan; an ancestor mask is the STree tree scan.
// x [Bt, T, H, P]; dt [Bt, T, H] (after bias and softplus); A [H]; B, C [Bt, T, G, N];
// h0 [Bt, H, P, N] or empty (zeros); mask [T, T] or [Bt, T, T] bool; D [H] or empty. Returns [Bt, T, H, P].
torch::Tensor masked_chunk_scan(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                                torch::Tensor C, torch::Tensor h0, torch::Tensor mask, torch::Tensor D) {
  for (auto& pair : {std::make_pair(&x, "x"), std::make_pair(&dt, "dt"), std::make_pair(&A, "A"),
                     std::make_pair(&B, "B"), std::make_pair(&C, "C")}) {
    check_float(*pair.first, pair.second);
    *pair.first = pair.first->contiguous();
  }
  TORCH_CHECK(x.dim() == 4 && dt.dim() == 3 && B.dim() == 4 && C.dim() == 4, "x, dt, B, C: 4, 3, 4, 4 dims");
  const int64_t batch = x.size(0), length = x.size(1), heads = x.size(2), head_dim = x.size(3);
  const int64_t groups = B.size(2), state = B.size(3);
  TORCH_CHECK(heads % groups == 0, "heads must be a multiple of groups");
  const bool has_h0 = h0.numel() > 0;
  if (has_h0) {
    check_float(h0, "h0");
    TORCH_CHECK(h0.dim() == 4 && h0.size(0) == batch && h0.size(1) == heads && h0.size(2) == head_dim &&
                    h0.size(3) == state,
                "h0 must be [Bt, H, P, N]");
    h0 = h0.contiguous();
  }
  const bool has_d = D.numel() > 0;
  if (has_d) {
    check_float(D, "D");
    D = D.contiguous();
  }
  mask = mask.to(torch::kBool).contiguous();
  const bool batched_mask = mask.dim() == 3;
  auto y = torch::empty({batch, length, heads, head_dim}, x.options());
  const auto carried = has_h0 ? carry(C, h0) : torch::Tensor();
  scan_rows(x.data_ptr<float>(), heads * head_dim, dt.data_ptr<float>(), A.data_ptr<float>(),
            B.data_ptr<float>(), C.data_ptr<float>(), groups * state, has_h0 ? carried.data_ptr<float>() : nullptr,
            mask.data_ptr<bool>(), batched_mask ? length * length : 0, has_d ? D.data_ptr<float>() : nullptr,
            y.data_ptr<float>(), batch, length, heads, head_dim, groups, state);
  return y;
}

// Mamba v1 (decay per channel and state) outputs at every node of a tree, from the state h0:
//   h_i = exp(dt_i A) * h_parent(i) + dt_i x_i B_i,  y_i = h_i . C_i + D x_i   (parents[i] < i, -1: h0).
// x, dt [Bt, T, Dm]; A [Dm, N]; B, C [Bt, T, N]; h0 [Bt, Dm, N]; parents [T] int64; D [Dm] or empty.
// Returns [Bt, T, Dm]. Every node's state lives in a per-channel buffer of T x N floats.
torch::Tensor tree_scan_diagonal(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                                 torch::Tensor C, torch::Tensor h0, torch::Tensor parents, torch::Tensor D) {
  for (auto& pair : {std::make_pair(&x, "x"), std::make_pair(&dt, "dt"), std::make_pair(&A, "A"),
                     std::make_pair(&B, "B"), std::make_pair(&C, "C"), std::make_pair(&h0, "h0")}) {
    check_float(*pair.first, pair.second);
    *pair.first = pair.first->contiguous();
  }
  const int64_t batch = x.size(0), length = x.size(1), channels = x.size(2), state = A.size(1);
  parents = parents.to(torch::kLong).contiguous();
  const int64_t* pp = parents.data_ptr<int64_t>();
  for (int64_t i = 0; i < length; ++i) {
    TORCH_CHECK(pp[i] < i && pp[i] >= -1, "parents[i] must be in [-1, i)");
  }
  const bool has_d = D.numel() > 0;
  if (has_d) {
    check_float(D, "D");
    D = D.contiguous();
  }
  auto y = torch::empty({batch, length, channels}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* dtp = dt.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  const float* bp = B.data_ptr<float>();
  const float* cp = C.data_ptr<float>();
  const float* hp = h0.data_ptr<float>();
  const float* dp = has_d ? D.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, batch * channels, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> states(length * state);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channels, d = task % channels;
      const float* a = ap + d * state;
      const float* start = hp + task * state;
      for (int64_t i = 0; i < length; ++i) {
        const float* previous = pp[i] < 0 ? start : states.data() + pp[i] * state;
        float* current = states.data() + i * state;
        const int64_t at = (b * length + i) * channels + d;
        const float delta = dtp[at], input = delta * xp[at];
        const float* bi = bp + (b * length + i) * state;
        const float* ci = cp + (b * length + i) * state;
        float out = 0.0f;
#pragma omp simd reduction(+ : out)
        for (int64_t n = 0; n < state; ++n) {
          const float value = exp_approx(delta * a[n]) * previous[n] + input * bi[n];
          current[n] = value;
          out += value * ci[n];
        }
        yp[at] = out + (has_d ? dp[d] * xp[at] : 0.0f);
      }
    }
  });
  return y;
}

// Depthwise conv where position t reads the columns windows[t, 0..K-1] of `input` (oldest first; -1 reads
// zeros): a causal conv (windows t-K+1..t, zero history) or a token tree's, each position over its own
// ancestors and the cached window above the first position.
//   out[c, t] = act(sum_k w[c, k] input[c, windows[t, k]] + bias[c]).
// input [Bt, Cc, L]; windows [T, K] int64 in [-1, L); weight [Cc, K]; bias [Cc] or empty.
// Runs over channels (vectorised) in a channels-last copy of the input; a channels-last input (the
// transposed projection output a verification passes) is not copied. Returns [Bt, Cc, T], channels last.
torch::Tensor window_conv(torch::Tensor input, torch::Tensor windows, torch::Tensor weight, torch::Tensor bias,
                          bool silu) {
  check_float(input, "input");
  check_float(weight, "weight");
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    check_float(bias, "bias");
    bias = bias.contiguous();
  }
  const int64_t batch = input.size(0), channels = input.size(1), columns = input.size(2);
  const int64_t kernel = weight.size(1), length = windows.size(0);
  TORCH_CHECK(windows.dim() == 2 && windows.size(1) == kernel, "windows must be [T, K]");
  windows = windows.to(torch::kLong).contiguous();
  const int64_t* wi = windows.data_ptr<int64_t>();
  for (int64_t i = 0; i < length * kernel; ++i) {
    TORCH_CHECK(wi[i] >= -1 && wi[i] < columns, "windows must index columns of input (or be -1)");
  }
  auto rows = input.transpose(1, 2).contiguous();  // [Bt, L, Cc]
  auto taps = weight.t().contiguous();              // [K, Cc]
  auto out = torch::empty({batch, length, channels}, input.options());
  const float* ip = rows.data_ptr<float>();
  const float* wp = taps.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t block = 512;
  const int64_t blocks = (channels + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, block * length * kernel));
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = (task % blocks) * block;
      const int64_t width = std::min(block, channels - first);
      for (int64_t t = 0; t < length; ++t) {
        float* o = op + (b * length + t) * channels + first;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) o[c] = 0.0f;
        for (int64_t k = 0; k < kernel; ++k) {
          const int64_t column = wi[t * kernel + k];
          if (column < 0) continue;
          const float* in = ip + (b * columns + column) * channels + first;
          const float* w = wp + k * channels + first;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) o[c] += w[c] * in[c];
        }
        if (has_bias) {
          const float* offset = bp + first;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) o[c] += offset[c];
        }
        if (silu) {
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) o[c] = o[c] / (1.0f + exp_approx(-o[c]));
        }
      }
    }
  });
  return out.transpose(1, 2);
}

// A Mamba2-layout mixer's verification forward between its two projections, in one call: transformers'
// Mamba2Mixer.forward for T > 1 tokens from a cached state (the non-fused torch path) with the single-chunk
// scan above, from the projection output to the out_proj input:
//   [gate | xBC | dt] = the last I + Cc + H columns of `projected` (I = H * P channels of x, Cc = conv_dim),
//   xBC' = silu(depthwise causal conv over the last K - 1 columns of `window`, then xBC),
//   x, B, C = xBC' split [I, G * N, G * N];  dt' = softplus(dt + dt_bias)  (no clamp, as one-token steps),
//   y = the causal scan of masked_chunk_scan(x, dt', A, B, C, h0, D),
//   out = norm_weight * rms_norm(y * silu(gate)) over groups of `norm_group` channels (`norm_mode` 0, Mamba2's
//   gated norm); norm_weight * rms_norm(y) * silu(gate) (1, Falcon-H1's norm before the gate); or
//   y * silu(gate) without a norm (2, Falcon-H1 without `mamba_rms_norm`; norm_weight empty).
// projected [Bt, T, W]; window [Bt, Cc, S >= K - 1]; h0 [Bt, H, P, N]; taps [K, Cc] (the conv weight
// transposed); conv_bias [Cc] or empty; dt_bias, A [H]; D [H] or empty; norm_weight [I].
// With `round_bf16` the values a bf16 model's forward rounds to bf16 are rounded alike (the conv before and
// after its SiLU, dt + dt_bias and its softplus); everything else is float32 as in that forward.
// A token tree (STree) passes `windows` [T, K] int64, each position's conv columns oldest first as indices
// into [the window's last K - 1 columns, the T new ones], and its ancestor `mask` [T, T]; empty tensors mean
// the causal chain (windows t .. t + K - 1, the lower triangle).
// Returns (out [Bt, T, I], the convolved x|B|C [Bt, T, Cc], dt' [Bt, T, H]), the last two for a commit that
// replays them. Nothing is written to `window` or `h0` (the frozen verification keeps its state).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> mamba2_verification_mixer(
    torch::Tensor projected, torch::Tensor window, torch::Tensor h0, torch::Tensor taps, torch::Tensor conv_bias,
    torch::Tensor dt_bias, torch::Tensor A, torch::Tensor D, torch::Tensor norm_weight, int64_t groups,
    int64_t state, int64_t norm_group, double eps, int64_t norm_mode, bool round_bf16, torch::Tensor windows,
    torch::Tensor mask) {
  for (auto& pair : {std::make_pair(&projected, "projected"), std::make_pair(&window, "window"),
                     std::make_pair(&h0, "h0"), std::make_pair(&taps, "taps"), std::make_pair(&dt_bias, "dt_bias"),
                     std::make_pair(&A, "A")}) {
    check_float(*pair.first, pair.second);
    *pair.first = pair.first->contiguous();
  }
  TORCH_CHECK(norm_mode >= 0 && norm_mode <= 2, "norm_mode must be 0 (gate, norm), 1 (norm, gate) or 2 (gate)");
  if (norm_mode != 2) {
    check_float(norm_weight, "norm_weight");
    norm_weight = norm_weight.contiguous();
  }
  TORCH_CHECK(projected.dim() == 3 && window.dim() == 3 && h0.dim() == 4 && taps.dim() == 2,
              "projected, window, h0, taps: 3, 3, 4, 2 dims");
  const int64_t batch = projected.size(0), length = projected.size(1), width = projected.size(2);
  const int64_t heads = h0.size(1), head_dim = h0.size(2), inner = heads * head_dim;
  const int64_t kernel = taps.size(0), channels = taps.size(1), history = kernel - 1;
  const int64_t columns = window.size(2);
  TORCH_CHECK(h0.size(0) == batch && h0.size(3) == state, "h0 must be [Bt, H, P, N]");
  TORCH_CHECK(groups > 0 && heads % groups == 0, "heads must be a multiple of groups");
  TORCH_CHECK(channels == inner + 2 * groups * state, "taps must have H * P + 2 * G * N columns");
  TORCH_CHECK(width >= inner + channels + heads, "projected is narrower than gate, xBC and dt");
  TORCH_CHECK(window.size(0) == batch && window.size(1) == channels && columns >= history,
              "window must be [Bt, conv_dim, S >= K - 1]");
  TORCH_CHECK((norm_mode == 2 || norm_weight.numel() == inner) && norm_group > 0 && inner % norm_group == 0,
              "norm_weight must have H * P entries, a whole number of groups");
  TORCH_CHECK(dt_bias.numel() == heads && A.numel() == heads, "dt_bias and A must have H entries");
  const bool has_bias = conv_bias.numel() > 0, has_d = D.numel() > 0;
  if (has_bias) {
    check_float(conv_bias, "conv_bias");
    TORCH_CHECK(conv_bias.numel() == channels, "conv_bias must have conv_dim entries");
    conv_bias = conv_bias.contiguous();
  }
  if (has_d) {
    check_float(D, "D");
    TORCH_CHECK(D.numel() == heads, "D must have H entries");
    D = D.contiguous();
  }
  const bool has_windows = windows.numel() > 0, has_mask = mask.numel() > 0;
  if (has_windows) {
    windows = windows.to(torch::kLong).contiguous();
    TORCH_CHECK(windows.dim() == 2 && windows.size(0) == length && windows.size(1) == kernel,
                "windows must be [T, K]");
    const int64_t* wi = windows.data_ptr<int64_t>();
    for (int64_t i = 0; i < length * kernel; ++i) {
      TORCH_CHECK(wi[i] >= 0 && wi[i] < history + length, "windows must index [K - 1 cached, T new] columns");
    }
  }
  if (has_mask) {
    mask = mask.to(torch::kBool).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == length && mask.size(1) == length, "mask must be [T, T]");
  }
  const int64_t* window_index = has_windows ? windows.data_ptr<int64_t>() : nullptr;
  const int64_t xbc_at = width - heads - channels, gate_at = xbc_at - inner, dt_at = width - heads;
  const float* pp = projected.data_ptr<float>();
  const float* windowp = window.data_ptr<float>();
  const float* tp = taps.data_ptr<float>();
  const float* biasp = has_bias ? conv_bias.data_ptr<float>() : nullptr;
  auto convolved = torch::empty({batch, length, channels}, projected.options());
  auto dt = torch::empty({batch, length, heads}, projected.options());
  auto y = torch::empty({batch, length, heads, head_dim}, projected.options());
  auto out = torch::empty({batch, length, inner}, projected.options());
  float* cp = convolved.data_ptr<float>();
  // the conv, channels last: position t reads the window's last K - 1 columns, then the new inputs
  const int64_t block = 256, blocks = (channels + block - 1) / block;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> column(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = (task % blocks) * block, span = std::min(block, channels - first);
      for (int64_t t = 0; t < length; ++t) {
        float* o = cp + (b * length + t) * channels + first;
#pragma omp simd
        for (int64_t c = 0; c < span; ++c) o[c] = 0.0f;
        for (int64_t k = 0; k < kernel; ++k) {
          // a column of [the window's last K - 1, the new inputs]; < 0 below: the window's column columns + source
          const int64_t source = (window_index != nullptr ? window_index[t * kernel + k] : t + k) - history;
          const float* w = tp + k * channels + first;
          if (source >= 0) {
            const float* in = pp + (b * length + source) * width + xbc_at + first;
#pragma omp simd
            for (int64_t c = 0; c < span; ++c) o[c] += w[c] * in[c];
          } else {
            const float* in = windowp + (b * channels + first) * columns + columns + source;
            for (int64_t c = 0; c < span; ++c) column[c] = in[c * columns];
#pragma omp simd
            for (int64_t c = 0; c < span; ++c) o[c] += w[c] * column[c];
          }
        }
        if (has_bias) {
#pragma omp simd
          for (int64_t c = 0; c < span; ++c) o[c] += biasp[first + c];
        }
        if (round_bf16) {
          for (int64_t c = 0; c < span; ++c) o[c] = to_bf16(o[c]);
        }
#pragma omp simd
        for (int64_t c = 0; c < span; ++c) o[c] = o[c] / (1.0f + exp_approx(-o[c]));
        if (round_bf16) {
          for (int64_t c = 0; c < span; ++c) o[c] = to_bf16(o[c]);
        }
      }
    }
  });
  // softplus(dt + dt_bias) as torch computes it (threshold 20)
  {
    const float* bias = dt_bias.data_ptr<float>();
    float* out_dt = dt.data_ptr<float>();
    for (int64_t row = 0; row < batch * length; ++row) {
      for (int64_t h = 0; h < heads; ++h) {
        const float v = round_bf16 ? to_bf16(pp[row * width + dt_at + h] + bias[h]) : pp[row * width + dt_at + h] + bias[h];
        const float soft = v > 20.0f ? v : std::log1p(std::exp(v));
        out_dt[row * heads + h] = round_bf16 ? to_bf16(soft) : soft;
      }
    }
  }
  const auto carried = carry(
      convolved.narrow(2, inner + groups * state, groups * state).view({batch, length, groups, state}), h0);
  scan_rows(cp, channels, dt.data_ptr<float>(), A.data_ptr<float>(), cp + inner, cp + inner + groups * state,
            channels, carried.data_ptr<float>(), has_mask ? mask.data_ptr<bool>() : nullptr, 0, has_d ? D.data_ptr<float>() : nullptr, y.data_ptr<float>(),
            batch, length, heads, head_dim, groups, state);
  // gated RMS norm: weight * (v / sqrt(mean(v^2) + eps)) per group, v = y * silu(gate)
  const float* yp = y.data_ptr<float>();
  const float* np = norm_mode == 2 ? nullptr : norm_weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t norm_groups = inner / norm_group;
  at::parallel_for(0, batch * length * norm_groups, 4, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / norm_groups, first = (task % norm_groups) * norm_group;
      const float* gate = pp + row * width + gate_at + first;
      const float* in = yp + row * inner + first;
      float* o = op + row * inner + first;
      if (norm_mode == 2) {  // the gate alone: silu(gate) in the model's dtype, as transformers computes it
        for (int64_t c = 0; c < norm_group; ++c) {
          const float gated = gate[c] / (1.0f + exp_approx(-gate[c]));
          o[c] = in[c] * (round_bf16 ? to_bf16(gated) : gated);
        }
        continue;
      }
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < norm_group; ++c) {
        const float v = norm_mode == 0 ? in[c] * (gate[c] / (1.0f + exp_approx(-gate[c]))) : in[c];
        o[c] = v;
        squares += v * v;
      }
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(norm_group) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t c = 0; c < norm_group; ++c) o[c] = np[first + c] * (o[c] * scale);
      if (norm_mode == 1) {
#pragma omp simd
        for (int64_t c = 0; c < norm_group; ++c) o[c] = o[c] * (gate[c] / (1.0f + exp_approx(-gate[c])));
      }
    }
  });
  return std::make_tuple(out, convolved, dt);
}

// A transformers RMSNorm (LlamaRMSNorm's form) over the last dim: for each row x of D values,
//   out = weight * round(x / sqrt(mean(x^2) + eps)),
// in float32, `round` being the cast back to the input dtype that the module does before the product with
// its weight (and the product rounded again for bf16). x [..., D] float32 or bfloat16, weight [D] of the same
// dtype; returns the input's shape and dtype. Rows are few in a verification (T <= ~64): one thread below
// 64K values, and every row and the weight are prefetched first, since the projections before this call
// have evicted them (each row is a 4 KiB page the hardware prefetcher does not cross into).
template <typename T>
void rms_norm_rows(const T* xp, const T* wp, T* op, int64_t rows, int64_t d, float eps) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t line = 64 / sizeof(T);
    for (int64_t i = begin * d; i < end * d; i += line) __builtin_prefetch(xp + i);
    for (int64_t i = 0; i < d; i += line) __builtin_prefetch(wp + i);
    std::vector<float> row(d), weight(d);
    for (int64_t c = 0; c < d; ++c) weight[c] = static_cast<float>(wp[c]);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = xp + r * d;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < d; ++c) {
        row[c] = static_cast<float>(x[c]);
        squares += row[c] * row[c];
      }
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(d) + eps);
      T* o = op + r * d;
      if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = weight[c] * (row[c] * scale);
      } else {
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(weight[c] * to_bf16(row[c] * scale));
      }
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1) && x.size(-1) > 0,
              "weight must be [D] for x [..., D]");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  if (x.scalar_type() == torch::kFloat32) {
    rms_norm_rows<float>(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, d,
                         static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16, got ", x.scalar_type());
    rms_norm_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
                                 out.data_ptr<c10::BFloat16>(), rows, d, static_cast<float>(eps));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while a kernel runs (no Python object is touched), as torch's own ops do
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("masked_chunk_scan", &masked_chunk_scan, "Mamba2 single-chunk scan under a causal or ancestor mask",
        release);
  m.def("tree_scan_diagonal", &tree_scan_diagonal, "Mamba v1 scan over a token tree (or chain)", release);
  m.def("window_conv", &window_conv, "depthwise conv over given windows (a token tree's ancestors)", release);
  m.def("mamba2_verification_mixer", &mamba2_verification_mixer,
        "a Mamba2-layout mixer's verification forward between its projections", release);
  m.def("rms_norm", &rms_norm, "a transformers RMSNorm (weight * x / rms(x)) over the last dim", release);
}
