// The random bits of sample() on the CPU, eight batch rows (four Philox pairs) at a time. Same rule as
// draw_row (replay.h), which the CUDA kernel runs. Where the CPU has AVX2 the four Philox4x32-10 calls run in
// the 64-bit lanes of one register set, far fewer instructions than four scalar calls: with the gather of a
// large buffer bound by memory, the scalar draws were the largest cost left inside sample().
#pragma once

#include <cstdint>

namespace mtrl_hpc {
namespace replay {

constexpr int64_t kGroupRows = 8;

// bits[r] = the 64 random bits of batch row kGroupRows * group + r of the sample call number `counter`.
// vectorized = false forces the portable scalar path (tests compare both); true uses AVX2 when the CPU has it.
void group_bits(uint64_t seed, uint64_t counter, uint64_t group, uint64_t* bits, bool vectorized);

// The random bits of the rows of one sample call: the group holding the row asked for is computed once and
// kept until a row of another group is asked for (rows come in order, so each group is computed once).
class RowBits {
 public:
  RowBits(uint64_t seed, uint64_t counter, bool vectorized = true)
      : seed_(seed), counter_(counter), vectorized_(vectorized) {}

  uint64_t of(int64_t row) {
    if (row / kGroupRows != group_) {
      group_ = row / kGroupRows;
      group_bits(seed_, counter_, static_cast<uint64_t>(group_), bits_, vectorized_);
    }
    return bits_[row % kGroupRows];
  }

 private:
  uint64_t seed_, counter_;
  bool vectorized_;
  int64_t group_ = -1;
  uint64_t bits_[kGroupRows];
};

}  // namespace replay
}  // namespace mtrl_hpc
