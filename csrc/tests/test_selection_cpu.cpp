// Unit tests of the CPU selection kernels (csrc/cpu/selection_cpu.cpp) and of MoBA routing
// (csrc/cpu/moba_route_cpu.cpp), calling sparse_attn::cpu:: directly on small hand-computed
// cases. No test framework: CHECK counts failures and main returns non-zero when any test failed.
// Built and run by CMake/ctest (see CMakeLists.txt and scripts/run_ctest.sh).

#include "cpu/moba_route_cpu.h"
#include "cpu/selection_cpu.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace sc = sparse_attn::cpu;

int g_check_failures = 0;  // failures within the running test
int g_checks = 0;

void report_failure(const char* file, int line, const std::string& what) {
  ++g_check_failures;
  std::printf("    FAILED %s:%d: %s\n", file, line, what.c_str());
}

// c10/util/Logging.h defines a glog-style CHECK that aborts; replace it with a counting one.
#undef CHECK
#define CHECK(cond)                                                   \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) report_failure(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_MSG(cond, msg)                                                  \
  do {                                                                        \
    ++g_checks;                                                               \
    if (!(cond)) {                                                            \
      std::ostringstream os_;                                                 \
      os_ << "CHECK(" #cond "): " << msg;                                     \
      report_failure(__FILE__, __LINE__, os_.str());                          \
    }                                                                         \
  } while (0)

// Expects `expr` to throw c10::Error (what TORCH_CHECK throws).
#define CHECK_THROWS(expr)                                                               \
  do {                                                                                   \
    ++g_checks;                                                                          \
    bool threw_ = false;                                                                 \
    try {                                                                                \
      (void)(expr);                                                                      \
    } catch (const c10::Error&) {                                                        \
      threw_ = true;                                                                     \
    }                                                                                    \
    if (!threw_) report_failure(__FILE__, __LINE__, "expected c10::Error from: " #expr); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Helpers

template <typename T>
at::Tensor make(std::vector<T> values, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor t = at::tensor(at::ArrayRef<T>(values), at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return t.reshape(shape).to(dtype).contiguous();
}

at::Tensor ints(std::vector<int32_t> v, at::IntArrayRef shape) { return make<int32_t>(std::move(v), shape, at::kInt); }
at::Tensor floats(std::vector<double> v, at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return make<double>(std::move(v), shape, dtype);
}
at::Tensor bools(std::vector<int> v, at::IntArrayRef shape) {
  std::vector<int32_t> w(v.begin(), v.end());
  return make<int32_t>(std::move(w), shape, at::kBool);
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

template <typename T>
std::string join(const std::vector<T>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

std::vector<int64_t> int_values(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::vector<double> double_values(const at::Tensor& t) {
  at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// Exact comparison of an int tensor with expected values and shape.
#define CHECK_INTS(tensor, shape, ...)                                                                   \
  do {                                                                                                   \
    const at::Tensor t_ = (tensor);                                                                      \
    const std::vector<int64_t> want_ = __VA_ARGS__;                                                      \
    const std::vector<int64_t> want_shape_ = shape;                                                      \
    CHECK_MSG(t_.scalar_type() == at::kInt, #tensor " dtype is " << t_.scalar_type() << ", want Int");   \
    CHECK_MSG(t_.sizes() == at::IntArrayRef(want_shape_),                                                \
              #tensor " shape is " << shape_str(t_.sizes()) << ", want " << join(want_shape_));          \
    if (t_.sizes() == at::IntArrayRef(want_shape_)) {                                                    \
      const auto got_ = int_values(t_);                                                                  \
      CHECK_MSG(got_ == want_, #tensor " is " << join(got_) << ", want " << join(want_));                \
    }                                                                                                    \
  } while (0)

#define CHECK_CLOSE(tensor, dtype, shape, tol, ...)                                                       \
  do {                                                                                                   \
    const at::Tensor t_ = (tensor);                                                                      \
    const std::vector<double> want_ = __VA_ARGS__;                                                       \
    const std::vector<int64_t> want_shape_ = shape;                                                      \
    CHECK_MSG(t_.scalar_type() == (dtype), #tensor " dtype is " << t_.scalar_type() << ", want " << (dtype)); \
    CHECK_MSG(t_.sizes() == at::IntArrayRef(want_shape_),                                                \
              #tensor " shape is " << shape_str(t_.sizes()) << ", want " << join(want_shape_));          \
    if (t_.sizes() == at::IntArrayRef(want_shape_)) {                                                    \
      const auto got_ = double_values(t_);                                                               \
      bool ok_ = true;                                                                                   \
      for (size_t i_ = 0; i_ < want_.size(); ++i_) ok_ = ok_ && std::abs(got_[i_] - want_[i_]) <= (tol); \
      CHECK_MSG(ok_, #tensor " is " << join(got_) << ", want " << join(want_));                          \
    }                                                                                                    \
  } while (0)

#define SHAPE(...) std::vector<int64_t>{__VA_ARGS__}
#define VALUES(...) {__VA_ARGS__}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// block_mean_pool

void test_block_mean_pool_float_ragged() {
  // keys[0, h, s, d] = 100 h + 10 s + d, S = 5, block 2: blocks {0,1}, {2,3}, {4} (ragged).
  std::vector<double> v;
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 5; ++s)
      for (int d = 0; d < 2; ++d) v.push_back(100 * h + 10 * s + d);
  const at::Tensor keys = floats(v, {1, 2, 5, 2});
  CHECK_CLOSE(sc::block_mean_pool(keys, 2), at::kFloat, SHAPE(1, 2, 3, 2), 1e-5,
              VALUES(5, 6, 25, 26, 40, 41, 105, 106, 125, 126, 140, 141));
  // block 3: {0,1,2}, {3,4}
  CHECK_CLOSE(sc::block_mean_pool(keys, 3), at::kFloat, SHAPE(1, 2, 2, 2), 1e-5,
              VALUES(10, 11, 35, 36, 110, 111, 135, 136));
  // block larger than S: one block, the mean over all 5 keys; block 1: identity.
  CHECK_CLOSE(sc::block_mean_pool(keys, 8), at::kFloat, SHAPE(1, 2, 1, 2), 1e-5, VALUES(20, 21, 120, 121));
  CHECK_CLOSE(sc::block_mean_pool(keys, 1), at::kFloat, SHAPE(1, 2, 5, 2), 0, v);
}

void test_block_mean_pool_double() {
  // Accumulates and returns float64 for float64 keys: exact double arithmetic.
  const at::Tensor keys = floats({0.1, 0.2, 0.7, 1.0 / 3, 2.0 / 3, 1.0}, {2, 1, 3, 1}, at::kDouble);
  const at::Tensor out = sc::block_mean_pool(keys, 2);
  CHECK_CLOSE(out, at::kDouble, SHAPE(2, 1, 2, 1), 1e-15, VALUES((0.1 + 0.2) / 2, 0.7, 0.5, 1.0));
}

void test_block_mean_pool_half() {
  // Half (and bfloat16) keys are accumulated and returned in float32.
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor keys = floats({0.5, -1.0, 1.5, 2.0, 2.5, 4.0}, {1, 1, 3, 2}, dtype);
    CHECK_CLOSE(sc::block_mean_pool(keys, 2), at::kFloat, SHAPE(1, 1, 2, 2), 0, VALUES(1.0, 0.5, 2.5, 4.0));
  }
  // A sum that overflows half (3 x 60000 > 65504) stays finite because accumulation is float32.
  const at::Tensor big = floats({60000, 60000, 60000}, {1, 1, 3, 1}, at::kHalf);
  const at::Tensor out = sc::block_mean_pool(big, 3);
  CHECK_CLOSE(out, at::kFloat, SHAPE(1, 1, 1, 1), 64, VALUES(60000));
}

void test_block_mean_pool_noncontiguous_and_errors() {
  // [B, S, H, D] storage viewed as [B, H, S, D].
  const at::Tensor bshd = floats({1, 2, 3, 4, 5, 6, 7, 8}, {1, 4, 2, 1});  // keys[s, h] = 1 + 2 s + h
  const at::Tensor keys = bshd.transpose(1, 2);
  CHECK(!keys.is_contiguous());
  CHECK_CLOSE(sc::block_mean_pool(keys, 3), at::kFloat, SHAPE(1, 2, 2, 1), 1e-6, VALUES(3, 7, 4, 8));
  CHECK_THROWS(sc::block_mean_pool(floats({1, 2}, {1, 2, 1}), 1));
  CHECK_THROWS(sc::block_mean_pool(floats({1, 2}, {1, 1, 2, 1}), 0));
}

// ---------------------------------------------------------------------------------------------
// topk_rows

void test_topk_ties_lower_index_wins() {
  const at::Tensor s = floats({1, 3, 3, 2, 3}, {1, 5});
  CHECK_INTS(sc::topk_rows(s, 3), SHAPE(1, 3), VALUES(1, 2, 4));
  CHECK_INTS(sc::topk_rows(s, 4), SHAPE(1, 4), VALUES(1, 2, 4, 3));
  CHECK_INTS(sc::topk_rows(s, 1), SHAPE(1, 1), VALUES(1));
  // All equal: index order.
  CHECK_INTS(sc::topk_rows(floats({7, 7, 7, 7}, {1, 4}), 3), SHAPE(1, 3), VALUES(0, 1, 2));
  // Several rows, float64, in rank order (not index order).
  const at::Tensor d = floats({0.5, -2, 4, 4, 0, 9, 9, 1}, {2, 4}, at::kDouble);
  CHECK_INTS(sc::topk_rows(d, 2), SHAPE(2, 2), VALUES(2, 3, 1, 2));
  CHECK_INTS(sc::topk_rows(d, 4), SHAPE(2, 4), VALUES(2, 3, 0, 1, 1, 2, 3, 0));
}

void test_topk_never_selects_neg_inf_or_nan() {
  // +inf is a score like any other; -inf and NaN are never selected.
  const at::Tensor s = floats({kNaN, 1, -kInf, kInf, 1, -5}, {1, 6});
  CHECK_INTS(sc::topk_rows(s, 4), SHAPE(1, 4), VALUES(3, 1, 4, 5));
  CHECK_INTS(sc::topk_rows(s, 6), SHAPE(1, 6), VALUES(3, 1, 4, 5, -1, -1));
  const at::Tensor none = floats({kNaN, -kInf, -kInf, kNaN}, {2, 2}, at::kDouble);
  CHECK_INTS(sc::topk_rows(none, 2), SHAPE(2, 2), VALUES(-1, -1, -1, -1));
}

void test_topk_k_larger_than_selectable_pads() {
  const at::Tensor s = floats({2, 1, 3, -kInf, 0, kNaN}, {2, 3});
  CHECK_INTS(sc::topk_rows(s, 5), SHAPE(2, 5), VALUES(2, 0, 1, -1, -1, 1, -1, -1, -1, -1));
  CHECK_INTS(sc::topk_rows(s, 0), SHAPE(2, 0), VALUES());
  // Zero rows.
  CHECK_INTS(sc::topk_rows(floats({}, {0, 3}), 2), SHAPE(0, 2), VALUES());
}

void test_topk_errors() {
  CHECK_THROWS(sc::topk_rows(floats({1, 2}, {2}), 1));              // not 2-D
  CHECK_THROWS(sc::topk_rows(ints({1, 2}, {1, 2}), 1));             // not floating
  CHECK_THROWS(sc::topk_rows(floats({1, 2}, {1, 2}), -1));          // negative k
}

// ---------------------------------------------------------------------------------------------
// threshold_select: forced first, then allowed entries by descending score (ties to the lower
// index); an unforced entry is kept iff the exclusive prefix mass before it < tau * sum(allowed).

std::tuple<at::Tensor, at::Tensor> run_select(std::vector<double> scores, int64_t rows, std::vector<double> tau,
                                              std::vector<int> forced, std::vector<int> allowed,
                                          at::ScalarType dtype = at::kFloat) {
  const int64_t n = static_cast<int64_t>(scores.size()) / rows;
  return sc::threshold_select(floats(scores, {rows, n}, dtype), floats(tau, {rows}, at::kDouble), bools(forced, {rows, n}),
                              bools(allowed, {rows, n}));
}

void test_threshold_zero_keeps_only_forced() {
  auto [count, idx] = run_select({1, 4, 2, 3, 1, 4, 2, 3}, 2, {0, 0}, {0, 0, 1, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1});
  CHECK_INTS(count, SHAPE(2), VALUES(1, 0));
  CHECK_INTS(idx, SHAPE(2, 4), VALUES(2, -1, -1, -1, -1, -1, -1, -1));
}

void test_threshold_one_keeps_all_allowed() {
  // tau >= 1 keeps every allowed entry (also zero-score ones), and never a disallowed one.
  auto [count, idx] = run_select({1, 9, 0, 3, 0, 5, 0, 0}, 2, {1.0, 1.5}, {0, 0, 0, 0, 0, 0, 0, 0}, {1, 0, 1, 1, 1, 1, 0, 1});
  CHECK_INTS(count, SHAPE(2), VALUES(3, 3));
  CHECK_INTS(idx, SHAPE(2, 4), VALUES(0, 2, 3, -1, 0, 1, 3, -1));
  // Just below 1, zero-score entries add no mass and are not needed.
  auto [c2, i2] = run_select({1, 0, 0}, 1, {0.999}, {0, 0, 0}, {1, 1, 1});
  CHECK_INTS(c2, SHAPE(1), VALUES(1));
  CHECK_INTS(i2, SHAPE(1, 3), VALUES(0, -1, -1));
}

void test_threshold_mid_case_with_crossing_entry() {
  // scores [1, 4, 2, 3], total 10, rank order 1 (4), 3 (3), 2 (2), 0 (1); exclusive prefixes 0, 4, 7, 9.
  //   tau 0.6 -> required 6: keep 1 (0 < 6), 3 (4 < 6, the entry that crosses 6), not 2 (7).
  //   tau 0.4 -> required 4: keep 1 only: the prefix before 3 is exactly 4 and 4 < 4 is false.
  //   tau 0.75 -> required 7.5: keep 1, 3, 2 (7 < 7.5), not 0 (9).
  const std::vector<double> s = {1, 4, 2, 3, 1, 4, 2, 3, 1, 4, 2, 3};
  auto [count, idx] = run_select(s, 3, {0.6, 0.4, 0.75}, std::vector<int>(12, 0), std::vector<int>(12, 1));
  CHECK_INTS(count, SHAPE(3), VALUES(2, 1, 3));
  CHECK_INTS(idx, SHAPE(3, 4), VALUES(1, 3, -1, -1, 1, -1, -1, -1, 1, 2, 3, -1));
  // Same in float64.
  auto [cd, id] = run_select(s, 3, {0.6, 0.4, 0.75}, std::vector<int>(12, 0), std::vector<int>(12, 1), at::kDouble);
  CHECK_INTS(cd, SHAPE(3), VALUES(2, 1, 3));
  CHECK_INTS(id, SHAPE(3, 4), VALUES(1, 3, -1, -1, 1, -1, -1, -1, 1, 2, 3, -1));
}

void test_threshold_ties_lower_index_first() {
  // scores [2, 3, 3, 2], total 10, rank order 1, 2, 0, 3; exclusive prefixes 0, 3, 6, 8.
  const std::vector<double> s = {2, 3, 3, 2, 2, 3, 3, 2, 2, 3, 3, 2};
  auto [count, idx] = run_select(s, 3, {0.3, 0.5, 0.75}, std::vector<int>(12, 0), std::vector<int>(12, 1));
  CHECK_INTS(count, SHAPE(3), VALUES(1, 2, 3));
  CHECK_INTS(idx, SHAPE(3, 4), VALUES(1, -1, -1, -1, 1, 2, -1, -1, 0, 1, 2, -1));
}

void test_threshold_forced_mass_counts() {
  // scores [1, 4, 2, 3], forced {0, 3} (mass 4) lead; tau 0.6 -> required 6:
  // entry 1 has prefix 4 < 6 -> kept; entry 2 has prefix 8 -> dropped.
  // (Without the forced mass, 1 and 2 would both be kept.)
  auto [count, idx] = run_select({1, 4, 2, 3}, 1, {0.6}, {1, 0, 0, 1}, {1, 1, 1, 1});
  CHECK_INTS(count, SHAPE(1), VALUES(3));
  CHECK_INTS(idx, SHAPE(1, 4), VALUES(0, 1, 3, -1));
  // Forced mass alone reaching the target: nothing else is kept.
  auto [c2, i2] = run_select({1, 4, 2, 3}, 1, {0.3}, {0, 1, 0, 0}, {1, 1, 1, 1});
  CHECK_INTS(c2, SHAPE(1), VALUES(1));
  CHECK_INTS(i2, SHAPE(1, 4), VALUES(1, -1, -1, -1));
}

void test_threshold_forced_but_disallowed() {
  // Entry 0 is forced but not allowed: kept, but its score is no mass (total = 4 + 2 + 3 = 9).
  // tau 0.5 -> required 4.5: keep 1 (prefix 0), 3 (prefix 4), not 2 (prefix 7).
  auto [count, idx] = run_select({5, 4, 2, 3}, 1, {0.5}, {1, 0, 0, 0}, {0, 1, 1, 1});
  CHECK_INTS(count, SHAPE(1), VALUES(3));
  CHECK_INTS(idx, SHAPE(1, 4), VALUES(0, 1, 3, -1));
}

void test_threshold_disallowed_never_kept() {
  // The large score at 0 is disallowed: not kept and not in the total (3): tau 0.5 -> 1.5.
  const std::vector<int> allowed = {0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0};
  auto [count, idx] = run_select({9, 1, 1, 1, 9, 1, 1, 1, 9, 1, 1, 1}, 3, {0.5, 1.0, 1.0}, std::vector<int>(12, 0), allowed);
  CHECK_INTS(count, SHAPE(3), VALUES(2, 3, 0));
  CHECK_INTS(idx, SHAPE(3, 4), VALUES(1, 2, -1, -1, 1, 2, 3, -1, -1, -1, -1, -1));
}

void test_threshold_errors() {
  const at::Tensor s = floats({1, 2, 3, 4}, {2, 2});
  const at::Tensor b = bools({1, 1, 1, 1}, {2, 2});
  CHECK_THROWS(sc::threshold_select(s, floats({0.5}, {1}), b, b));                       // threshold shape
  CHECK_THROWS(sc::threshold_select(s, floats({0.5, 0.5}, {2}), bools({1, 1}, {1, 2}), b));  // forced shape
  CHECK_THROWS(sc::threshold_select(s, floats({0.5, 0.5}, {2}), ints({1, 1, 1, 1}, {2, 2}), b));  // dtype
  CHECK_THROWS(sc::threshold_select(ints({1, 2, 3, 4}, {2, 2}), floats({0.5, 0.5}, {2}), b, b));
}

// ---------------------------------------------------------------------------------------------
// layout_transpose

void test_layout_transpose_example() {
  // B = 1, H = 2, Mq = 3 query blocks, N = 4 KV blocks, Nmax = 3.
  //   head 0: q0 -> {0}, q1 -> {0, 2}, q2 -> {1, 2, 3}
  //   head 1: q0 -> {3}, q1 -> {},     q2 -> {0, 3}
  const at::Tensor kv_num = ints({1, 2, 3, 1, 0, 2}, {1, 2, 3});
  const at::Tensor kv_idx = ints({0, -1, -1, 0, 2, -1, 1, 2, 3,  //
                                  3, -1, -1, -1, -1, -1, 0, 3, -1},
                                 {1, 2, 3, 3});
  auto [q_num, q_idx] = sc::layout_transpose(kv_num, kv_idx, 4);
  //   head 0: k0 <- {0, 1}, k1 <- {2}, k2 <- {1, 2}, k3 <- {2}
  //   head 1: k0 <- {2},    k1 <- {},  k2 <- {},     k3 <- {0, 2}
  CHECK_INTS(q_num, SHAPE(1, 2, 4), VALUES(2, 1, 2, 1, 1, 0, 0, 2));
  CHECK_INTS(q_idx, SHAPE(1, 2, 4, 3),
             VALUES(0, 1, -1, 2, -1, -1, 1, 2, -1, 2, -1, -1,  //
                    2, -1, -1, -1, -1, -1, -1, -1, -1, 0, 2, -1));
  // Entries past a row's count are ignored, whatever they hold.
  at::Tensor junk = kv_idx.clone();
  junk.index_put_({0, 0, 0, 1}, 7);
  junk.index_put_({0, 1, 1, 0}, -9);
  auto [q_num2, q_idx2] = sc::layout_transpose(kv_num, junk, 4);
  CHECK(q_num2.equal(q_num));
  CHECK(q_idx2.equal(q_idx));
  // More KV blocks than referenced: trailing empty lists.
  auto [q_num3, q_idx3] = sc::layout_transpose(kv_num, kv_idx, 5);
  CHECK_INTS(q_num3.select(2, 4), SHAPE(1, 2), VALUES(0, 0));
  CHECK_INTS(q_idx3.select(2, 4), SHAPE(1, 2, 3), VALUES(-1, -1, -1, -1, -1, -1));
}

void test_layout_transpose_round_trip() {
  // Pseudo-random block masks, B = 2, H = 3, Mq = 5, N = 7, lists padded to Nmax = N.
  const int64_t B = 2, H = 3, Mq = 5, N = 7;
  uint32_t state = 12345;
  auto next = [&] { return (state = state * 1664525u + 1013904223u) >> 16; };
  std::vector<int> dense(B * H * Mq * N);
  for (auto& x : dense) x = (next() % 3 == 0);
  std::vector<int32_t> kv_num(B * H * Mq, 0), kv_idx(B * H * Mq * N, -1);
  std::vector<int32_t> want_q_num(B * H * N, 0), want_q_idx(B * H * N * Mq, -1);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t m = 0; m < Mq; ++m)
      for (int64_t n = 0; n < N; ++n)
        if (dense[(bh * Mq + m) * N + n]) {
          kv_idx[(bh * Mq + m) * N + kv_num[bh * Mq + m]++] = static_cast<int32_t>(n);
          want_q_idx[(bh * N + n) * Mq + want_q_num[bh * N + n]++] = static_cast<int32_t>(m);
        }
  const at::Tensor kv_num_t = ints(kv_num, {B, H, Mq}), kv_idx_t = ints(kv_idx, {B, H, Mq, N});
  auto [q_num, q_idx] = sc::layout_transpose(kv_num_t, kv_idx_t, N);
  CHECK_INTS(q_num, SHAPE(B, H, N), std::vector<int64_t>(want_q_num.begin(), want_q_num.end()));
  CHECK_INTS(q_idx, SHAPE(B, H, N, Mq), std::vector<int64_t>(want_q_idx.begin(), want_q_idx.end()));
  auto [back_num, back_idx] = sc::layout_transpose(q_num, q_idx, Mq);
  CHECK_MSG(back_num.equal(kv_num_t), "round trip counts differ");
  CHECK_MSG(back_idx.equal(kv_idx_t), "round trip indices differ");
}

void test_layout_transpose_errors() {
  const at::Tensor kv_num = ints({2, 1}, {1, 1, 2});
  // Out-of-range index (>= num_kv_blocks, negative), count above Nmax or negative.
  CHECK_THROWS(sc::layout_transpose(kv_num, ints({0, 4, 1, -1}, {1, 1, 2, 2}), 4));
  CHECK_THROWS(sc::layout_transpose(kv_num, ints({0, 1, -1, -1}, {1, 1, 2, 2}), 4));
  CHECK_THROWS(sc::layout_transpose(ints({3, 1}, {1, 1, 2}), ints({0, 1, 2, -1}, {1, 1, 2, 2}), 4));
  CHECK_THROWS(sc::layout_transpose(ints({-1, 1}, {1, 1, 2}), ints({0, 1, 2, -1}, {1, 1, 2, 2}), 4));
  // Wrong dtypes / ranks.
  CHECK_THROWS(sc::layout_transpose(kv_num.to(at::kLong), ints({0, 1, 2, -1}, {1, 1, 2, 2}), 4));
  CHECK_THROWS(sc::layout_transpose(ints({2}, {1, 2}), ints({0, 1, 2, -1}, {1, 1, 2, 2}), 4));
  CHECK_THROWS(sc::layout_transpose(kv_num, ints({0, 1, 2, -1}, {1, 1, 2, 2}), -1));
  // Duplicate index in one row when the KV block's list overflows Mq (Mq = 1): detected.
  CHECK_THROWS(sc::layout_transpose(ints({2}, {1, 1, 1}), ints({0, 0}, {1, 1, 1, 2}), 2));
  // Duplicate index in one row that does not overflow Mq (Mq = 2, q0 -> {1, 1}).
  CHECK_THROWS(sc::layout_transpose(ints({2, 0}, {1, 1, 2}), ints({1, 1, -1, -1}, {1, 1, 2, 2}), 3));
  // kv_indices whose [B, H, Mq] differ from kv_num_blocks' shape (would read out of bounds).
  CHECK_THROWS(sc::layout_transpose(ints({0, 0, 0}, {1, 1, 3}), ints({0, 1}, {1, 1, 1, 2}), 2));
}

// ---------------------------------------------------------------------------------------------
// moba_route

// Keys of one head with D = 1 and block 2: block means [1, 3, 2, 5]; with q = 1 scores equal means.
at::Tensor moba_keys() { return floats({1, 1, 3, 3, 2, 2, 5, 5}, {1, 1, 8, 1}); }

void test_moba_route_causal() {
  const at::Tensor q = floats({1, 1, 1, 1, 1, 1, 1, 1}, {1, 1, 8, 1});
  // Rows 0-1 have no past block; rows 2-3 only block 0; rows 4-5 blocks {0, 1}, best 1 (3);
  // rows 6-7 blocks {0, 1, 2}, best 1 (3) then 2 (2). The current block is always there.
  CHECK_INTS(sc::moba_route(q, moba_keys(), 2, 2, true), SHAPE(1, 1, 8, 2),
             VALUES(0, -1, 0, -1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 3, 1, 3));
  CHECK_INTS(sc::moba_route(q, moba_keys(), 2, 3, true), SHAPE(1, 1, 8, 3),
             VALUES(0, -1, -1, 0, -1, -1, 0, 1, -1, 0, 1, -1, 0, 1, 2, 0, 1, 2, 1, 2, 3, 1, 2, 3));
  // topk = 1: the current block alone.
  CHECK_INTS(sc::moba_route(q, moba_keys(), 2, 1, true), SHAPE(1, 1, 8, 1), VALUES(0, 0, 1, 1, 2, 2, 3, 3));
}

void test_moba_route_gqa_decode_row() {
  // One query row at position 7 (Sq = 1 < Skv = 8), two query heads sharing the KV head:
  // head 0 (q = 1) prefers block 1 (score 3), head 1 (q = -1) block 0 (score -1).
  CHECK_INTS(sc::moba_route(floats({1, -1}, {1, 2, 1, 1}), moba_keys(), 2, 2, true), SHAPE(1, 2, 1, 2),
             VALUES(1, 3, 0, 3));
}

void test_moba_route_noncausal_ragged_and_ties() {
  // Keys [1, 1, 3, 3, 10], block 2: means [1, 3, 10], the ragged last block over its one key.
  const at::Tensor keys = floats({1, 1, 3, 3, 10}, {1, 1, 5, 1});
  CHECK_INTS(sc::moba_route(floats({1, -1}, {1, 1, 2, 1}), keys, 2, 2, false), SHAPE(1, 1, 2, 2),
             VALUES(1, 2, 0, 1));
  // Equal scores: the lower blocks win; topk above the block count pads with -1.
  const at::Tensor flat = floats({2, 2, 2, 2, 2}, {1, 1, 5, 1});
  CHECK_INTS(sc::moba_route(floats({1}, {1, 1, 1, 1}), flat, 2, 2, false), SHAPE(1, 1, 1, 2), VALUES(0, 1));
  CHECK_INTS(sc::moba_route(floats({1}, {1, 1, 1, 1}), flat, 2, 4, false), SHAPE(1, 1, 1, 4), VALUES(0, 1, 2, -1));
  CHECK_INTS(sc::moba_route(floats({1}, {1, 1, 1, 1}, at::kDouble), flat.to(at::kDouble), 1, 3, true),
             SHAPE(1, 1, 1, 3), VALUES(0, 1, 4));
}

void test_moba_route_errors() {
  const at::Tensor q = floats({1, 1}, {1, 2, 1, 1});
  CHECK_THROWS(sc::moba_route(q, moba_keys(), 2, 0, true));  // topk < 1
  CHECK_THROWS(sc::moba_route(q, moba_keys(), 0, 2, true));  // block_size < 1
  CHECK_THROWS(sc::moba_route(q.to(at::kDouble), moba_keys(), 2, 2, true));  // dtype mismatch
  CHECK_THROWS(sc::moba_route(floats({1, 1}, {2, 1, 1}), moba_keys(), 2, 2, true));  // rank
  // 3 query heads over 2 KV heads; 9 query rows over 8 keys.
  CHECK_THROWS(sc::moba_route(floats({1, 1, 1}, {1, 3, 1, 1}), moba_keys().view({1, 2, 4, 1}), 2, 2, true));
  CHECK_THROWS(sc::moba_route(floats(std::vector<double>(9, 1), {1, 1, 9, 1}), moba_keys(), 2, 2, true));
}

void test_moba_route_varlen_packed() {
  // Two packed sequences of D = 1, block 2: keys [1, 1, 3, 3 | 2, 2, 5] (means [1, 3] and [2, 5],
  // the second's last block ragged); queries [1, -1 | -1] (Lq 2 and 1, max_seqlen_q 2).
  const at::Tensor keys = floats({1, 1, 3, 3, 2, 2, 5}, {7, 1, 1});
  const at::Tensor q = floats({1, -1, -1}, {3, 1, 1});
  const at::Tensor cu_q = ints({0, 2, 3}, {3}), cu_k = ints({0, 4, 7}, {3});
  // Non-causal top-1: q = 1 takes the larger mean, q = -1 the smaller; seq 1's missing row is -1.
  CHECK_INTS(sc::moba_route_varlen(q, keys, cu_q, cu_k, 2, 2, 1, false), SHAPE(2, 1, 2, 1), VALUES(1, 0, 0, -1));
  // Causal top-2, bottom-right aligned per sequence: every row sits in its block 1 with block 0 past.
  CHECK_INTS(sc::moba_route_varlen(q, keys, cu_q, cu_k, 2, 2, 2, true), SHAPE(2, 1, 2, 2),
             VALUES(0, 1, 0, 1, 0, 1, -1, -1));
}

void test_moba_route_varlen_errors() {
  const at::Tensor keys = floats({1, 1, 3, 3, 2, 2, 5}, {7, 1, 1});
  const at::Tensor q = floats({1, -1, -1}, {3, 1, 1});
  const at::Tensor cu_k = ints({0, 4, 7}, {3});
  CHECK_THROWS(sc::moba_route_varlen(q, keys, ints({0, 3, 3}, {3}), cu_k, 2, 2, 1, true));  // max_seqlen_q
  CHECK_THROWS(sc::moba_route_varlen(q, keys, ints({0, 2, 3}, {3}), ints({0, 1, 7}, {3}), 2, 2, 1, true));  // Lq > Lk
  CHECK_THROWS(sc::moba_route_varlen(q, keys, ints({0, 2, 4}, {3}), cu_k, 2, 2, 1, true));  // past the end
  CHECK_THROWS(sc::moba_route_varlen(q, keys, ints({0, 3}, {2}), cu_k, 3, 2, 1, true));     // sequence counts
  CHECK_THROWS(sc::moba_route_varlen(q, keys, ints({0, 2, 3}, {3}).to(at::kLong), cu_k, 2, 2, 1, true));  // dtype
  CHECK_THROWS(sc::moba_route_varlen(q, keys, ints({0, 2, 3}, {3}), cu_k, 2, 0, 1, true));  // block_size
}

// ---------------------------------------------------------------------------------------------

struct Test {
  const char* name;
  void (*fn)();
};

const Test kTests[] = {
    {"block_mean_pool_float_ragged", test_block_mean_pool_float_ragged},
    {"block_mean_pool_double", test_block_mean_pool_double},
    {"block_mean_pool_half", test_block_mean_pool_half},
    {"block_mean_pool_noncontiguous_and_errors", test_block_mean_pool_noncontiguous_and_errors},
    {"topk_ties_lower_index_wins", test_topk_ties_lower_index_wins},
    {"topk_never_selects_neg_inf_or_nan", test_topk_never_selects_neg_inf_or_nan},
    {"topk_k_larger_than_selectable_pads", test_topk_k_larger_than_selectable_pads},
    {"topk_errors", test_topk_errors},
    {"threshold_zero_keeps_only_forced", test_threshold_zero_keeps_only_forced},
    {"threshold_one_keeps_all_allowed", test_threshold_one_keeps_all_allowed},
    {"threshold_mid_case_with_crossing_entry", test_threshold_mid_case_with_crossing_entry},
    {"threshold_ties_lower_index_first", test_threshold_ties_lower_index_first},
    {"threshold_forced_mass_counts", test_threshold_forced_mass_counts},
    {"threshold_forced_but_disallowed", test_threshold_forced_but_disallowed},
    {"threshold_disallowed_never_kept", test_threshold_disallowed_never_kept},
    {"threshold_errors", test_threshold_errors},
    {"layout_transpose_example", test_layout_transpose_example},
    {"layout_transpose_round_trip", test_layout_transpose_round_trip},
    {"layout_transpose_errors", test_layout_transpose_errors},
    {"moba_route_causal", test_moba_route_causal},
    {"moba_route_gqa_decode_row", test_moba_route_gqa_decode_row},
    {"moba_route_noncausal_ragged_and_ties", test_moba_route_noncausal_ragged_and_ties},
    {"moba_route_errors", test_moba_route_errors},
    {"moba_route_varlen_packed", test_moba_route_varlen_packed},
    {"moba_route_varlen_errors", test_moba_route_varlen_errors},
};

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";  // optional substring filter
  int passed = 0, failed = 0;
  for (const Test& test : kTests) {
    if (!only.empty() && std::string(test.name).find(only) == std::string::npos) continue;
    std::printf("[ RUN  ] %s\n", test.name);
    std::fflush(stdout);
    g_check_failures = 0;
    try {
      test.fn();
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, std::string("unexpected exception: ") + e.what());
    }
    if (g_check_failures == 0) {
      ++passed;
      std::printf("[  OK  ] %s\n", test.name);
    } else {
      ++failed;
      std::printf("[ FAIL ] %s (%d failed checks)\n", test.name, g_check_failures);
    }
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed (%d checks)\n", passed, failed, g_checks);
  return failed == 0 && passed > 0 ? 0 : 1;
}
