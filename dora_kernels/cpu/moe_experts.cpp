// Fused dropless MoE experts for CPU inference: y[n] = sum_k w[n, k] * expert_{ids[n, k]}(x[n]).
//
// One call does what the torch path does in ~12 dispatched ops (sort, gather, two grouped matmuls,
// SwiGLU, inverse permutation, weighted combine), and spreads the experts' matmuls over the intra-op
// threads: token slots are counting-sorted by expert, each expert's rows are cut into blocks, and the
// blocks are dealt to threads longest-first, so a hot expert is split between threads instead of
// running its rows on one matmul that a second thread barely speeds up. Inside the parallel region
// every matmul is single-threaded (nested regions run inline), which is where small-M matmuls are
// most efficient per core.
//
// Layout (the torch engine's, see dora/engines/versions.py): gate_up [E, D, 2I] (gate columns first),
// down [E, I, D], both contiguous; ids [N, K] int64 in [0, E); weights [N, K] in x's dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

struct Block {
  int64_t expert;
  int64_t begin;  // first row in expert-sorted slot order
  int64_t end;
};

template <typename scalar_t>
void combine(const scalar_t* y, const scalar_t* w, const int64_t* sorted_pos, scalar_t* out, int64_t N,
             int64_t K, int64_t D) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * D)), [&](int64_t b, int64_t e) {
    std::vector<float> acc(D);
    for (int64_t n = b; n < e; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = static_cast<float>(w[n * K + k]);
        const scalar_t* row = y + sorted_pos[n * K + k] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<float>(row[d]);
      }
      scalar_t* o = out + n * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

}  // namespace

torch::Tensor moe_experts(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& weights,
                          const torch::Tensor& gate_up, const torch::Tensor& down) {
  TORCH_CHECK(x.device().is_cpu(), "dora_moe_cpu: x must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.dim() == 2, "dora_moe_cpu: x, ids, weights must be 2-D");
  TORCH_CHECK(!(x.requires_grad() || gate_up.requires_grad() || down.requires_grad() || weights.requires_grad()),
              "dora_moe_cpu: inference only (no autograd); the trainer uses dora.models.ops.moe_experts");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "dora_moe_cpu: ids must be int64");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, "dora_moe_cpu: gate_up [E, D, 2I] and down [E, I, D]");
  TORCH_CHECK(x.scalar_type() == weights.scalar_type() && x.scalar_type() == gate_up.scalar_type() &&
                  x.scalar_type() == down.scalar_type(),
              "dora_moe_cpu: x, weights, gate_up and down must share a dtype");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "dora_moe_cpu: expert weights must be contiguous");
  const int64_t N = x.size(0), D = x.size(1), K = ids.size(1), E = gate_up.size(0), F = gate_up.size(2);
  const int64_t I = F / 2, n = N * K;
  TORCH_CHECK(ids.size(0) == N && weights.size(0) == N && weights.size(1) == K, "dora_moe_cpu: ids/weights must be [N, K]");
  TORCH_CHECK(gate_up.size(1) == D && F % 2 == 0 && down.size(0) == E && down.size(1) == I && down.size(2) == D,
              "dora_moe_cpu: expert weight shapes do not match x");

  const auto x_c = x.contiguous();
  const auto ids_c = ids.contiguous();
  const auto w_c = weights.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();

  // Stable counting sort of the slots (flat index n * K + k) by expert.
  std::vector<int64_t> first(E + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "dora_moe_cpu: expert id ", id[i], " outside [0, ", E, ")");
    ++first[id[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
  std::vector<int64_t> slot_of(n), sorted_pos(n), cursor(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = cursor[id[i]]++;
    slot_of[p] = i;
    sorted_pos[i] = p;
  }

  // Blocks of at most `cap` rows, dealt to threads longest-first (each to the least-loaded thread).
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t cap = threads == 1 ? n : std::max<int64_t>(8, (n + 2 * threads - 1) / (2 * threads));
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = first[e + 1] - first[e];
    if (rows == 0) continue;
    const int64_t pieces = (rows + cap - 1) / cap;
    for (int64_t j = 0; j < pieces; ++j)
      blocks.push_back({e, first[e] + rows * j / pieces, first[e] + rows * (j + 1) / pieces});
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const Block& a, const Block& b) { return a.end - a.begin > b.end - b.begin; });
  std::vector<std::vector<Block>> work(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Block& b : blocks) {
    const auto t = std::min_element(load.begin(), load.end()) - load.begin();
    work[t].push_back(b);
    load[t] += b.end - b.begin;
  }

  auto xs = at::empty({n, D}, x.options());
  auto hs = at::empty({n, F}, x.options());
  auto ys = at::empty({n, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const char* x_ptr = static_cast<const char*>(x_c.data_ptr());
  char* xs_ptr = static_cast<char*>(xs.data_ptr());
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode inference;  // worker threads do not inherit the caller's mode
    for (int64_t t = t0; t < t1; ++t) {
      for (const Block& b : work[t]) {
        for (int64_t p = b.begin; p < b.end; ++p)
          std::memcpy(xs_ptr + p * row_bytes, x_ptr + (slot_of[p] / K) * row_bytes, row_bytes);
        const int64_t rows = b.end - b.begin;
        auto h = hs.narrow(0, b.begin, rows);
        at::mm_out(h, xs.narrow(0, b.begin, rows), gate_up[b.expert]);
        auto gate = h.narrow(1, 0, I);
        at::silu_(gate);
        gate.mul_(h.narrow(1, I, I));
        auto y = ys.narrow(0, b.begin, rows);
        at::mm_out(y, gate, down[b.expert]);
      }
    }
  });

  auto out = at::empty({N, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dora_moe_cpu_combine", [&] {
    combine<scalar_t>(ys.data_ptr<scalar_t>(), w_c.data_ptr<scalar_t>(), sorted_pos.data(), out.data_ptr<scalar_t>(),
                      N, K, D);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_experts", &moe_experts, "Fused dropless MoE experts (CPU)");
}
