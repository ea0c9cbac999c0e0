// Which matrix element each lane addresses or holds, for the warp-level tensor-core
// instructions of the mma forward (ldmatrix.x4 and mma.sync m16n8k16 with 16-bit inputs and
// float32 accumulators), as the PTX ISA defines the fragments. The kernel computes its
// shared-memory addresses and reads its accumulators through these functions, and
// tests/native/cpp/test_mma_layout.cpp emulates ldmatrix and mma on the host from the PTX fragment
// definitions to check that they compose into the right matrix products, without a GPU.
#pragma once

#include "../common/host_device.h"

namespace flash_attn_ext::mma_layout {

struct RowCol {
  int row, col;
};

// ldmatrix.x4 of the 16x16 A tile (row-major in shared memory, rows = M, cols = K) at (0, 0):
// lanes 0-7 address rows 0-7 of matrix 0 (a0: rows 0-7, k 0-7), lanes 8-15 matrix 1 (a1: rows
// 8-15, k 0-7), lanes 16-23 matrix 2 (a2: rows 0-7, k 8-15), lanes 24-31 matrix 3 (a3: rows
// 8-15, k 8-15).
FAE_HOST_DEVICE RowCol ldsm_a(int lane) { return {lane % 16, (lane / 16) * 8}; }

// ldmatrix.x4 of the B fragments of two adjacent n8 tiles for one k16 step, from a matrix
// stored [n][k] (K rows for S = Q K^T): registers 0, 1 = b0, b1 of n-tile 0 (n 0-7; k 0-7,
// 8-15), registers 2, 3 = b0, b1 of n-tile 1 (n 8-15).
FAE_HOST_DEVICE RowCol ldsm_b_from_nk(int lane) {
  const int m = lane / 8;
  return {lane % 8 + 8 * (m >> 1), 8 * (m & 1)};
}

// The same fragments from a matrix stored [k][n] (V rows for O += P V), with ldmatrix.trans:
// matrix m covers k rows 8 (m & 1) .. + 7 and n columns 8 (m >> 1) .. + 7.
FAE_HOST_DEVICE RowCol ldsm_b_from_kn_trans(int lane) {
  const int m = lane / 8;
  return {lane % 8 + 8 * (m & 1), 8 * (m >> 1)};
}

// Accumulator element e (0-3) of a lane in an m16n8 tile: rows lane / 4 (+ 8 for e >= 2),
// columns 2 (lane % 4) + (e & 1).
FAE_HOST_DEVICE RowCol acc_element(int lane, int e) { return {lane / 4 + 8 * (e >> 1), 2 * (lane % 4) + (e & 1)}; }

// The A fragment of a k16 step built from the accumulators of the two n8 tiles it spans
// (P = softmax(S) feeding P V without leaving registers): A register `reg` (0-3) packs
// accumulator elements 2 (reg & 1) and 2 (reg & 1) + 1 of n8 tile `reg >> 1`.
FAE_HOST_DEVICE int a_reg_tile(int reg) { return reg >> 1; }
FAE_HOST_DEVICE int a_reg_first_element(int reg) { return 2 * (reg & 1); }

}  // namespace flash_attn_ext::mma_layout
