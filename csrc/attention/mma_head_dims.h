// The head dims the tensor-core kernels are built for, written once. The dispatch switches and
// the eligibility checks expand these lists; each dim has its instantiation unit
// (attention_{forward,backward}_mma_hdim<D>.cu: a dim listed without one fails the CUDA build's
// import, with an undefined symbol); tests/native/test_host_programs.py checks that the units
// and the README's list match. Torch-free.
#pragma once

#include <cstdint>

#define FAE_MMA_FORWARD_HEAD_DIMS(X) X(32) X(64) X(96) X(128) X(192) X(256)
#define FAE_MMA_BACKWARD_HEAD_DIMS(X) X(32) X(64) X(96) X(128)

namespace flash_attn_ext::cuda {

#define FAE_HEAD_DIM_CASE(d) case d:
inline bool mma_forward_head_dim(int64_t d) {
  switch (d) {
    FAE_MMA_FORWARD_HEAD_DIMS(FAE_HEAD_DIM_CASE) return true;
    default: return false;
  }
}
inline bool mma_backward_head_dim(int64_t d) {
  switch (d) {
    FAE_MMA_BACKWARD_HEAD_DIMS(FAE_HEAD_DIM_CASE) return true;
    default: return false;
  }
}
#undef FAE_HEAD_DIM_CASE

// "32, 64, ..." for the reason strings (the literal ", 32, 64, ..." past its first ", ").
#define FAE_HEAD_DIM_TEXT(d) ", " #d
inline const char* mma_forward_head_dims_text() { return FAE_MMA_FORWARD_HEAD_DIMS(FAE_HEAD_DIM_TEXT) + 2; }
inline const char* mma_backward_head_dims_text() { return FAE_MMA_BACKWARD_HEAD_DIMS(FAE_HEAD_DIM_TEXT) + 2; }
#undef FAE_HEAD_DIM_TEXT

}  // namespace flash_attn_ext::cuda
