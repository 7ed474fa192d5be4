// Sparse ReLU -> convolution along a straight path: the two XLA FFI kernels of
// jaxrecover.native (see relu_conv.py there for the identities and the JAX side).
//
// Along IG's path the pre-activations z_k = s0 + a_k d of a ReLU layer are
// affine in a_k, so between consecutive path points only a few units switch.
// The forward kernel keeps A = conv(M_k * d) and B = conv(M_k * s0) + bias and
// updates them with each switching unit's kernel slice (3x3x64 multiply-adds for
// LeNet's conv2) instead of convolving every point; U_k = a_k A + B. The
// backward kernel returns T = sum_k w_k V_k and the correction
// -sum_j Delta_j * convT(Q_j), Q_j = sum_{k<j} w_k V_k (summation by parts), so
// that sum_k w_k M_k * convT(V_k) = M_last * convT(T) + correction for ANY
// sequence of masks. Convolutions: NHWC / HWIO, stride 1, VALID.
//
// Every operand carries a leading batch dimension of size B or 1 (broadcast),
// as jax.ffi.ffi_call(..., vmap_method="expand_dims") passes them.

#include <cstdint>
#include <algorithm>
#include <atomic>
#include <thread>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t m, h, w, c, kh, kw, o, oh, ow;
};

// Element offset of batch item b in an operand whose leading dimension is B or 1.
inline int64_t Step(const ffi::AnyBuffer& buf, int64_t per_item) {
  return buf.dimensions()[0] == 1 ? 0 : per_item;
}

// Runs fn(0), ..., fn(n - 1) on the calling thread and on XLA's intra-op pool (inline where there is none) and
// returns when all are done. Deadlock-free when the caller is itself a pool thread: every participant claims
// indices from a shared counter, so the caller never waits for work nobody has started; a pool task that
// starts late finds nothing left and touches only the counters it co-owns. (Threads of our own were slower
// inside IG: they competed with XLA's spinning pool threads for the two cores.)
struct Claims {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
};

inline void Work(Claims& c) {
  for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_acq_rel)) < c.n;) {
    (*c.fn)(i);
    c.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const std::function<void(int64_t)> f = fn;
  auto claims = std::make_shared<Claims>();
  claims->n = n;
  claims->fn = &f;
  for (int64_t t = 1; t < n; ++t) pool.Schedule([claims] { Work(*claims); });
  Work(*claims);
  while (claims->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// The units whose mask differs between two consecutive points, eight bytes at a time; calls visit(u).
template <typename F>
inline void ForEachChange(const uint8_t* now, const uint8_t* before, int64_t units, const F& visit) {
  int64_t u = 0;
  for (; u + 8 <= units; u += 8) {
    uint64_t x, y;
    std::memcpy(&x, now + u, 8);
    std::memcpy(&y, before + u, 8);
    if (x == y) continue;
    for (int64_t v = u; v < u + 8; ++v)
      if (now[v] != before[v]) visit(v);
  }
  for (; u < units; ++u)
    if (now[u] != before[u]) visit(u);
}

// Output channels [lo, hi) of one task: the work of every task touches only its own channels.
inline void Slice(int64_t o, int64_t tasks, int64_t t, int64_t* lo, int64_t* hi) {
  *lo = o * t / tasks;
  *hi = o * (t + 1) / tasks;
}

inline int64_t Tasks(ffi::ThreadPool& pool, int64_t o) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());  // XLA's intra-op parallelism
  return std::max<int64_t>(1, std::min<int64_t>(threads, o / 16));
}

// No pooling: out[k] = U_k. Pooling by p (window = stride = p): out[k] = relu(max-pool(U_k)) and first[k] = the
// row-major index of each window's FIRST maximum, or kNoGradient where that maximum is <= 0 (relu's gradient is
// 0 there): the value and gradient of max_pool(relu(U_k)) with the first-maximum rule (ops.max_pool).
constexpr uint8_t kNoGradient = 255;

template <typename T>
void Forward(ffi::ThreadPool& pool, const Geometry& g, int64_t batch, const ffi::AnyBuffer& s0,
             const ffi::AnyBuffer& d, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& nodes,
             const ffi::AnyBuffer& a0, const ffi::AnyBuffer& b0, const ffi::AnyBuffer& kernel,
             T* out_data, int64_t pool_size, uint8_t* first_data) {
  const int64_t units = g.h * g.w * g.c, outs = g.oh * g.ow * g.o, tasks = Tasks(pool, g.o);
  const int64_t ph = pool_size ? g.oh / pool_size : g.oh, pw = pool_size ? g.ow / pool_size : g.ow;
  const int64_t pooled = ph * pw * g.o;
  for (int64_t b = 0; b < batch; ++b) {
    const T* s0p = s0.typed_data<T>() + b * Step(s0, units);
    const T* dp = d.typed_data<T>() + b * Step(d, units);
    const uint8_t* mp = mask.typed_data<uint8_t>() + b * Step(mask, g.m * units);
    const T* ap = nodes.typed_data<T>() + b * Step(nodes, g.m);
    const T* kp = kernel.typed_data<T>() + b * Step(kernel, g.kh * g.kw * g.c * g.o);
    const T* a0p = a0.typed_data<T>() + b * Step(a0, outs);
    const T* b0p = b0.typed_data<T>() + b * Step(b0, outs);
    T* up = out_data + b * g.m * pooled;
    uint8_t* fp = first_data ? first_data + b * g.m * pooled : nullptr;
    ParallelFor(pool, tasks, [&](int64_t t) {
      int64_t lo, hi;
      Slice(g.o, tasks, t, &lo, &hi);
      const int64_t n = hi - lo, pixels = g.oh * g.ow;
      std::vector<T> A(pixels * n), B(pixels * n), best(n);  // A, B: this task's channels, pixel-major
      std::vector<uint8_t> tap(n);
      for (int64_t px = 0; px < pixels; ++px)
        for (int64_t o = 0; o < n; ++o) {
          A[px * n + o] = a0p[px * g.o + lo + o];
          B[px * n + o] = b0p[px * g.o + lo + o];
        }
      for (int64_t k = 0; k < g.m; ++k) {
        if (k > 0) {
          const uint8_t* now = mp + k * units;
          ForEachChange(now, now - units, units, [&](int64_t u) {
            const T sign = now[u] ? T(1) : T(-1);
            const T dv = sign * dp[u], sv = sign * s0p[u];
            const int64_t ch = u % g.c, col = (u / g.c) % g.w, row = u / (g.c * g.w);
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t p = row - i;
              if (p < 0 || p >= g.oh) continue;
              for (int64_t j = 0; j < g.kw; ++j) {
                const int64_t q = col - j;
                if (q < 0 || q >= g.ow) continue;
                const T* __restrict wr = kp + ((i * g.kw + j) * g.c + ch) * g.o + lo;
                T* __restrict ar = A.data() + (p * g.ow + q) * n;
                T* __restrict br = B.data() + (p * g.ow + q) * n;
                for (int64_t o = 0; o < n; ++o) {
                  ar[o] += dv * wr[o];
                  br[o] += sv * wr[o];
                }
              }
            }
          });
        }
        const T a = ap[k];
        if (!pool_size) {
          T* __restrict uk = up + k * outs + lo;
          for (int64_t px = 0; px < pixels; ++px)
            for (int64_t o = 0; o < n; ++o) uk[px * g.o + o] = a * A[px * n + o] + B[px * n + o];
          continue;
        }
        T* __restrict rk = up + k * pooled + lo;
        uint8_t* __restrict fk = fp + k * pooled + lo;
        for (int64_t pr = 0; pr < ph; ++pr)
          for (int64_t pc = 0; pc < pw; ++pc) {
            T* __restrict bv = best.data();
            uint8_t* __restrict at = tap.data();
            for (int64_t i = 0; i < pool_size; ++i)
              for (int64_t j = 0; j < pool_size; ++j) {  // channels innermost: vectorised selects
                const int64_t px = (pr * pool_size + i) * g.ow + pc * pool_size + j;
                const T* __restrict ar = A.data() + px * n;
                const T* __restrict br = B.data() + px * n;
                const uint8_t here = static_cast<uint8_t>(i * pool_size + j);
                if (here == 0) {
                  for (int64_t o = 0; o < n; ++o) {
                    bv[o] = a * ar[o] + br[o];
                    at[o] = 0;
                  }
                  continue;
                }
                for (int64_t o = 0; o < n; ++o) {
                  const T u = a * ar[o] + br[o];
                  const bool better = u > bv[o];  // strict: ties keep the earlier tap
                  bv[o] = better ? u : bv[o];
                  at[o] = better ? here : at[o];
                }
              }
            const int64_t e = (pr * pw + pc) * g.o;
            for (int64_t o = 0; o < n; ++o) {
              rk[e + o] = bv[o] > 0 ? bv[o] : T(0);
              fk[e + o] = bv[o] > 0 ? at[o] : kNoGradient;
            }
          }
      }
    });
  }
}

// cot: the cotangents of the forward's out (U_k, or the pooled relu); with pooling they are routed back to each
// window's first maximum (first, kNoGradient: nowhere) before entering the prefix sums.
template <typename T>
void Backward(ffi::ThreadPool& pool, const Geometry& g, int64_t batch, const ffi::AnyBuffer& cot,
              const ffi::AnyBuffer& weights, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& kernel,
              ffi::Result<ffi::AnyBuffer>& total, ffi::Result<ffi::AnyBuffer>& corr, int64_t pool_size,
              const uint8_t* first_data) {
  const int64_t units = g.h * g.w * g.c, outs = g.oh * g.ow * g.o, tasks = Tasks(pool, g.o);
  const int64_t ph = pool_size ? g.oh / pool_size : g.oh, pw = pool_size ? g.ow / pool_size : g.ow;
  const int64_t pooled = ph * pw * g.o;
  // each task's partial correction (its channels' share of each dot); the prefix sums and dots in double,
  // whatever T is: the correction is a difference of prefix sums, which float32 would cancel
  std::vector<double> parts(tasks * units);
  for (int64_t b = 0; b < batch; ++b) {
    const T* vp = cot.typed_data<T>() + b * Step(cot, g.m * pooled);
    const uint8_t* fp = first_data ? first_data + b * g.m * pooled : nullptr;
    const T* wp = weights.typed_data<T>() + b * Step(weights, g.m);
    const uint8_t* mp = mask.typed_data<uint8_t>() + b * Step(mask, g.m * units);
    const T* kp = kernel.typed_data<T>() + b * Step(kernel, g.kh * g.kw * g.c * g.o);
    T* tp = total->typed_data<T>() + b * outs;
    T* cp = corr->typed_data<T>() + b * units;
    ParallelFor(pool, tasks, [&](int64_t t) {
      int64_t lo, hi;
      Slice(g.o, tasks, t, &lo, &hi);
      const int64_t n = hi - lo, pixels = g.oh * g.ow;
      std::vector<double> Q(pixels * n, 0.0), acc(n);
      double* part = parts.data() + t * units;
      std::fill(part, part + units, 0.0);
      auto add = [&](int64_t k, double* __restrict dst) {  // dst (this task's channels) += w_k * V_k
        const double wk = wp[k];
        if (!pool_size) {
          const T* __restrict vk = vp + k * outs + lo;
          for (int64_t px = 0; px < pixels; ++px)
            for (int64_t o = 0; o < n; ++o) dst[px * n + o] += wk * vk[px * g.o + o];
          return;
        }
        const T* __restrict vk = vp + k * pooled + lo;
        const uint8_t* __restrict fk = fp + k * pooled + lo;
        for (int64_t pr = 0; pr < ph; ++pr)
          for (int64_t pc = 0; pc < pw; ++pc)
            for (int64_t o = 0; o < n; ++o) {
              const int64_t e = (pr * pw + pc) * g.o + o;
              if (fk[e] == kNoGradient) continue;
              const int64_t i = fk[e] / pool_size, j = fk[e] % pool_size;
              dst[((pr * pool_size + i) * g.ow + pc * pool_size + j) * n + o] += wk * vk[e];
            }
      };
      for (int64_t j = 1; j < g.m; ++j) {
        add(j - 1, Q.data());
        const uint8_t* now = mp + j * units;
        ForEachChange(now, now - units, units, [&](int64_t u) {
          const int64_t ch = u % g.c, col = (u / g.c) % g.w, row = u / (g.c * g.w);
          double* __restrict ac = acc.data();
          std::fill(ac, ac + n, 0.0);
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t p = row - i;
            if (p < 0 || p >= g.oh) continue;
            for (int64_t jj = 0; jj < g.kw; ++jj) {
              const int64_t q = col - jj;
              if (q < 0 || q >= g.ow) continue;
              const T* __restrict wr = kp + ((i * g.kw + jj) * g.c + ch) * g.o + lo;
              const double* __restrict qr = Q.data() + (p * g.ow + q) * n;
              for (int64_t o = 0; o < n; ++o) ac[o] += wr[o] * qr[o];
            }
          }
          double val = 0;
          for (int64_t o = 0; o < n; ++o) val += ac[o];
          part[u] += now[u] ? -val : val;  // -Delta_j * convT(Q_j), this task's channels
        });
      }
      add(g.m - 1, Q.data());
      for (int64_t px = 0; px < pixels; ++px)
        for (int64_t o = 0; o < n; ++o) tp[px * g.o + lo + o] = static_cast<T>(Q[px * n + o]);
    });
    for (int64_t u = 0; u < units; ++u) {
      double sum = 0;
      for (int64_t t = 0; t < tasks; ++t) sum += parts[t * units + u];
      cp[u] = static_cast<T>(sum);
    }
  }
}

ffi::Error Check(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

// Runs run(T{}) with T the float type of `type` (float32 or float64).
template <typename F>
ffi::Error ByFloatType(ffi::DataType type, const char* name, const F& run) {
  switch (type) {
    case ffi::DataType::F32:
      run(float{});
      return ffi::Error::Success();
    case ffi::DataType::F64:
      run(double{});
      return ffi::Error::Success();
    default:
      return Check(false, name);
  }
}

ffi::Error CheckGeometry(const Geometry& g, ffi::Span<const int64_t> kd, int64_t pool_size, int64_t ph, int64_t pw) {
  if (g.oh != g.h - g.kh + 1 || g.ow != g.w - g.kw + 1 || kd[3] != g.c || kd[4] != g.o)
    return Check(false, "relu_conv_path: shapes are not a stride-1 VALID convolution");
  if (pool_size < 0 || pool_size > 15 || (pool_size && (ph != g.oh / pool_size || pw != g.ow / pool_size)))
    return Check(false, "relu_conv_path: the pooled shape is not the convolution's output pooled by pool");
  return ffi::Error::Success();
}

// s0, d: [B|1, H, W, C]; mask: [B|1, M, H, W, C] u8; nodes: [B|1, M]; a0, b0: [B|1, OH, OW, O];
// kernel: [B|1, KH, KW, C, O]; out: [B, M, OH, OW, O] (pool 0) or [B, M, OH/p, OW/p, O] and first (pool p).
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer s0, ffi::AnyBuffer d, ffi::AnyBuffer mask,
                       ffi::AnyBuffer nodes, ffi::AnyBuffer a0, ffi::AnyBuffer b0, ffi::AnyBuffer kernel,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> first, int64_t pool_size) {
  auto od = out->dimensions(), kd = kernel.dimensions(), sd = s0.dimensions(), ad = a0.dimensions();
  if (od.size() != 5 || kd.size() != 5 || sd.size() != 4 || ad.size() != 4 || mask.dimensions().size() != 5)
    return Check(false, "relu_conv_path_fwd: unexpected ranks");
  Geometry g{od[1], sd[1], sd[2], sd[3], kd[1], kd[2], ad[3], ad[1], ad[2]};
  if (!pool_size && (od[2] != g.oh || od[3] != g.ow))
    return Check(false, "relu_conv_path: shapes are not a stride-1 VALID convolution");
  if (auto err = CheckGeometry(g, kd, pool_size, od[2], od[3]); err.failure()) return err;
  if (mask.element_type() != ffi::DataType::U8 || first->element_type() != ffi::DataType::U8)
    return Check(false, "relu_conv_path_fwd: mask and first must be uint8");
  uint8_t* fp = pool_size ? first->typed_data<uint8_t>() : nullptr;
  return ByFloatType(out->element_type(), "relu_conv_path_fwd: float32 or float64 only", [&](auto zero) {
    using T = decltype(zero);
    Forward<T>(pool, g, od[0], s0, d, mask, nodes, a0, b0, kernel, out->typed_data<T>(), pool_size, fp);
  });
}

// cot: [B|1, M, OH, OW, O] (pool 0) or [B|1, M, OH/p, OW/p, O] with first of the same shape (pool p);
// weights: [B|1, M]; mask: [B|1, M, H, W, C] u8; kernel: [B|1, KH, KW, C, O]; total: [B, OH, OW, O];
// corr: [B, H, W, C].
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer cot, ffi::AnyBuffer first, ffi::AnyBuffer weights,
                        ffi::AnyBuffer mask, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> total,
                        ffi::Result<ffi::AnyBuffer> corr, int64_t pool_size) {
  auto vd = cot.dimensions(), kd = kernel.dimensions(), cd = corr->dimensions(), td = total->dimensions();
  if (vd.size() != 5 || kd.size() != 5 || cd.size() != 4 || td.size() != 4 || mask.dimensions().size() != 5)
    return Check(false, "relu_conv_path_bwd: unexpected ranks");
  Geometry g{vd[1], cd[1], cd[2], cd[3], kd[1], kd[2], td[3], td[1], td[2]};
  if (!pool_size && (vd[2] != g.oh || vd[3] != g.ow))
    return Check(false, "relu_conv_path: shapes are not a stride-1 VALID convolution");
  if (auto err = CheckGeometry(g, kd, pool_size, vd[2], vd[3]); err.failure()) return err;
  if (mask.element_type() != ffi::DataType::U8 || first.element_type() != ffi::DataType::U8)
    return Check(false, "relu_conv_path_bwd: mask and first must be uint8");
  if (pool_size && first.dimensions()[0] != vd[0]) return Check(false, "relu_conv_path_bwd: first and cot differ");
  const uint8_t* fp = pool_size ? first.typed_data<uint8_t>() : nullptr;
  return ByFloatType(corr->element_type(), "relu_conv_path_bwd: float32 or float64 only", [&](auto zero) {
    Backward<decltype(zero)>(pool, g, cd[0], cot, weights, mask, kernel, total, corr, pool_size, fp);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrReluConvPathFwd, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pool"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JrReluConvPathBwd, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pool"));
