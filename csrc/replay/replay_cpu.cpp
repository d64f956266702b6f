// CPU kernels of the replay buffer: add (write one env step) and sample (stratified draw + gather).
// The index math and the RNG come from replay.h / philox.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <type_traits>

#include "replay/draws_cpu.h"
#include "replay/replay.h"
#include "replay/replay_checks.h"

namespace mtrl_hpc {
namespace replay {
namespace {

template <typename D, typename S>
inline void convert_row(D* dst, const S* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(static_cast<float>(src[i]));
}

// Copies n values from src (dtype st) to dst (dtype dt): memcpy when the dtypes match, else a converting loop
// (rounding through float, as on the GPU).
inline void copy_row(void* dst, at::ScalarType dt, const void* src, at::ScalarType st, int64_t n) {
  if (dt == st) {
    std::memcpy(dst, src, n * c10::elementSize(dt));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "replay_copy_row", [&] {
    const auto* s = static_cast<const scalar_t*>(src);
    switch (dt) {
      case at::kFloat: convert_row(static_cast<float*>(dst), s, n); break;
      case at::kHalf: convert_row(static_cast<c10::Half*>(dst), s, n); break;
      case at::kBFloat16: convert_row(static_cast<c10::BFloat16*>(dst), s, n); break;
      default: TORCH_CHECK(false, "replay: unsupported destination dtype ", dt);
    }
  });
}

inline float read_scalar(const at::Tensor& x, int64_t i) {
  switch (x.scalar_type()) {
    case at::kFloat: return x.data_ptr<float>()[i];
    case at::kDouble: return static_cast<float>(x.data_ptr<double>()[i]);
    case at::kHalf: return static_cast<float>(x.data_ptr<c10::Half>()[i]);
    case at::kBFloat16: return static_cast<float>(x.data_ptr<c10::BFloat16>()[i]);
    case at::kBool: return x.data_ptr<bool>()[i] ? 1.f : 0.f;
    case at::kByte: return static_cast<float>(x.data_ptr<uint8_t>()[i]);
    default: TORCH_CHECK(false, "replay: unsupported dtype ", x.scalar_type());
  }
}

// Byte addresses of the rows of one stored field.
struct FieldRows {
  char* base;
  RowStrides stride;  // in bytes
  int64_t bytes;      // of one row
  char* row(int64_t t, int64_t i) const { return base + stride.at(t, i); }
};

// x is a checked store: [T, C, ...] with T, C > 0 and contiguous rows.
inline FieldRows rows_of(const at::Tensor& x) {
  const int64_t es = static_cast<int64_t>(x.element_size());
  const int64_t row_numel = x.numel() / (x.size(0) * x.size(1));
  return {static_cast<char*>(x.data_ptr()), {x.stride(0) * es, x.stride(1) * es}, row_numel * es};
}

void replay_add_cpu(at::Tensor obs_store, at::Tensor action_store, at::Tensor reward_store, at::Tensor next_obs_store,
                    at::Tensor not_done_store, at::Tensor added, const at::Tensor& obs, const at::Tensor& action,
                    const at::Tensor& reward, const at::Tensor& next_obs, const at::Tensor& done,
                    const at::Tensor& task_ids) {
  const StoreInfo s = check_stores("replay_add", obs_store, action_store, reward_store, next_obs_store, not_done_store, added);
  check_add_inputs(s, obs_store, action_store, obs, action, reward, next_obs, done, task_ids);
  const int64_t N = task_ids.size(0);
  if (N == 0) return;
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor o = obs.contiguous(), no = next_obs.contiguous(), a = action.contiguous();
  const at::Tensor r = reward.contiguous(), d = done.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* cnt = added.data_ptr<int64_t>();
  for (int64_t t = 0; t < s.num_tasks; ++t) {
    TORCH_CHECK(cnt[t] >= 0, "replay_add(): added[", t, "] = ", cnt[t], " is negative; the buffer state is corrupt");
  }
  const int64_t C = s.capacity, O = s.obs_numel, A = s.action_numel;
  const at::ScalarType st = obs_store.scalar_type();
  const size_t ib = c10::elementSize(o.scalar_type()), ab = c10::elementSize(a.scalar_type());
  const FieldRows os = rows_of(obs_store), ns = rows_of(next_obs_store), as = rows_of(action_store);
  const FieldRows rs = rows_of(reward_store), ds = rows_of(not_done_store);
  const char* op = static_cast<const char*>(o.data_ptr());
  const char* nop = static_cast<const char*>(no.data_ptr());
  const char* ap = static_cast<const char*>(a.data_ptr());
  // Rows are written in order, so repeated task ids land in consecutive ring slots.
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = id[i];
    const int64_t slot = write_slot(cnt[t], 0, C);
    copy_row(os.row(t, slot), st, op + i * O * ib, o.scalar_type(), O);
    copy_row(ns.row(t, slot), st, nop + i * O * ib, no.scalar_type(), O);
    copy_row(as.row(t, slot), at::kFloat, ap + i * A * ab, a.scalar_type(), A);
    *reinterpret_cast<float*>(rs.row(t, slot)) = read_scalar(r, i);
    *reinterpret_cast<float*>(ds.row(t, slot)) = read_scalar(d, i) != 0.f ? 0.f : 1.f;
    cnt[t] += 1;
  }
}

// Asks for the cache line holding p. Volatile asm where the compiler is GCC or Clang: GCC deletes a loop whose
// body is only __builtin_prefetch as free of side effects, which left sample() with no prefetch at all.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#elif defined(__aarch64__) && defined(__GNUC__)
  asm volatile("prfm pldl1keep, %a0" : : "p"(p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// What sample() prefetches of a stored transition: the byte range of its whole record when the five fields
// are views into one record per row (ReplayBuffer's layout: a transition is a few adjacent cache lines), else
// each field's row on its own.
struct PrefetchPlan {
  int n = 0;
  FieldRows range[5];

  explicit PrefetchPlan(const FieldRows (&fields)[5]) {
    constexpr int64_t kMaxRecordBytes = 1024;
    bool shared = true;
    char* lo = fields[0].base;
    char* hi = fields[0].base + fields[0].bytes;
    for (const FieldRows& f : fields) {
      shared = shared && f.stride.task == fields[0].stride.task && f.stride.row == fields[0].stride.row;
      lo = f.base < lo ? f.base : lo;
      hi = f.base + f.bytes > hi ? f.base + f.bytes : hi;
    }
    if (shared && hi - lo <= kMaxRecordBytes) {
      range[n++] = FieldRows{lo, fields[0].stride, hi - lo};
    } else {
      for (const FieldRows& f : fields) range[n++] = f;
    }
  }

  void prefetch(int64_t t, int64_t i) const {
    for (int k = 0; k < n; ++k) {
      const char* p = range[k].row(t, i);
      const char* end = p + range[k].bytes;
      for (p = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}); p < end; p += 64) {
        prefetch_line(p);
      }
    }
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
// float16 -> float32 with the F16C instructions (exact, like the scalar conversion, 8 values per instruction).
// The build targets plain x86-64, so this function alone is compiled for F16C and used when the CPU has it.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(float* dst, const c10::Half* src, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}
const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif

template <typename S>
inline void load_obs_row(float* dst, const S* src, int64_t n) {
  if constexpr (std::is_same_v<S, float>) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<S, c10::Half>) {
    if (kHasF16C) {
      half_to_float_f16c(dst, src, n);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Draws and copies batch rows [b0, b1). Row b + kAhead is drawn (random bits eight rows at a time from
// draws_cpu.h, then the walk along the offsets to its task) and prefetched while row b is copied: random rows
// of a large buffer come from DRAM, so several rows' cache misses overlap, and the draws run while the core
// waits for them.
template <typename S>
void sample_rows(uint64_t seed, uint64_t counter, const int64_t* off, const int64_t* cnt, int64_t T, int64_t C,
                 const FieldRows (&f)[5], const PrefetchPlan& plan, int64_t b0, int64_t b1, int64_t O, int64_t A,
                 int64_t* tid, int64_t* ind, float* oo, float* ao, float* ro, float* no, float* dout) {
  constexpr int64_t kAhead = 8;
  int64_t t = task_of_row(off, T, b0);  // task of the next row to draw
  int64_t drawn = b0;
  RowBits bits(seed, counter);
  auto draw_next = [&] {
    while (off[t + 1] <= drawn) ++t;
    tid[drawn] = t;
    ind[drawn] = row_of_bits(bits.of(drawn), fill_count(cnt[t], C));
    plan.prefetch(t, ind[drawn]);
    ++drawn;
  };
  while (drawn < b1 && drawn < b0 + kAhead) draw_next();
  for (int64_t b = b0; b < b1; ++b) {
    if (drawn < b1) draw_next();
    const int64_t tb = tid[b], i = ind[b];
    // In the order of ReplayBuffer's record (obs, next_obs, action, reward, not_done): its lines arrive in order.
    load_obs_row(oo + b * O, reinterpret_cast<const S*>(f[0].row(tb, i)), O);
    load_obs_row(no + b * O, reinterpret_cast<const S*>(f[3].row(tb, i)), O);
    std::memcpy(ao + b * A, f[1].row(tb, i), A * sizeof(float));
    ro[b] = *reinterpret_cast<const float*>(f[2].row(tb, i));
    dout[b] = *reinterpret_cast<const float*>(f[4].row(tb, i));
  }
}

void replay_sample_cpu(const at::Tensor& obs_store, const at::Tensor& action_store, const at::Tensor& reward_store,
                       const at::Tensor& next_obs_store, const at::Tensor& not_done_store, const at::Tensor& added,
                       const at::Tensor& offsets, int64_t seed, int64_t counter, at::Tensor obs, at::Tensor action,
                       at::Tensor reward, at::Tensor next_obs, at::Tensor not_done, at::Tensor task_ids,
                       at::Tensor indices) {
  const StoreInfo s = check_stores("replay_sample", obs_store, action_store, reward_store, next_obs_store,
                                   not_done_store, added);
  const int64_t B = check_sample_args(s, obs_store, action_store, offsets, obs, action, reward, next_obs, not_done,
                                      task_ids, indices);
  const int64_t T = s.num_tasks, C = s.capacity, O = s.obs_numel, A = s.action_numel;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* cnt = added.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[T] == B, "replay_sample(): offsets must start at 0 and end at the batch size ", B,
              ", got ", off[0], " and ", off[T]);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(cnt[t] >= 0, "replay_sample(): added[", t, "] = ", cnt[t], " is negative; the buffer state is corrupt");
    TORCH_CHECK(off[t + 1] >= off[t], "replay_sample(): offsets must be non-decreasing (rows per task >= 0), task ",
                t, " has ", off[t + 1] - off[t]);
    TORCH_CHECK(off[t + 1] == off[t] || cnt[t] > 0, "replay_sample(): task ", t, " is asked for ", off[t + 1] - off[t],
                " rows but holds no data; add transitions for it first or give it weight 0");
  }
  int64_t* ind = indices.data_ptr<int64_t>();
  int64_t* tid = task_ids.data_ptr<int64_t>();
  const uint64_t useed = static_cast<uint64_t>(seed), uctr = static_cast<uint64_t>(counter);
  // Rows are split over at most a few threads (grain kGrainRows): with 1280 rows two threads overlap twice as
  // many cache misses, which is what bounds this loop; small batches stay on the calling thread.
  constexpr int64_t kGrainRows = 512;
  const FieldRows fields[5] = {rows_of(obs_store), rows_of(action_store), rows_of(reward_store),
                               rows_of(next_obs_store), rows_of(not_done_store)};
  const PrefetchPlan plan(fields);
  float* oo = obs.data_ptr<float>();
  float* ao = action.data_ptr<float>();
  float* ro = reward.data_ptr<float>();
  float* no = next_obs.data_ptr<float>();
  float* dout = not_done.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, obs_store.scalar_type(), "replay_sample_cpu", [&] {
    at::parallel_for(0, B, kGrainRows, [&](int64_t b0, int64_t b1) {
      sample_rows<scalar_t>(useed, uctr, off, cnt, T, C, fields, plan, b0, b1, O, A, tid, ind, oo, ao, ro, no, dout);
    });
  });
}

// Raw Philox4x32-10 words for testing: counters [N, 4] int64 holding uint32 values, key = 64-bit seed.
at::Tensor replay_philox_cpu(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, "replay_philox(): counters must be [N, 4], got ",
              shape_str(counters.sizes()));
  TORCH_CHECK(counters.scalar_type() == at::kLong, "replay_philox(): counters must be int64, got ",
              counters.scalar_type());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  const uint64_t k = static_cast<uint64_t>(seed);
  for (int64_t i = 0; i < c.size(0); ++i) {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(cp[4 * i]), static_cast<uint32_t>(cp[4 * i + 1]),
                                    static_cast<uint32_t>(cp[4 * i + 2]), static_cast<uint32_t>(cp[4 * i + 3]),
                                    static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32));
    for (int j = 0; j < 4; ++j) op[4 * i + j] = static_cast<int64_t>(r.x[j]);
  }
  return out;
}

// The 64 random bits sample() draws for batch rows [first_row, first_row + num_rows) of sample call `counter`,
// as int64 (same bits), through the RowBits that sample() uses; vectorized = false forces the portable path.
at::Tensor replay_row_bits_cpu(int64_t seed, int64_t counter, int64_t first_row, int64_t num_rows, bool vectorized) {
  TORCH_CHECK(first_row >= 0 && num_rows >= 0 && num_rows <= INT64_MAX - first_row,
              "replay_row_bits(): first_row and num_rows must be >= 0 with first_row + num_rows < 2^63, got ",
              first_row, " and ", num_rows);
  at::Tensor out = at::empty({num_rows}, at::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  RowBits bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(counter), vectorized);
  for (int64_t r = first_row; r < first_row + num_rows; ++r) op[r - first_row] = static_cast<int64_t>(bits.of(r));
  return out;
}

}  // namespace
}  // namespace replay
}  // namespace mtrl_hpc

TORCH_LIBRARY_IMPL(mtrl_hpc, CPU, m) {
  m.impl("replay_add", &mtrl_hpc::replay::replay_add_cpu);
  m.impl("replay_sample", &mtrl_hpc::replay::replay_sample_cpu);
  m.impl("replay_philox", &mtrl_hpc::replay::replay_philox_cpu);
}

// replay_row_bits takes no tensor to dispatch on, so its one (host) kernel serves every key.
TORCH_LIBRARY_IMPL(mtrl_hpc, CompositeExplicitAutograd, m) {
  m.impl("replay_row_bits", &mtrl_hpc::replay::replay_row_bits_cpu);
}
