// Arguments of the tensor-core forward and backward kernels, torch-free so that the kernels
// also compile in the host emulation of tests/native/cpp/test_mma_kernels_emulated.cpp.
#pragma once

#include <cstdint>

#include "../common/attention_semantics.h"
#include "attention_rows.h"

namespace flash_attn_ext::cuda {

// A float16 / bfloat16 (batch, head, position) tensor as its 16-bit words, features contiguous:
// the row view the CPU kernels and the safety-net kernels use too (attention_rows.h). These
// kernels serve plain layouts (the decode kernel also paged ones, through rows::kv_view).
using InRows = rows::Strided<const uint16_t>;
using OutRows = rows::Strided<uint16_t>;

// What every tensor-core and decode kernel takes: the inputs, the attention's semantics and the
// scale. The forward, backward and decode arguments extend it (as flash-attn's flash.h does).
struct MmaCommonParams {
  InRows q, k, v;
  AttentionParams p;
  float scale_log2;  // softmax scale * log2(e): the kernels work in base 2 (exp2)
};

struct MmaParams : MmaCommonParams {
  OutRows out;
  float* lse;  // (B, Hq, L), natural log
};

// Arguments of the tensor-core backward kernels (attention_backward_mma_kernel.cuh).
struct MmaBackwardParams : MmaCommonParams {
  InRows grad_out;
  const float* lse;    // (B, Hq, L), natural log
  const float* delta;  // (B, Hq, L): rowsum(dO * O)
  OutRows grad_q, grad_k, grad_v;
};

}  // namespace flash_attn_ext::cuda
