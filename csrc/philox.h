// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the counter-based
// generator of Random123, written once for host and device. The same (key, counter) gives the same four
// 32-bit words on CPU and CUDA, which is what lets both devices draw identical samples.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MTRL_HD __host__ __device__
#else
#define MTRL_HD
#endif

namespace mtrl_hpc {

struct Philox4 {
  uint32_t x[4];
};

namespace philox_detail {
constexpr uint32_t kM0 = 0xD2511F53u;  // multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // key increments (Weyl sequence)
constexpr uint32_t kW1 = 0xBB67AE85u;

MTRL_HD inline void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

MTRL_HD inline void round(uint32_t* c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kM0, c[0], &hi0, &lo0);
  mulhilo32(kM1, c[2], &hi1, &lo1);
  const uint32_t n0 = hi1 ^ c[1] ^ k0;
  const uint32_t n2 = hi0 ^ c[3] ^ k1;
  c[0] = n0;
  c[1] = lo1;
  c[2] = n2;
  c[3] = lo0;
}
}  // namespace philox_detail

// Philox4x32 with 10 rounds: key (k0, k1), counter (c0, c1, c2, c3).
MTRL_HD inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  uint32_t c[4] = {c0, c1, c2, c3};
  philox_detail::round(c, k0, k1);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 1; i < 10; ++i) {
    k0 += philox_detail::kW0;
    k1 += philox_detail::kW1;
    philox_detail::round(c, k0, k1);
  }
  Philox4 out;
  out.x[0] = c[0];
  out.x[1] = c[1];
  out.x[2] = c[2];
  out.x[3] = c[3];
  return out;
}

// High 64 bits of the 128-bit product a * b. Maps 64 random bits r to floor(r * n / 2^64) in [0, n).
MTRL_HD inline uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

}  // namespace mtrl_hpc
