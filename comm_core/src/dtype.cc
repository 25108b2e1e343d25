#include "dtype.h"

#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PIPEDAP_F16C 1
#endif

namespace pipedap {
namespace {

// [Note: float16 with F16C]
// float16 sums and averages (what fp16 gradient compression reduces) dominate the
// reduction's cost: the portable conversions in dtype.h take about 10 ns per element,
// more than the link needs to carry it. x86 CPUs since 2012 convert 8 elements per
// instruction (F16C), with the same IEEE round-to-nearest-even, so the results are
// bit-identical (NaN payloads aside). The kernels are compiled for AVX+F16C alone and
// chosen at run time, so the library still runs on CPUs without them.
#ifdef PIPEDAP_F16C
bool cpu_has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx,f16c"))) void add_half_f16c(uint16_t* d, const uint16_t* x, const uint16_t* y,
                                                          size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_add_ps(a, b), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) d[i] = float_to_half(half_to_float(x[i]) + half_to_float(y[i]));
}

__attribute__((target("avx,f16c"))) void divide_half_f16c(uint16_t* d, size_t n, float divisor) {
  const __m256 by = _mm256_set1_ps(divisor);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_div_ps(a, by), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) d[i] = float_to_half(half_to_float(d[i]) / divisor);
}
#endif

struct Add {
  template <typename T> T operator()(T x, T y) const { return static_cast<T>(x + y); }
};
struct Minimum {
  template <typename T> T operator()(T x, T y) const { return y < x ? y : x; }
};
struct Maximum {
  template <typename T> T operator()(T x, T y) const { return x < y ? y : x; }
};
struct Multiply {
  template <typename T> T operator()(T x, T y) const { return static_cast<T>(x * y); }
};

template <typename T, typename Op>
void combine_native(void* dst, const void* a, const void* b, size_t n) {
  T* d = static_cast<T*>(dst);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  const Op op;
  for (size_t i = 0; i < n; ++i) d[i] = op(x[i], y[i]);
}

// 16-bit floats: widened to float32 for each operation and rounded back (see dtype.h).
template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float), typename Op>
void combine_16bit(void* dst, const void* a, const void* b, size_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* y = static_cast<const uint16_t*>(b);
  const Op op;
  for (size_t i = 0; i < n; ++i) d[i] = FromFloat(op(ToFloat(x[i]), ToFloat(y[i])));
}

template <typename Op>
void combine(DType t, void* dst, const void* a, const void* b, size_t n) {
#ifdef PIPEDAP_F16C
  if (t == DType::kFloat16 && std::is_same<Op, Add>::value && cpu_has_f16c()) {
    return add_half_f16c(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(a),
                         static_cast<const uint16_t*>(b), n);
  }
#endif
  switch (t) {
    case DType::kFloat32: return combine_native<float, Op>(dst, a, b, n);
    case DType::kFloat64: return combine_native<double, Op>(dst, a, b, n);
    case DType::kInt32: return combine_native<int32_t, Op>(dst, a, b, n);
    case DType::kInt64: return combine_native<int64_t, Op>(dst, a, b, n);
    case DType::kUInt8: return combine_native<uint8_t, Op>(dst, a, b, n);
    case DType::kInt8: return combine_native<int8_t, Op>(dst, a, b, n);
    case DType::kInt16: return combine_native<int16_t, Op>(dst, a, b, n);
    case DType::kFloat16: return combine_16bit<half_to_float, float_to_half, Op>(dst, a, b, n);
    case DType::kBFloat16: return combine_16bit<bf16_to_float, float_to_bf16, Op>(dst, a, b, n);
  }
  throw std::invalid_argument("reduce: unknown dtype");
}

// True division (not multiplication by 1/divisor) so that an average equals
// torch's `sum / size` bit for bit; integers truncate as C++ does.
template <typename T>
void divide_native(void* buf, size_t n, T divisor) {
  T* d = static_cast<T*>(buf);
  for (size_t i = 0; i < n; ++i) d[i] = static_cast<T>(d[i] / divisor);
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void divide_16bit(void* buf, size_t n, float divisor) {
  uint16_t* d = static_cast<uint16_t*>(buf);
  for (size_t i = 0; i < n; ++i) d[i] = FromFloat(ToFloat(d[i]) / divisor);
}

}  // namespace

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAverage: return "average";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kProduct: return "product";
  }
  return "unknown";
}

void reduce(ReduceOp op, DType t, void* dst, const void* a, const void* b, size_t n) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAverage: return combine<Add>(t, dst, a, b, n);
    case ReduceOp::kMin: return combine<Minimum>(t, dst, a, b, n);
    case ReduceOp::kMax: return combine<Maximum>(t, dst, a, b, n);
    case ReduceOp::kProduct: return combine<Multiply>(t, dst, a, b, n);
  }
  throw std::invalid_argument("reduce: unknown reduction");
}

void divide_inplace(DType t, void* buf, size_t n, int64_t divisor) {
  if (divisor == 1) return;
  switch (t) {
    case DType::kFloat32: return divide_native<float>(buf, n, static_cast<float>(divisor));
    case DType::kFloat64: return divide_native<double>(buf, n, static_cast<double>(divisor));
    case DType::kInt32: return divide_native<int32_t>(buf, n, static_cast<int32_t>(divisor));
    case DType::kInt64: return divide_native<int64_t>(buf, n, divisor);
    case DType::kUInt8: return divide_native<uint8_t>(buf, n, static_cast<uint8_t>(divisor));
    case DType::kInt8: return divide_native<int8_t>(buf, n, static_cast<int8_t>(divisor));
    case DType::kInt16: return divide_native<int16_t>(buf, n, static_cast<int16_t>(divisor));
    case DType::kFloat16:
#ifdef PIPEDAP_F16C
      if (cpu_has_f16c()) return divide_half_f16c(static_cast<uint16_t*>(buf), n, static_cast<float>(divisor));
#endif
      return divide_16bit<half_to_float, float_to_half>(buf, n, static_cast<float>(divisor));
    case DType::kBFloat16:
      return divide_16bit<bf16_to_float, float_to_bf16>(buf, n, static_cast<float>(divisor));
  }
  throw std::invalid_argument("divide_inplace: unknown dtype");
}

}  // namespace pipedap
