// Dense-layer matrix products for XLA:CPU through the XLA FFI: Intel oneMKL's single-threaded SGEMM,
// the rows of the result split over XLA:CPU's intra-op threads. The Python side is `opera_jax/cpu/blas.py`.
//
// XLA:CPU runs a lone dot through Eigen. For the encoder's shapes on an AVX-512 Xeon that is 15-22%
// below MKL for the weight gradients (both operands contracted over the tokens), and on two threads
// Eigen runs `[tokens, 384] @ [384, 384]` on one of them (`benchmarks/README.md`). Here every product
// is one MKL call per part, the parts (row blocks of the result, at most one per thread) taken by the
// calling thread and the pool. The same shapes and thread count give the same bits; another thread
// count may change the last bits (MKL picks its kernel by the block's size).
//
//   c = op(a) op(b), row-major f32:  a [m, k] (ta = 0) or [k, m] (ta = 1);  b [k, n] (tb = 0) or [n, k]
//   (tb = 1);  c [m, n].
//
// Linked against MKL's LP64 interface and sequential layer (no OpenMP or TBB threads of its own).

#include <algorithm>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

// MKL's CBLAS entry point (LP64: 32-bit integers); its headers are not part of the `mkl` wheel.
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr long kMinRows = 64;  // no part smaller than this many result rows

ffi::Error Gemm(ffi::ThreadPool pool, F32 a, F32 b, int64_t ta, int64_t tb, ffi::ResultBuffer<ffi::F32> c) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("opera gemm: a, b and c must be matrices");
  const long m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1];
  const long n = tb ? bd[0] : bd[1], kb = tb ? bd[1] : bd[0];
  if (k != kb || cd[0] != m || cd[1] != n)
    return ffi::Error::InvalidArgument("opera gemm: shapes do not match");
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // (a BLAS leading dimension may not be 0)
    std::fill(C, C + m * n, 0.f);
    return ffi::Error::Success();
  }
  const long threads = std::max<int64_t>(pool.num_threads(), 1);
  const long parts = std::max<long>(1, std::min(threads, m / kMinRows));
  const long rows = (m + parts - 1) / parts;
  opera::parallel_for(pool, parts, [&](long p) {
    const long r0 = p * rows, r1 = std::min(m, r0 + rows);
    if (r1 <= r0) return;
    // Rows r0.. of op(a): row r0 of a, or column r0 of a stored transposed.
    const float* a0 = ta ? A + r0 : A + r0 * ad[1];
    cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, r1 - r0, n, k, 1.f, a0, ad[1], B,
                bd[1], 0.f, C + r0 * n, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OperaGemm, Gemm,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb").Ret<F32>());
