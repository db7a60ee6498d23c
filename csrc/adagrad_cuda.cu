#include "cuda_step.cuh"

FUSEDOPT_REGISTER_CUDA(adagrad_)
