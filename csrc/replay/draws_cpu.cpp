// CPU draws of the replay buffer, eight rows at a time (draws_cpu.h).
#include "replay/draws_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "replay/replay.h"

namespace mtrl_hpc {
namespace replay {
namespace {

void group_bits_portable(uint64_t seed, uint64_t counter, uint64_t group, uint64_t* bits) {
  for (int j = 0; j < kGroupRows / 2; ++j) {
    const Philox4 words = draw_pair(seed, counter, group * (kGroupRows / 2) + j);
    bits[2 * j] = pair_bits(words, 0);
    bits[2 * j + 1] = pair_bits(words, 1);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// philox4x32_10 (philox.h) on four counters at once. Each 64-bit lane holds one 32-bit word in its low half:
// _mm256_mul_epu32 multiplies those halves into the full 64-bit product, whose halves are the round's hi and lo.
// The high halves of lanes that hold a lo word are never cleared: XOR and the low-half multiply never carry
// them into a low half, so only the outputs are masked.
__attribute__((target("avx2"))) void group_bits_avx2(uint64_t seed, uint64_t counter, uint64_t group,
                                                      uint64_t* bits) {
  const __m256i m0 = _mm256_set1_epi64x(philox_detail::kM0), m1 = _mm256_set1_epi64x(philox_detail::kM1);
  const __m256i low = _mm256_set1_epi64x(0xFFFFFFFFu);
  const __m256i pair = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(group * (kGroupRows / 2))),
                                        _mm256_setr_epi64x(0, 1, 2, 3));
  __m256i c0 = _mm256_and_si256(pair, low), c1 = _mm256_srli_epi64(pair, 32);
  __m256i c2 = _mm256_set1_epi64x(static_cast<uint32_t>(counter));
  __m256i c3 = _mm256_set1_epi64x(static_cast<uint32_t>(counter >> 32));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    if (i > 0) {
      k0 += philox_detail::kW0;
      k1 += philox_detail::kW1;
    }
    const __m256i p0 = _mm256_mul_epu32(c0, m0), p1 = _mm256_mul_epu32(c2, m1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), _mm256_set1_epi64x(k0));
    c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), _mm256_set1_epi64x(k1));
    c1 = p1;
    c3 = p0;
  }
  const __m256i even = _mm256_or_si256(_mm256_and_si256(c0, low), _mm256_slli_epi64(c1, 32));  // rows 2j
  const __m256i odd = _mm256_or_si256(_mm256_and_si256(c2, low), _mm256_slli_epi64(c3, 32));   // rows 2j + 1
  // Interleave to row order: a = (e0, o0, e2, o2), b = (e1, o1, e3, o3) -> (e0, o0, e1, o1), (e2, o2, e3, o3).
  const __m256i a = _mm256_unpacklo_epi64(even, odd), b = _mm256_unpackhi_epi64(even, odd);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits), _mm256_permute2x128_si256(a, b, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + 4), _mm256_permute2x128_si256(a, b, 0x31));
}
const bool kHasAVX2 = __builtin_cpu_supports("avx2");
#endif

}  // namespace

void group_bits(uint64_t seed, uint64_t counter, uint64_t group, uint64_t* bits, bool vectorized) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vectorized && kHasAVX2) {
    group_bits_avx2(seed, counter, group, bits);
    return;
  }
#endif
  group_bits_portable(seed, counter, group, bits);
}

}  // namespace replay
}  // namespace mtrl_hpc
