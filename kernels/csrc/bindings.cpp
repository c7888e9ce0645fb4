// Python bindings of tokenrelay's CPU kernels (one extension module, built by kernels/cpu_build.py).
#include <torch/extension.h>

void paged_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale, torch::Tensor rows,
                     torch::Tensor seq_index, torch::Tensor ctx_lens, torch::Tensor block_tables, double scale);
void prefill_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor seqs, torch::Tensor block_tables, double scale);
std::vector<int64_t> prefill_head_dims();
void write_kv_cache(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key, torch::Tensor value,
                    torch::Tensor slot_mapping);
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias);
std::vector<torch::Tensor> int8_pack(torch::Tensor q, torch::Tensor scale);
torch::Tensor int8_linear_packed(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t N,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t qtype, c10::optional<torch::Tensor> bias);
torch::Tensor gguf_rows(torch::Tensor weight, int64_t qtype, torch::Tensor ids, int64_t K);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over block tables for short queries (CPU)");
  m.def("prefill_attention", &prefill_attention, "causal attention of prefill chunks over block tables (CPU, float32)");
  m.def("prefill_head_dims", &prefill_head_dims, "head sizes prefill_attention takes in this build");
  m.def("write_kv_cache", &write_kv_cache, "new K/V rows into float paged caches at their slots (CPU)");
  m.def("int8_linear", &int8_linear, "weight-only int8 linear, float32 activations (CPU)");
  m.def("int8_pack", &int8_pack, "int8 [N, K] and scales -> the interleaved layout of int8_linear_packed");
  m.def("int8_linear_packed", &int8_linear_packed, "weight-only int8 linear over int8_pack's layout (CPU)");
  m.def("gguf_linear", &gguf_linear, "linear over GGUF Q4_1 / Q8_0 blocks, float32 activations (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (CPU)");
  m.def("add_rms_norm", &add_rms_norm, "residual + x, and its RMSNorm, in one pass (CPU)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from a merged [rows, 2 * inter] projection (CPU)");
  m.def("rotary_", &rotary_, "rotary embedding of q and k in place (CPU)");
  m.def("gguf_rows", &gguf_rows, "rows of a GGUF Q4_1 / Q8_0 matrix, dequantised (embedding lookup)");
}
