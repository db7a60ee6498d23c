#include "cuda_step.cuh"

FUSEDOPT_REGISTER_CUDA(adam_)
