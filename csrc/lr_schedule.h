// Device-side learning-rate schedules (fusedopt/lr_scheduler.py): the schedule math, once, for the CPU op
// (csrc/schedule_ops.cpp), the CUDA op (csrc/schedule_cuda.cu) and the fused step kernel's per-step advance.
//
// Every formula is torch.optim.lr_scheduler's *chainable* get_lr() (what step() without an epoch uses), in
// double precision and in the operation order of torch's Python, so sequences agree with torch to rounding.
//
// ---- Layout -------------------------------------------------------------------------------------------
// A schedule is a tree of nodes: a leaf, or a composite (SequentialLR, ChainedScheduler) whose children are
// leaves. An optimizer with several per-step schedulers runs them under one MULTI root, whose children are
// whole schedules (leaves or composites), each with its own program and state words. Each param group g owns one row of the program tensor
// (float64 [G, P], read-only) and one row of the state tensor (float64 [G, S]); integers are stored as
// doubles. The root node starts at program word 0. Per-group values (base lr, max_lr, min_lr, momenta ...)
// are simply different numbers in each group's row.
//
// Node header (program words, relative to the node's start):
//   [0] kind (ScheduleKind)   [1] offset of the node's state in the state row   [2] node length in words
//   [3] base lr: torch's base_lrs[g] (group["initial_lr"]; CyclicLR: its base_lr)
// Node parameters from word 4:
//   STEP           step_size, gamma
//   MULTI_STEP     gamma, n, then n pairs (milestone, multiplicity) in increasing milestone order
//   CONSTANT       factor, total_iters
//   LINEAR         start_factor, end_factor, total_iters
//   EXPONENTIAL    gamma
//   POLYNOMIAL     total_iters, power
//   COSINE         T_max, eta_min
//   WARM_RESTARTS  T_0, T_mult, eta_min
//   CYCLIC         max_lr, total_size, step_ratio, mode (0 triangular, 1 triangular2, 2 exp_range), gamma,
//                  cycle_momentum, base_momentum, max_momentum
//   ONE_CYCLE      total_steps, anneal (1 cos, 0 linear), cycle_momentum, n_phases, then per phase
//                  end_step, start_lr, end_lr, start_momentum, end_momentum as indices of the group values in
//                  the node's state (torch reads group[key] at every step)
//   TIME_DECAY     decay d             (lr_{n+1} = lr_n / (1 + d n))
//   EXP_DECAY      decay d             (lr_n = lr_0 e^{-d n}, advanced as lr *= e^{-d})
//   PLATEAU        mode_max, threshold, threshold_rel, factor, patience, cooldown, min_lr, eps
//   SEQUENTIAL     n, then n child offsets (program words from the row start), then n - 1 milestones
//   CHAINED        n, then n child offsets
//   MULTI          n, then n pairs (program offset, state offset) from the row start: each child is a whole
//                  schedule (its own child offsets and state offsets are relative to these), advanced in order
// Counts and lengths (T_max, total_iters, ...) are doubles as torch allows floats (T_max = 2.5 is not 2).
// State words, relative to the node's state offset:
//   every node     [0] last_epoch   [1] pending initial step (1: the next advance is the constructor's step)
//   WARM_RESTARTS  [2] T_cur   [3] T_i
//   ONE_CYCLE      [2..6] the group's initial_lr, max_lr, min_lr, max_momentum, base_momentum: a later
//                  OneCycleLR / CyclicLR constructor overwrites them, as it overwrites torch's group keys
//   PLATEAU        [2] best   [3] num_bad_epochs   [4] cooldown_counter
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fusedopt {

enum ScheduleKind : int64_t {
  kStep = 1,
  kMultiStep = 2,
  kConstant = 3,
  kLinear = 4,
  kExponential = 5,
  kPolynomial = 6,
  kCosine = 7,
  kWarmRestarts = 8,
  kCyclic = 9,
  kOneCycle = 10,
  kTimeDecay = 11,
  kExpDecay = 12,
  kPlateau = 13,
  kSequential = 20,
  kChained = 21,
  kMulti = 22,
};

namespace schedule_detail {

constexpr int kKind = 0, kStateOffset = 1, kBaseLr = 3, kParams = 4;
constexpr int kLastEpoch = 0, kPendingInitial = 1, kExtraState = 2;
constexpr double kPi = 3.141592653589793;  // math.pi

// How a leaf is advanced: torch's step(), the constructor's _initial_step() (get_lr sees _is_initial), or
// SequentialLR's milestone reset (_update_lr(0): last_epoch = 0 and the closed form where torch has one).
enum class Advance { kStep, kInitial, kRestartAtZero };

C10_HOST_DEVICE inline int64_t as_int(double v) { return static_cast<int64_t>(v); }
// Python's % for a positive divisor.
C10_HOST_DEVICE inline int64_t py_mod(int64_t a, int64_t b) {
  const int64_t r = a % b;
  return r < 0 ? r + b : r;
}
// Python's float % (the sign of the divisor), exact like fmod.
C10_HOST_DEVICE inline double py_fmod(double a, double b) {
  double r = ::fmod(a, b);
  if (r != 0.0) {
    if ((b < 0) != (r < 0)) r += b;
  } else {
    r = ::copysign(0.0, b);
  }
  return r;
}
C10_HOST_DEVICE inline int64_t py_floordiv(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
// Python's max(a, b): a unless b > a.
C10_HOST_DEVICE inline double py_max(double a, double b) { return b > a ? b : a; }

C10_HOST_DEVICE inline double one_cycle_anneal(bool cosine, double start, double end, double pct) {
  if (cosine) {
    const double cos_out = ::cos(kPi * pct) + 1;
    return end + (start - end) / 2.0 * cos_out;
  }
  return (end - start) * pct + start;
}

C10_HOST_DEVICE inline void advance_leaf(const double* node, double* row_state, double* lr, double* momentum,
                                         const double* metric, Advance how) {
  const double* p = node + kParams;
  double* s = row_state + as_int(node[kStateOffset]);
  if (s[kPendingInitial] != 0.0) {
    s[kPendingInitial] = 0.0;
    how = Advance::kInitial;
  }
  const double base_lr = node[kBaseLr];
  const int64_t kind = as_int(node[kKind]);
  if (kind == kPlateau) {  // ReduceLROnPlateau.step(metrics): never composed, never per step
    if (metric == nullptr) return;
    const double current = *metric;
    s[kLastEpoch] += 1.0;
    const bool mode_max = p[0] != 0.0, rel = p[2] != 0.0;
    const double threshold = p[1], best = s[2];
    bool better;
    if (!mode_max && rel) {
      const double rel_epsilon = 1.0 - threshold;
      better = current < best * rel_epsilon;
    } else if (!mode_max) {
      better = current < best - threshold;
    } else if (rel) {
      const double rel_epsilon = threshold + 1.0;
      better = current > best * rel_epsilon;
    } else {
      better = current > best + threshold;
    }
    if (better) {
      s[2] = current;
      s[3] = 0.0;
    } else {
      s[3] += 1.0;
    }
    if (s[4] > 0.0) {  // in cooldown: bad epochs are ignored
      s[4] -= 1.0;
      s[3] = 0.0;
    }
    if (s[3] > p[4]) {
      const double old_lr = *lr;
      const double new_lr = py_max(old_lr * p[3], p[6]);
      if (old_lr - new_lr > p[7]) *lr = new_lr;
      s[4] = p[5];
      s[3] = 0.0;
    }
    return;
  }

  if (how == Advance::kRestartAtZero) {
    s[kLastEpoch] = 0.0;
  } else if (kind != kWarmRestarts) {  // WarmRestarts keeps its own epoch logic below
    s[kLastEpoch] += 1.0;
  }
  const int64_t epoch = as_int(s[kLastEpoch]);
  const bool initial = how == Advance::kInitial;
  const bool closed_form = how == Advance::kRestartAtZero;

  switch (kind) {
    case kStep: {
      const int64_t step_size = as_int(p[0]);
      const double gamma = p[1];
      if (closed_form) {
        *lr = base_lr * ::pow(gamma, double(py_floordiv(epoch, step_size)));
      } else if (!(epoch == 0 || py_mod(epoch, step_size) != 0)) {
        *lr = *lr * gamma;
      }
      break;
    }
    case kMultiStep: {
      const double gamma = p[0];
      const int64_t n = as_int(p[1]);
      if (closed_form) {
        int64_t passed = 0;  // bisect_right over the milestones with multiplicity
        for (int64_t i = 0; i < n; ++i) {
          if (p[2 + 2 * i] <= double(epoch)) passed += as_int(p[3 + 2 * i]);
        }
        *lr = base_lr * ::pow(gamma, double(passed));
      } else {
        for (int64_t i = 0; i < n; ++i) {
          if (p[2 + 2 * i] == double(epoch)) *lr = *lr * ::pow(gamma, p[3 + 2 * i]);
        }
      }
      break;
    }
    case kConstant: {
      const double factor = p[0], total_iters = p[1];
      if (closed_form) {
        *lr = base_lr * (factor + (double(epoch) >= total_iters ? (1 - factor) : 0.0));
      } else if (epoch == 0) {
        *lr = *lr * factor;
      } else if (double(epoch) == total_iters) {
        *lr = *lr * (1.0 / factor);
      }
      break;
    }
    case kLinear: {
      const double start = p[0], end = p[1], total_iters = p[2];
      if (closed_form) {
        const double done = total_iters < double(epoch) ? total_iters : double(epoch);  // Python's min
        *lr = base_lr * (start + (end - start) * done / total_iters);
      } else if (epoch == 0) {
        *lr = *lr * start;
      } else if (!(initial || double(epoch) > total_iters)) {
        *lr = *lr * (1.0 + (end - start) / (total_iters * start + double(epoch - 1) * (end - start)));
      }
      break;
    }
    case kExponential: {
      if (closed_form) {
        *lr = base_lr * ::pow(p[0], double(epoch));
      } else if (!initial) {
        *lr = *lr * p[0];
      }
      break;
    }
    case kPolynomial: {
      const double total_iters = p[0], power = p[1];
      if (closed_form) {
        const double done = total_iters < double(epoch) ? total_iters : double(epoch);
        *lr = base_lr * ::pow(1.0 - done / total_iters, power);
      } else if (!(initial || double(epoch) > total_iters)) {
        const double decay_factor = ::pow((1.0 - double(epoch) / total_iters) /
                                              (1.0 - double(epoch - 1) / total_iters),
                                          power);
        *lr = *lr * decay_factor;
      }
      break;
    }
    case kCosine: {
      const double t_max = p[0], eta_min = p[1];
      if (closed_form) {
        *lr = eta_min + (base_lr - eta_min) * (1 + ::cos(kPi * double(epoch) / t_max)) / 2;
      } else if (initial) {
        // unchanged
      } else {
        const double previous = 1 + ::cos(kPi * double(epoch - 1) / t_max);
        // previous == 0 is the restart epoch that the modulo test misses by a rounding with a float T_max:
        // torch divides by zero there (ZeroDivisionError); the device takes the restart branch, finite.
        if (py_fmod(double(epoch - 1) - t_max, 2 * t_max) == 0 || previous == 0.0) {
          *lr = *lr + (base_lr - eta_min) * (1 - ::cos(kPi / t_max)) / 2;
        } else {
          *lr = (1 + ::cos(kPi * double(epoch) / t_max)) / previous * (*lr - eta_min) + eta_min;
        }
      }
      break;
    }
    case kWarmRestarts: {
      const int64_t t_0 = as_int(p[0]), t_mult = as_int(p[1]);
      const double eta_min = p[2];
      int64_t t_cur = as_int(s[kExtraState]), t_i = as_int(s[kExtraState + 1]);
      if (!closed_form) {  // torch's step() without an epoch; the milestone reset only sets last_epoch = 0
        if (s[kLastEpoch] < 0.0) {  // step(0): the first epoch of the first cycle
          t_i = t_0;
          t_cur = 0;
          s[kLastEpoch] = 0.0;
        } else {
          s[kLastEpoch] += 1.0;
          t_cur += 1;
          if (t_cur >= t_i) {
            t_cur = t_cur % t_i;
            t_i = t_i * t_mult;
          }
        }
        s[kExtraState] = double(t_cur);
        s[kExtraState + 1] = double(t_i);
      }
      *lr = eta_min + (base_lr - eta_min) * (1 + ::cos(kPi * double(t_cur) / double(t_i))) / 2;
      break;
    }
    case kCyclic: {
      const double max_lr = p[0], total_size = p[1], step_ratio = p[2], gamma = p[4];
      const int64_t mode = as_int(p[3]);
      const double cycle = ::floor(1 + double(epoch) / total_size);
      const double x = 1.0 + double(epoch) / total_size - cycle;
      const double scale_factor = x <= step_ratio ? x / step_ratio : (x - 1) / (step_ratio - 1);
      double scale;
      if (mode == 0) {
        scale = 1.0;
      } else if (mode == 1) {
        scale = 1 / ::pow(2.0, cycle - 1);
      } else {
        scale = ::pow(gamma, double(epoch));  // exp_range scales by iterations
      }
      const double base_height = (max_lr - base_lr) * scale_factor;
      *lr = base_lr + base_height * scale;
      if (p[5] != 0.0 && momentum != nullptr) {
        const double base_momentum = p[6], max_momentum = p[7];
        const double momentum_height = (max_momentum - base_momentum) * scale_factor;
        *momentum = max_momentum - momentum_height * scale;
      }
      break;
    }
    case kOneCycle: {
      const int64_t total_steps = as_int(p[0]);
      if (epoch > total_steps) break;  // torch raises ValueError; the host checks per-epoch steps, the device holds
      const bool cosine = p[1] != 0.0, cycle_momentum = p[2] != 0.0;
      const int64_t phases = as_int(p[3]);
      const double* group = s + kExtraState;
      double start_step = 0.0;
      for (int64_t i = 0; i < phases; ++i) {
        const double* phase = p + 4 + 5 * i;
        const double end_step = phase[0];
        if (double(epoch) <= end_step || i == phases - 1) {
          const double pct = (double(epoch) - start_step) / (end_step - start_step);
          *lr = one_cycle_anneal(cosine, group[as_int(phase[1])], group[as_int(phase[2])], pct);
          if (cycle_momentum && momentum != nullptr) {
            *momentum = one_cycle_anneal(cosine, group[as_int(phase[3])], group[as_int(phase[4])], pct);
          }
          break;
        }
        start_step = end_step;
      }
      break;
    }
    case kTimeDecay: {
      if (closed_form) {
        *lr = base_lr;
      } else if (!(initial || epoch == 0)) {
        *lr = *lr / (1 + p[0] * double(epoch - 1));
      }
      break;
    }
    case kExpDecay: {
      if (closed_form) {
        *lr = base_lr * ::exp(-p[0] * double(epoch));
      } else if (!(initial || epoch == 0)) {
        *lr = *lr * ::exp(-p[0]);
      }
      break;
    }
    default:
      break;
  }
}

// One step of one schedule (a leaf or a composite) whose program and state start at `program` and `state`.
C10_HOST_DEVICE inline void advance_node(const double* program, double* state, double* lr, double* momentum,
                                         const double* metric) {
  const int64_t kind = as_int(program[kKind]);
  if (kind != kSequential && kind != kChained) {
    advance_leaf(program, state, lr, momentum, metric, Advance::kStep);
    return;
  }
  const double* p = program + kParams;
  const int64_t n = as_int(p[0]);
  const double* child_offsets = p + 1;
  double* s = state + as_int(program[kStateOffset]);
  if (kind == kChained) {  // ChainedScheduler.step(): every child's step(), in order, on the shared lr
    s[kLastEpoch] += 1.0;  // a count of steps (torch's ChainedScheduler keeps none)
    for (int64_t i = 0; i < n; ++i) {
      advance_leaf(program + as_int(child_offsets[i]), state, lr, momentum, metric, Advance::kStep);
    }
    return;
  }
  // SequentialLR
  const double* milestones = child_offsets + n;
  auto child_for = [&](int64_t epoch) {  // bisect_right(milestones, epoch)
    int64_t idx = 0;
    while (idx < n - 1 && as_int(milestones[idx]) <= epoch) ++idx;
    return idx;
  };
  if (s[kPendingInitial] != 0.0) {  // the constructor: only the child that runs at epoch 0 makes its first step
    s[kPendingInitial] = 0.0;
    advance_leaf(program + as_int(child_offsets[child_for(0)]), state, lr, momentum, metric, Advance::kInitial);
    return;
  }
  s[kLastEpoch] += 1.0;
  const int64_t epoch = as_int(s[kLastEpoch]);
  const int64_t idx = child_for(epoch);
  const bool at_milestone = idx > 0 && as_int(milestones[idx - 1]) == epoch;
  advance_leaf(program + as_int(child_offsets[idx]), state, lr, momentum, metric,
               at_milestone ? Advance::kRestartAtZero : Advance::kStep);
}

}  // namespace schedule_detail

// Advances one param group's schedule by one step: reads the current *lr (and *momentum when non-null),
// writes the next ones. `program` is the group's read-only row of the program tensor, `state` its row of the
// state tensor; `metric` is the ReduceLROnPlateau metric (nullptr otherwise).
C10_HOST_DEVICE inline void advance_schedule(const double* program, double* state, double* lr, double* momentum,
                                             const double* metric) {
  using namespace schedule_detail;
  if (as_int(program[kKind]) != kMulti) {
    advance_node(program, state, lr, momentum, metric);
    return;
  }
  // Several schedulers on one optimizer: each steps the shared lr in turn, as torch's do on group["lr"].
  const int64_t n = as_int(program[kParams]);
  const double* offsets = program + kParams + 1;
  for (int64_t i = 0; i < n; ++i) {
    advance_node(program + as_int(offsets[2 * i]), state + as_int(offsets[2 * i + 1]), lr, momentum, metric);
  }
}

}  // namespace fusedopt
