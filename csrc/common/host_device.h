// Macros so the semantics headers compile unchanged in C++ and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FAE_HOST_DEVICE __host__ __device__ __forceinline__
// Loops over a lane's register slots: unrolled so the slots stay registers (a run-time index
// would move the array to local memory).
#define FAE_UNROLL _Pragma("unroll")
#else
#define FAE_HOST_DEVICE inline
#define FAE_UNROLL
#endif
