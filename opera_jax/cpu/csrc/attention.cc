// Softmax attention for XLA:CPU through the XLA FFI, forward and backward, one (sequence, head) pair at a time.
//
// XLA:CPU has no fused attention: it runs `q k^T`, the softmax and `p v` as separate passes over
// `[batch, heads, n, n]` arrays in memory, plus head transposes of q, k, v and the output. Here each
// (sequence, head) pair's `[n, n]` scores stay in a per-thread buffer (64 KB at n = 128, in L2), q, k and
// v are read straight from the `[batch, n, heads, head_dim]` layout of the projections (no
// transposes), and the backward pass recomputes the probabilities from the saved row maxima and
// reciprocal row sums, as `ops.attention` does. The Python side is `opera_jax/cpu/attention.py`; the
// independent reference the tests compare with is `ops.attention`.
//
// Arrays (f32; `kept_scale` = 1 / (1 - rate) with dropout, 0 without; `scale` the logits' factor):
//   q, k, v, out, g, dq, dk, dv  [B, n, H, d]     the projections without their biases
//   bq, bv                       [H * d]          the query and value projections' biases
//   bias                         [B, n]           additive key bias (the padding mask)
//   keep                         [B, H, n, n]     dropout's keep-mask (1 entry, unread, without dropout)
//   m, inv                       [B, H, n]        each query row's logit maximum and 1 / sum(exp)
//   dbias                        [B, H, n]        the bias gradient before its sum over the heads
//
// The attention of the biased projections, softmax(scale (q + bq)(k + bk)^T + bias) (v + bv), without a
// pass over q, k and v in memory to add their biases: each head's q + bq and v + bv are formed in a
// per-thread buffer, and the key bias is left out: (q_i + bq).(k_j + bk) = (q_i + bq).k_j + (q_i + bq).bk,
// and the second term, the same for every key j, is one the softmax ignores (bk's gradient is 0). The
// scale multiplies the scores as the softmax reads them. dq, dk, dv are the gradients of the biased
// projections (q + bq, ...), so the biases' are their sums over the tokens.
//
// Matrix products (attribute `blas` = 0) run through one register-tiled kernel written with GCC vector
// extensions (16 floats), compiled with -march=native when first used (`opera_jax/cpu/attention.py`). k, g and the
// results are read and written in place where the head size is a multiple of 16 (all presets'), else
// through zero-padded copies, and k and v + bv are transposed into buffers where a product needs them
// so. With `blas` = 1 they are
// calls of the SGEMM that `OperaAttentionUseSgemm` was given (MKL's, where the `mkl` extra is installed:
// `opera_jax/cpu/blas.py`), which reads and writes every head in place, transposed or not: at n = 128 it ran these
// products at about twice the tiled kernel's rate (`benchmarks/README.md`). Score rows are padded to a
// multiple of 16 keys, the padding masked with -inf. Everything is computed in f32, each (sequence, head)
// pair by one thread in a fixed order: results do not depend on the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

constexpr int W = 16;  // floats per vector
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

__attribute__((always_inline)) inline v16 load(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
__attribute__((always_inline)) inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
// (Not `v16{} + s`: that costs a scalar add of 0 before each broadcast, since 0 + -0 is not -0.)
__attribute__((always_inline)) inline v16 splat(float s) {
  return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}
__attribute__((always_inline)) inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
__attribute__((always_inline)) inline float hmax(v16 v) {
  float s = v[0];
  for (int i = 1; i < W; ++i) s = std::max(s, v[i]);
  return s;
}
__attribute__((always_inline)) inline long round16(long n) { return (n + W - 1) / W * W; }

// A CBLAS SGEMM (row-major, LP64), set by OperaAttentionUseSgemm; calls with `blas` = 1 need it.
using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
Sgemm sgemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// C[M, N] (row stride ldc) = op(A) op(B) through `sgemm`, op the transpose where ta / tb say so.
inline void blas(bool ta, bool tb, long M, long N, long K, const float* a, long lda, const float* b, long ldb,
                 float* c, long ldc) {
  sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, M, N, K, 1.f, a, lda, b, ldb, 0.f, c, ldc);
}

// Columns n..np of the first `rows` rows of c (row stride np) set to 0 (what `blas` leaves unwritten).
inline void zero_tail(float* c, long rows, long n, long np) {
  if (n == np) return;
  for (long i = 0; i < rows; ++i) std::fill(c + i * np + n, c + (i + 1) * np, 0.f);
}

// exp(x) for x <= 0 (softmax arguments): Cephes' expf polynomial on x - n ln 2, times 2^n; 0 below -87.3
// (and for -inf), NaN stays NaN. Relative error ~2 ulp.
__attribute__((always_inline)) inline v16 exp_nonpositive(v16 x) {
  const v16 lo = splat(-87.33654f);
  v16 xc = x < lo ? lo : x;
  v16 t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds x / ln 2 to the nearest integer
  v16 n = t - 12582912.0f;
  v16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v16i ni = (v16i)t - 0x4B400000;  // t's bits are those of 1.5 * 2^23 plus n
  v16 scale = (v16)((ni + 127) << 23);
  v16 y = p * scale;
  return x < lo ? v16{} : y;
}

// C[MR, NV * 16] = sum_k A(r, k) B[k, :], A(r, k) = a[r * ar + k * ak], B row-major with row stride ldb.
template <int MR, int NV>
__attribute__((always_inline)) inline void tile(long K, const float* a, long ar, long ak, const float* b, long ldb,
                                                float* c, long ldc) {
  v16 acc[MR][NV] = {};
  for (long k = 0; k < K; ++k) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * W);
    for (int r = 0; r < MR; ++r) {
      const v16 av = splat(a[r * ar + k * ak]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * W, acc[r][v]);
}

// C[M, NV * 16] = A B, MR rows at a time (MR * NV accumulators in registers).
template <int NV>
void panel(long M, long K, const float* a, long ar, long ak, const float* b, long ldb, float* c, long ldc) {
  constexpr int MR = NV >= 4 ? 4 : 8;
  long i = 0;
  for (; i + MR <= M; i += MR) tile<MR, NV>(K, a + i * ar, ar, ak, b, ldb, c + i * ldc, ldc);
  for (; i < M; ++i) tile<1, NV>(K, a + i * ar, ar, ak, b, ldb, c + i * ldc, ldc);
}

// C[M, N] = A B for A(r, k) = a[r * ar + k * ak] ([M, K]), B [K, N] row-major; N a multiple of 16.
void gemm(long M, long N, long K, const float* a, long ar, long ak, const float* b, long ldb, float* c, long ldc) {
  long j = 0;
  for (; j + 4 * W <= N; j += 4 * W) panel<4>(M, K, a, ar, ak, b + j, ldb, c + j, ldc);
  for (; j + 2 * W <= N; j += 2 * W) panel<2>(M, K, a, ar, ak, b + j, ldb, c + j, ldc);
  for (; j < N; j += W) panel<1>(M, K, a, ar, ak, b + j, ldb, c + j, ldc);
}

// A per-thread scratch buffer of 64-byte aligned floats, grown when needed (contents undefined).
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = n;
      p = static_cast<float*>(std::aligned_alloc(64, round16(static_cast<long>(n)) * sizeof(float)));
    }
    return p;
  }
};

struct Dims {
  long B, n, H, d;  // batch, sequence length, heads, head dim
  long np, dp;      // n and d rounded up to multiples of 16
  long row() const { return H * d; }  // stride between a head's consecutive rows in [B, n, H, d]
};

// dst[0:d] = src[0:d], vector by vector (d is small: a libc memcpy call per row cost more than the copy).
__attribute__((always_inline)) inline void copy_row(float* dst, const float* src, long d) {
  long c = 0;
  for (; c + W <= d; c += W) store(dst + c, load(src + c));
  for (; c < d; ++c) dst[c] = src[c];
}

// Head h of sequence b of a [B, n, H, d] array: its first row.
inline const float* head(const Dims& s, const float* x, long b, long h) { return x + (b * s.n * s.H + h) * s.d; }
inline float* head(const Dims& s, float* x, long b, long h) { return x + (b * s.n * s.H + h) * s.d; }

// Head h of sequence b as an [n, dp] matrix with row stride `ld`: read in place when d is a multiple of
// 16 (every head size of the presets), else copied into `buf` and zero-padded to dp columns.
const float* head_in(const Dims& s, const float* x, long b, long h, float* buf, long& ld) {
  const float* base = head(s, x, b, h);
  if (s.d == s.dp) {
    ld = s.row();
    return base;
  }
  std::memset(buf, 0, sizeof(float) * s.n * s.dp);
  for (long i = 0; i < s.n; ++i) copy_row(buf + i * s.dp, base + i * s.row(), s.d);
  ld = s.dp;
  return buf;
}

// Where an [n, dp] result for head h of sequence b goes: in place when d is a multiple of 16, else
// `buf`, which head_out_done then copies into place.
float* head_out(const Dims& s, float* x, long b, long h, float* buf, long& ld) {
  ld = s.d == s.dp ? s.row() : s.dp;
  return s.d == s.dp ? head(s, x, b, h) : buf;
}

void head_out_done(const Dims& s, const float* buf, long b, long h, float* x) {
  if (s.d == s.dp) return;
  float* base = head(s, x, b, h);
  for (long i = 0; i < s.n; ++i) copy_row(base + i * s.row(), buf + i * s.dp, s.d);
}

// An [n, d] matrix with row stride `ld` (a head in place, or a buffer) transposed into a [dp, np] buffer,
// zero-padded.
void transposed(const Dims& s, const float* x, long ld, float* out) {
  std::memset(out, 0, sizeof(float) * s.np * s.dp);
  for (long i = 0; i < s.n; ++i)
    for (long c = 0; c < s.d; ++c) out[c * s.np + i] = x[i * ld + c];
}

// The padded bias row of sequence b: its n key biases, then -inf for the padding keys.
void bias_row(const Dims& s, const float* bias, long b, float* out) {
  std::memcpy(out, bias + b * s.n, sizeof(float) * s.n);
  for (long j = s.n; j < s.np; ++j) out[j] = -INFINITY;
}

// A row after dropout: kept entries times `scale`, dropped ones 0 (`out` may be `p`).
void drop_row(const Dims& s, const bool* keep_row, float scale, const float* p, float* out) {
  for (long j = 0; j < s.n; ++j) out[j] = keep_row[j] ? p[j] * scale : 0.f;
  for (long j = s.n; j < s.np; ++j) out[j] = 0.f;
}

// Head h of sequence b of a [B, n, H, d] array plus `vec`'s head h (a projection's bias), into `buf` as an
// [n, dp] matrix, zero-padded (row stride dp).
const float* head_biased(const Dims& s, const float* x, const float* vec, long b, long h, float* buf) {
  const float* base = head(s, x, b, h);
  const float* bh = vec + h * s.d;
  const long row = s.row(), d = s.d, dp = s.dp;
  for (long i = 0; i < s.n; ++i) {
    float* out = buf + i * dp;
    const float* in = base + i * row;
    long c = 0;
    for (; c + W <= d; c += W) store(out + c, load(in + c) + load(bh + c));
    for (; c < d; ++c) out[c] = in[c] + bh[c];
    for (; c < dp; ++c) out[c] = 0.f;
  }
  return buf;
}

ffi::Error check(const Dims& s, ffi::Buffer<ffi::F32>& bias, ffi::Buffer<ffi::PRED>& keep, float kept_scale,
                 int64_t blas, ffi::Buffer<ffi::F32>& bq, ffi::Buffer<ffi::F32>& bv) {
  if (static_cast<long>(bq.element_count()) != s.H * s.d || static_cast<long>(bv.element_count()) != s.H * s.d)
    return ffi::Error::InvalidArgument("opera attention: bq and bv must have heads * head_dim entries");
  if (blas && sgemm == nullptr) return ffi::Error::InvalidArgument("opera attention: blas = 1 without an SGEMM");
  if (bias.dimensions().size() != 2 || bias.dimensions()[0] != s.B || bias.dimensions()[1] != s.n)
    return ffi::Error::InvalidArgument("opera attention: bias must be [batch, n]");
  if (kept_scale > 0.f && static_cast<long>(keep.element_count()) != s.B * s.H * s.n * s.n)
    return ffi::Error::InvalidArgument("opera attention: keep must be [batch, heads, n, n]");
  return ffi::Error::Success();
}

Dims dims_of(ffi::Buffer<ffi::F32>& q) {
  auto d = q.dimensions();
  Dims s{d[0], d[1], d[2], d[3], round16(d[1]), round16(d[3])};
  return s;
}

bool same_shape(ffi::Buffer<ffi::F32>& a, ffi::Buffer<ffi::F32>& b) {
  auto x = a.dimensions(), y = b.dimensions();
  return x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin());
}

// One call's arrays (see the top of the file).
struct ForwardArgs {
  const float *Q, *K, *V, *bias, *BQ, *BV;
  const bool* keep;
  float kept_scale;  // 0: no dropout
  float scale;       // the logits' factor
  bool blas;         // products through `sgemm`
  float *O, *M, *I;
};

struct BackwardArgs {
  const float *Q, *K, *V, *G, *bias, *BQ, *BV, *M, *I;
  const bool* keep;
  float kept_scale, scale;
  bool blas;
  float *DQ, *DK, *DV, *DB;
};

// The forward pass of head h of sequence b.
void forward_head(const Dims& s, const ForwardArgs& a, long b, long h) {
  thread_local Scratch sq, skt, sv, ss, so, sb;
  const long item = b * s.H + h, sz = s.np * s.dp;
  float *sc = ss.get(s.np * s.np), *bb = sb.get(s.np);
  const float* q = head_biased(s, a.Q, a.BQ, b, h, sq.get(sz));  // q + bq, [n, dp]
  bias_row(s, a.bias, b, bb);
  if (a.blas) {  // scores = (q + bq) k^T
    blas(false, true, s.n, s.n, s.d, q, s.dp, head(s, a.K, b, h), s.row(), sc, s.np);
    zero_tail(sc, s.n, s.n, s.np);
  } else {
    float* ktb = skt.get(sz);
    transposed(s, head(s, a.K, b, h), s.row(), ktb);
    gemm(s.n, s.np, s.dp, q, s.dp, 1, ktb, s.np, sc, s.np);
  }
  float *mrow = a.M + item * s.n, *irow = a.I + item * s.n;
  const float scale = a.scale;  // (a local: the stores below could alias a member)
  for (long i = 0; i < s.n; ++i) {  // softmax, row by row
    float* row = sc + i * s.np;
    v16 mx = splat(-INFINITY);
    for (long j = 0; j < s.np; j += W) {
      v16 x = load(row + j) * scale + load(bb + j);
      store(row + j, x);
      mx = x > mx ? x : mx;
    }
    const float mi = hmax(mx);
    v16 sum{};
    for (long j = 0; j < s.np; j += W) {
      v16 e = exp_nonpositive(load(row + j) - mi);
      store(row + j, e);
      sum += e;
    }
    const float ii = 1.f / hsum(sum);
    if (a.kept_scale > 0.f) {
      drop_row(s, a.keep + (item * s.n + i) * s.n, a.kept_scale * ii, row, row);
    } else {
      for (long j = 0; j < s.np; j += W) store(row + j, load(row + j) * ii);
    }
    mrow[i] = mi;
    irow[i] = ii;
  }
  const float* v = head_biased(s, a.V, a.BV, b, h, sv.get(sz));  // v + bv
  if (a.blas) {  // out = p (v + bv)
    blas(false, false, s.n, s.d, s.n, sc, s.np, v, s.dp, head(s, a.O, b, h), s.row());
    return;
  }
  long ldo;
  float* o = head_out(s, a.O, b, h, so.get(sz), ldo);
  gemm(s.n, s.dp, s.n, sc, s.np, 1, v, s.dp, o, ldo);
  head_out_done(s, o, b, h, a.O);
}

// The backward pass of head h of sequence b.
void backward_head(const Dims& s, const BackwardArgs& a, long b, long h) {
  thread_local Scratch sq, sk, skt, sv, svt, sg, sp, spd, sds, so, sb, scol;
  const long item = b * s.H + h, sz = s.np * s.dp, full = s.np * s.np, row_ = s.row();
  const bool dropout = a.kept_scale > 0.f;
  long ldk = row_, ldg = row_, ldo;
  float *p = sp.get(full), *ds = sds.get(full), *bb = sb.get(s.np);
  float *pd = dropout ? spd.get(full) : p, *col = scol.get(s.np);
  const float* q = head_biased(s, a.Q, a.BQ, b, h, sq.get(sz));  // q + bq, [n, dp]
  const float* v = head_biased(s, a.V, a.BV, b, h, sv.get(sz));  // v + bv
  const float *k = head(s, a.K, b, h), *g = head(s, a.G, b, h);
  float *ktb = nullptr, *vtb = nullptr;
  if (!a.blas) {
    k = head_in(s, a.K, b, h, sk.get(sz), ldk);
    g = head_in(s, a.G, b, h, sg.get(sz), ldg);
    transposed(s, k, ldk, ktb = skt.get(sz));
    transposed(s, v, s.dp, vtb = svt.get(sz));
  }
  bias_row(s, a.bias, b, bb);
  const float *mrow = a.M + item * s.n, *irow = a.I + item * s.n;
  const float scale = a.scale;  // (a local: the stores below could alias a member)
  if (a.blas) {  // the scores again
    blas(false, true, s.n, s.n, s.d, q, s.dp, k, ldk, p, s.np);
    zero_tail(p, s.n, s.n, s.np);
  } else {
    gemm(s.n, s.np, s.dp, q, s.dp, 1, ktb, s.np, p, s.np);
  }
  for (long i = 0; i < s.n; ++i) {  // the probabilities from the saved row statistics
    float* row = p + i * s.np;
    const float mi = mrow[i], ii = irow[i];
    for (long j = 0; j < s.np; j += W)
      store(row + j, exp_nonpositive(load(row + j) * scale + load(bb + j) - mi) * ii);
    if (dropout) drop_row(s, a.keep + (item * s.n + i) * s.n, a.kept_scale, row, pd + i * s.np);
  }
  if (a.blas) {  // dv = p_dropped^T g; dp = g (v + bv)^T
    blas(true, false, s.n, s.d, s.n, pd, s.np, g, ldg, head(s, a.DV, b, h), row_);
    blas(false, true, s.n, s.n, s.d, g, ldg, v, s.dp, ds, s.np);
    zero_tail(ds, s.n, s.n, s.np);
  } else {
    float* dv = head_out(s, a.DV, b, h, so.get(sz), ldo);
    gemm(s.n, s.dp, s.n, pd, 1, s.np, g, ldg, dv, ldo);
    head_out_done(s, dv, b, h, a.DV);
    gemm(s.n, s.np, s.dp, g, ldg, 1, vtb, s.np, ds, s.np);
  }
  std::memset(col, 0, sizeof(float) * s.np);
  for (long i = 0; i < s.n; ++i) {  // ds = p * (dp - sum_j p dp), dropout's mask and scale on dp first
    float* row = ds + i * s.np;
    const float* prow = p + i * s.np;
    if (dropout) drop_row(s, a.keep + (item * s.n + i) * s.n, a.kept_scale, row, row);
    v16 acc{};
    for (long j = 0; j < s.np; j += W) acc += load(row + j) * load(prow + j);
    const float di = hsum(acc);
    for (long j = 0; j < s.np; j += W) {
      v16 x = load(prow + j) * (load(row + j) - di);
      store(row + j, x * scale);  // the logits' gradient: q and k see it times the scale
      store(col + j, load(col + j) + x);
    }
  }
  std::memcpy(a.DB + item * s.n, col, sizeof(float) * s.n);
  if (a.blas) {  // dq = ds k; dk = ds^T (q + bq)
    blas(false, false, s.n, s.d, s.n, ds, s.np, k, ldk, head(s, a.DQ, b, h), row_);
    blas(true, false, s.n, s.d, s.n, ds, s.np, q, s.dp, head(s, a.DK, b, h), row_);
    return;
  }
  float* dq = head_out(s, a.DQ, b, h, so.get(sz), ldo);
  gemm(s.n, s.dp, s.n, ds, s.np, 1, k, ldk, dq, ldo);
  head_out_done(s, dq, b, h, a.DQ);
  float* dk = head_out(s, a.DK, b, h, so.get(sz), ldo);
  gemm(s.n, s.dp, s.n, ds, 1, s.np, q, s.dp, dk, ldo);
  head_out_done(s, dk, b, h, a.DK);
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::PRED> keep,
                            ffi::Buffer<ffi::F32> bq, ffi::Buffer<ffi::F32> bv, float kept_scale, float scale,
                            int64_t blas, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> m,
                            ffi::ResultBuffer<ffi::F32> inv) {
  if (q.dimensions().size() != 4 || !same_shape(q, k) || !same_shape(q, v))
    return ffi::Error::InvalidArgument("opera attention: q, k, v must be equal [batch, n, heads, head_dim]");
  const Dims s = dims_of(q);
  if (ffi::Error e = check(s, bias, keep, kept_scale, blas, bq, bv); e.failure()) return e;
  const ForwardArgs a{q.typed_data(), k.typed_data(), v.typed_data(), bias.typed_data(), bq.typed_data(),
                      bv.typed_data(), keep.typed_data(), kept_scale, scale, blas != 0, out->typed_data(),
                      m->typed_data(), inv->typed_data()};
  opera::parallel_for(pool, s.B * s.H, [&](long i) { forward_head(s, a, i / s.H, i % s.H); });

  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::PRED> keep,
                             ffi::Buffer<ffi::F32> bq, ffi::Buffer<ffi::F32> bv, ffi::Buffer<ffi::F32> m,
                             ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> g, float kept_scale, float scale,
                             int64_t blas, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dbias) {
  if (q.dimensions().size() != 4 || !same_shape(q, k) || !same_shape(q, v) || !same_shape(q, g))
    return ffi::Error::InvalidArgument("opera attention: q, k, v, g must be equal [batch, n, heads, head_dim]");
  const Dims s = dims_of(q);
  if (ffi::Error e = check(s, bias, keep, kept_scale, blas, bq, bv); e.failure()) return e;
  if (static_cast<long>(m.element_count()) != s.B * s.H * s.n || m.element_count() != inv.element_count())
    return ffi::Error::InvalidArgument("opera attention: m, inv must be [batch, heads, n]");
  const BackwardArgs a{q.typed_data(), k.typed_data(), v.typed_data(), g.typed_data(), bias.typed_data(),
                       bq.typed_data(), bv.typed_data(), m.typed_data(), inv.typed_data(), keep.typed_data(),
                       kept_scale, scale, blas != 0, dq->typed_data(), dk->typed_data(), dv->typed_data(),
                       dbias->typed_data()};
  opera::parallel_for(pool, s.B * s.H, [&](long i) { backward_head(s, a, i / s.H, i % s.H); });

  return ffi::Error::Success();
}

// The operands both passes start with: q, k, v, bias, keep, bq, bv (the thread pool as context).
auto bind_inputs() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
      .Arg<ffi::Buffer<ffi::PRED>>().Arg<F32>().Arg<F32>();
}

// The attributes both passes take.
template <typename B>
auto bind_attrs(B binding) {
  return std::move(binding).template Attr<float>("kept_scale").template Attr<float>("scale").template Attr<int64_t>(
      "blas");
}

}  // namespace

// Results: out, m, inv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(OperaAttentionForward, AttentionForward,
                              bind_attrs(bind_inputs()).Ret<F32>().Ret<F32>().Ret<F32>());

// Further operands: m, inv, g; results: dq, dk, dv, dbias.
XLA_FFI_DEFINE_HANDLER_SYMBOL(OperaAttentionBackward, AttentionBackward,
                              bind_attrs(bind_inputs().Arg<F32>().Arg<F32>().Arg<F32>())
                                  .Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>());

// Where the products of calls with `blas` = 1 go: a CBLAS `cblas_sgemm` (cpu/attention.py passes MKL's).
extern "C" __attribute__((visibility("default"))) void OperaAttentionUseSgemm(void* fn) {
  sgemm = reinterpret_cast<Sgemm>(fn);
}
