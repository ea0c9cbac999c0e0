// One macro so the semantics headers compile unchanged in C++ and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FAE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FAE_HOST_DEVICE inline
#endif
