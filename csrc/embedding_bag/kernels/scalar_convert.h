// Bit-exact scalar conversions between float and the 16-bit storage types,
// round-to-nearest-even like the F16C / AVX-512 instructions and like
// torch's own casts. Included *inside* each ISA namespace (see
// kernels_impl.h), so every ISA gets private copies: nothing here may become
// a symbol shared between translation units compiled for different ISAs.
//
// Requires: <cstdint> and <cstring> included at global scope.

struct HalfBits {
  uint16_t x;
};
struct BFloat16Bits {
  uint16_t x;
};

static inline uint32_t float_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float bits_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

static inline float to_float(float v) {
  return v;
}

static inline float to_float(HalfBits h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exponent = (h.x >> 10) & 0x1fu;
  uint32_t mantissa = h.x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else { // subnormal: normalise the mantissa
      int shift = -1;
      do {
        ++shift;
        mantissa <<= 1;
      } while ((mantissa & 0x400u) == 0);
      mantissa &= 0x3ffu;
      bits = sign | (static_cast<uint32_t>(112 - shift) << 23) | (mantissa << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  return bits_float(bits);
}

static inline float to_float(BFloat16Bits b) {
  return bits_float(static_cast<uint32_t>(b.x) << 16);
}

template <typename T>
static inline T from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

template <>
inline HalfBits from_float<HalfBits>(float v) {
  // Round-to-nearest-even float -> binary16, subnormals and overflow included.
  uint32_t u = float_bits(v);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= (143u << 23)) { // >= 65536: Inf, or NaN kept quiet
    out = (u > 0x7f800000u) ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) { // result is subnormal or zero
    // Adding this magic number lets the FPU do the RNE shift for us.
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    const float sum = bits_float(u) + bits_float(magic);
    out = static_cast<uint16_t>(float_bits(sum) - magic);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return HalfBits{static_cast<uint16_t>(out | (sign >> 16))};
}

template <>
inline BFloat16Bits from_float<BFloat16Bits>(float v) {
  const uint32_t u = float_bits(v);
  if (v != v) {
    return BFloat16Bits{0x7fc0};
  }
  const uint32_t rounding_bias = ((u >> 16) & 1u) + 0x7fffu;
  return BFloat16Bits{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

static inline float fused_multiply_add(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
