// Operator schemas of the sparse_attn library. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*_cuda.cpp; Python registers fake (meta)
// implementations in sparse_attn/selection.py so torch.compile traces the ops.
//
// Semantics shared by every backend (the PyTorch references in
// sparse_attn/reference.py are the oracle):
//   block_mean_pool(keys [B,H,S,D], block_size) -> [B,H,ceil(S/bs),D]
//       mean of each key block over its real length (ragged last block);
//       accumulates and returns float32 (float64 for float64 keys).
//   topk_rows(scores [R,N], k) -> int32 [R,k]
//       indices of the up-to-k largest selectable scores per row, in rank
//       order (descending score, ties to the lower index); -inf and NaN are
//       never selected; unused slots hold -1.
//   threshold_select(scores [R,N], threshold [R], forced bool [R,N],
//                    allowed bool [R,N]) -> (count int32 [R], indices int32 [R,N])
//       XAttention's cumulative-mass rule over non-negative masses: forced entries come first, then
//       allowed entries by descending score (ties to the lower index); an
//       unforced entry is kept iff the exclusive prefix mass before it is
//       < threshold * (sum of allowed scores); forced entries are always kept;
//       threshold >= 1 keeps every allowed entry. Indices ascend, -1 padded.
//   layout_transpose(kv_num_blocks [B,H,Mq], kv_indices [B,H,Mq,Nmax],
//                    num_kv_blocks) -> (q_num_blocks [B,H,N], q_indices [B,H,N,Mq])
//       for each KV block the query blocks that selected it, ascending, -1
//       padded. Inputs must already be validated (sorted, in range).
//   block_sparse_decode(q [B,Hq,Sq,D], k, v [B,Hkv,Skv,D], kv_num_blocks [Bl,Hl,1],
//                       kv_indices [Bl,Hl,1,Nmax], kv_block_size, causal, softmax_scale,
//                       num_splits) -> (out [B,Hq,Sq,D] in q's dtype, lse [B,Hq,Sq] fp32, fp64 for fp64 q)
//       attention of a few queries (Sq <= 16, one query block) over the KV blocks of the layout
//       (Bl in {B, 1}; Hl in {Hq, Hkv, 1}); query i sits at key i + Skv - Sq for causal masking;
//       natural-log LSE; rows without a visible key give 0 and -inf. Split-KV: each row's block
//       list is cut into num_splits shares merged by LSE (num_splits <= 0: chosen from the shapes).
//   moba_route(q [B,Hq,Sq,D], k [B,Hkv,Skv,D], block_size, topk, causal) -> int32 [B,Hq,Sq,topk]
//       MoBA routing (Lu et al. 2025): row r sits at t = r + Skv - Sq; query head h
//       scores fp32 (fp64) means of its KV head's (h / (Hq/Hkv)) key blocks, s[i] = q_t . kbar[i].
//       Causal: block t / block_size always, plus the top topk-1 of the blocks entirely
//       before t (fewer: all of them). Non-causal: top topk of all blocks. Ties to the lower
//       index; NaN/-inf scores never selected. Indices ascend, -1 padded.
//   moba_route_means(q [B,Hq,Sq,D], block_means [B,Hkv,N,D] fp32 (fp64), kv_len, block_size, topk,
//                    causal) -> int32 [B,Hq,Sq,topk]
//       moba_route of keys kv_len long whose block means are given (block_mean_pool's; N at least
//       the blocks a row may rank): cached means route decode queries as the prefill would.
//   moba_route_varlen(q [Tq,Hq,D], k [Tk,Hkv,D], cu_seqlens_q, cu_seqlens_k int32 [S+1],
//                     max_seqlen_q, block_size, topk, causal) -> int32 [S,Hq,max_seqlen_q,topk]
//       moba_route of each packed sequence s (queries cu_seqlens_q[s]:[s+1], keys
//       cu_seqlens_k[s]:[s+1], Lq <= Lk, blocks restarting at the sequence's first key) in row
//       block s; rows past Lq are -1. The offsets are read on the host and validated.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing sparse_attn._C loads the registrations below; no Python API is needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparse_attn, m) {
  m.def("block_mean_pool(Tensor keys, int block_size) -> Tensor");
  m.def("topk_rows(Tensor scores, int k) -> Tensor");
  m.def("threshold_select(Tensor scores, Tensor threshold, Tensor forced, Tensor allowed) -> (Tensor, Tensor)");
  m.def("layout_transpose(Tensor kv_num_blocks, Tensor kv_indices, int num_kv_blocks) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_decode(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, int kv_block_size, "
      "bool causal, float softmax_scale, int num_splits) -> (Tensor out, Tensor lse)");
  m.def("moba_route(Tensor q, Tensor k, int block_size, int topk, bool causal) -> Tensor");
  m.def("moba_route_means(Tensor q, Tensor block_means, int kv_len, int block_size, int topk, bool causal) -> Tensor");
  m.def(
      "moba_route_varlen(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int block_size, int topk, bool causal) -> Tensor");
}
