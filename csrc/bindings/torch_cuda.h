// The torch headers every binding file needs, in one place.
#pragma once

// CPU-only torch wheels ship the c10/cuda headers without this generated file. It only sets a
// Windows DLL-export flag, so skipping it is harmless and lets the bindings compile-check on a
// machine without CUDA torch; a CUDA torch install has the file and includes it as usual.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
