#include "dtype.h"

namespace pipedap {
namespace {

template <typename T>
void add_native(void* dst, const void* a, const void* b, size_t n) {
  T* d = static_cast<T*>(dst);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) d[i] = x[i] + y[i];
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void add_16bit(void* dst, const void* a, const void* b, size_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* y = static_cast<const uint16_t*>(b);
  for (size_t i = 0; i < n; ++i) d[i] = FromFloat(ToFloat(x[i]) + ToFloat(y[i]));
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

void reduce_sum(DType t, void* dst, const void* a, const void* b, size_t n) {
  switch (t) {
    case DType::kFloat32: return add_native<float>(dst, a, b, n);
    case DType::kFloat64: return add_native<double>(dst, a, b, n);
    case DType::kInt32: return add_native<int32_t>(dst, a, b, n);
    case DType::kInt64: return add_native<int64_t>(dst, a, b, n);
    case DType::kUInt8: return add_native<uint8_t>(dst, a, b, n);
    case DType::kInt8: return add_native<int8_t>(dst, a, b, n);
    case DType::kFloat16: return add_16bit<half_to_float, float_to_half>(dst, a, b, n);
    case DType::kBFloat16: return add_16bit<bf16_to_float, float_to_bf16>(dst, a, b, n);
  }
  throw std::invalid_argument("reduce_sum: unknown dtype");
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
    case DType::kFloat16:
      return divide_16bit<half_to_float, float_to_half>(buf, n, static_cast<float>(divisor));
    case DType::kBFloat16:
      return divide_16bit<bf16_to_float, float_to_bf16>(buf, n, static_cast<float>(divisor));
  }
  throw std::invalid_argument("divide_inplace: unknown dtype");
}

}  // namespace pipedap
