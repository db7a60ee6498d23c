#include "cuda_step.cuh"

FUSEDOPT_REGISTER_CUDA(sgd_)
