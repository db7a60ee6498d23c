"""Low-precision training: the four constructor options every Fused* optimizer adds to torch's.

``param_rounding="nearest"`` (default) | ``"stochastic"`` | ``"kahan"``: how a bfloat16/float16 param receives
    its update, which the kernels compute in float32.

    - ``"nearest"``: round to nearest even, as a plain cast and torch.optim do. An update smaller than half an
      ulp of the weight (lr * update < 2**-9 * |w| in bf16) is lost.
    - ``"stochastic"``: round up or down with probability proportional to the distance, so that the rounded
      param is the float32 result on average. The random bits come from a counter-based stream of (seed,
      counter, tensor, buffer, element): the CPU and CUDA kernels round identically, and the seed and counter
      live on the device (an int64 ``[seed, counter]`` per device, advanced by every launch that rounds
      stochastically), so CUDA-graph replays draw fresh bits. No extra memory. bfloat16/float16 state buffers
      (``state_dtype``) are rounded the same way, also those of float32 params.
    - ``"kahan"``: Kahan-compensated updates. A compensation buffer in the param's dtype, state key
      ``"kahan_comp"`` (zeros at first), carries what rounding dropped and feeds it into the next update: the
      weight the optimizer tracks is ``param + kahan_comp``, to ~16 significant bits. 2 bytes per bf16 param.
      The compensation is itself rounded to the param's dtype at every step, so over n steps of updates below
      an ulp the tracked weight can drift by up to n * eps / 4 ulps (measured in bf16: half an ulp after 1,000
      steps of lr 1e-4 on weights near 1, where round-to-nearest loses all of them).

``master_weights=False`` | ``True``: keep a float32 copy of each bfloat16/float16 param in its state, state key
    ``"master_param"`` (created from the param's value when the param's state is created, or when a loaded
    state lacks it). The update is computed on the master copy; the param receives its rounding (nearest, or
    stochastic with ``param_rounding="stochastic"``). 4 bytes per bf16 param. The master copy is the weight
    the optimizer updates: a param changed outside the optimizer (``p.copy_(...)`` after its state exists) is
    overwritten by the master's rounding at the next step; restore weights together with the optimizer's
    state dict. ``master_weights=True`` with ``param_rounding="kahan"`` raises ValueError (the master copy
    already loses nothing to rounding).

``state_dtype=None`` | ``torch.float32`` | ``torch.bfloat16``: the dtype of the state buffers (the moments:
    ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...). ``None`` is torch's choice, the param's dtype;
    float32 moments for bf16 params cost 8 bytes per param in Adam and lose no small moment updates (bf16's
    ``exp_avg_sq`` stalls with round-to-nearest), bfloat16 moments for float32 params halve Adam's state (written with ``param_rounding``'s rounding when it is
    ``"stochastic"``, else to nearest). Scalar state (``step``, NAdam's ``mu_product``, ...) stays float32.

``seed=None`` | an int: the seed of the stochastic-rounding stream. ``None`` draws one from torch's default
    CPU generator when the optimizer is constructed (only with ``param_rounding="stochastic"``), so
    ``torch.manual_seed`` makes runs reproducible.

The modes apply to bfloat16/float16 params. float32 and float64 params in the same optimizer (norms kept in
float32, say) update exactly as with the default options: no master copy or compensation buffer, and
``param_rounding="kahan"`` rounds their (float32) result to nearest. float64 params keep float64 state whatever
``state_dtype`` says, complex params keep state in their own dtype (there is no complex bfloat16).

State dicts: ``state_dict()`` holds ``master_param`` / ``kahan_comp`` per param as above, buffers in the state
dtype, and with ``param_rounding="stochastic"`` a top-level ``"fusedopt_rng"``: ``{"seed": int, "counters":
{device name: int}}``. Loading it resumes bit for bit (torch's own load would cast ``master_param`` to the param's
dtype: the optimizer restores the tensors as saved). torch.optim's ``load_state_dict`` ignores the top-level key
and keeps, unused, the per-param extras; ``state_dict_for_torch()`` drops them and casts the buffers to the
params' dtypes, as if torch had trained. torch.distributed.checkpoint keeps only "state" and "param_groups":
through it, master copies, compensations and buffers resume exactly, the stochastic-rounding stream does not (it
continues from the resuming optimizer's own seed and counter).
"""
import numbers

import torch

from . import _ops

MASTER_KEY = "master_param"  # float32 copy of a bf16/fp16 param (master_weights=True)
KAHAN_KEY = "kahan_comp"  # compensation buffer in the param's dtype (param_rounding="kahan")
EXTRA_KEYS = (MASTER_KEY, KAHAN_KEY)
# the op argument that takes each extra (csrc/algorithm_op.h)
EXTRA_ARGUMENTS = {MASTER_KEY: "master_params", KAHAN_KEY: "kahan_comp"}
RNG_KEY = "fusedopt_rng"  # top-level state-dict entry: the stochastic-rounding stream

LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
STATE_DTYPES = (None, torch.float32, torch.bfloat16)
# the constructor options and their defaults, in the order the signature shows them
OPTIONS = {"param_rounding": "nearest", "master_weights": False, "state_dtype": None, "seed": None}
_INT64 = (-(2**63), 2**63)


def rounding_modes():
    """The param_rounding values, as the compiled kernels name them; None without the extension."""
    return _ops.param_rounding_modes()


def real_dtype(dtype):
    """What the kernels see of a dtype: a complex param or state is updated through its real view."""
    return dtype.to_real() if dtype.is_complex else dtype


def _check_options(param_rounding, master_weights, state_dtype, seed):
    """ValueError for an unknown value or a contradictory combination, before anything is constructed."""
    modes = rounding_modes()
    if not isinstance(param_rounding, str) or (modes is not None and param_rounding not in modes):
        expected = ", ".join(repr(m) for m in modes) if modes is not None else "a str"
        raise ValueError(f"Invalid param_rounding value: {param_rounding!r} (expected one of {expected})")
    if not isinstance(master_weights, bool):
        raise ValueError(f"Invalid master_weights value: {master_weights!r} (expected True or False)")
    if not any(state_dtype is d for d in STATE_DTYPES):
        raise ValueError(f"Invalid state_dtype value: {state_dtype!r} (expected None, torch.float32 or "
                         "torch.bfloat16)")
    if seed is not None and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
                                 and _INT64[0] <= seed < _INT64[1]):
        raise ValueError(f"Invalid seed value: {seed!r} (expected None or an int in [-2**63, 2**63))")
    if param_rounding == "kahan" and master_weights:
        raise ValueError(
            "param_rounding='kahan' and master_weights=True exclude each other: a float32 master copy already "
            "loses nothing to rounding; use master_weights=True (optionally with param_rounding='stochastic') "
            "or param_rounding='kahan'")


class LowPrecision:
    """An optimizer's low-precision options (``optimizer.low_precision``, read-only), the per-param answers the
    launch plan needs, and the stochastic-rounding stream's device state."""

    def __init__(self, param_rounding="nearest", master_weights=False, state_dtype=None, seed=None):
        _check_options(param_rounding, master_weights, state_dtype, seed)
        self._param_rounding = param_rounding
        self._master_weights = master_weights
        self._state_dtype = state_dtype
        self._seed = None if seed is None else int(seed)
        self._rng = {}  # device -> int64 [seed, counter], what the kernels read and advance
        self._pending = {}  # device name -> counter loaded from a state dict before that device's rng existed

    @classmethod
    def pop_from(cls, kwargs):
        """The options in a constructor's kwargs, removed from them (torch's constructor does not know them)."""
        return cls(**{name: kwargs.pop(name, default) for name, default in OPTIONS.items()})

    @property
    def param_rounding(self):
        return self._param_rounding

    @property
    def master_weights(self):
        return self._master_weights

    @property
    def state_dtype(self):
        return self._state_dtype

    @property
    def seed(self):
        """The stochastic-rounding seed; None unless param_rounding="stochastic" or one was given."""
        return self._seed

    @property
    def is_default(self):
        return (self._param_rounding, self._master_weights, self._state_dtype) == ("nearest", False, None)

    @property
    def stochastic(self):
        return self._param_rounding == "stochastic"

    def draw_default_seed(self):
        """Called once the optimizer is constructed, so that a failing constructor leaves torch's generator
        alone, and only for stochastic rounding, so that other optimizers draw nothing (as torch.optim's)."""
        if self._seed is None and self.stochastic:
            self._seed = int(torch.randint(0, 2**62, (1,)))

    def __repr__(self):
        return (f"LowPrecision(param_rounding={self._param_rounding!r}, master_weights={self._master_weights}, "
                f"state_dtype={self._state_dtype}, seed={self._seed})")

    # ---- Per param ----
    def state_dtype_for(self, param):
        """The dtype of the param's state buffers: `state_dtype`, or the param's where it is None, the param is
        float64 (its state stays float64) or complex (there is no complex bfloat16)."""
        if self._state_dtype is None or param.is_complex() or param.dtype == torch.float64:
            return param.dtype
        return self._state_dtype

    def extra_key(self, param):
        """The state key of the param's extra buffer (master copy or compensation), None when it has none:
        only bfloat16/float16 params get one."""
        if param.dtype not in LOW_PRECISION_DTYPES:
            return None
        if self._master_weights:
            return MASTER_KEY
        return KAHAN_KEY if self._param_rounding == "kahan" else None

    @staticmethod
    def extra_dtype(key, param):
        return torch.float32 if key == MASTER_KEY else param.dtype

    @staticmethod
    def new_extra(key, param):
        """A new extra buffer: the master copy from the param's current value, the compensation at zero. Laid
        out like the param (as torch lays out state buffers), so the kernels walk it in place."""
        if key == MASTER_KEY:
            return param.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    # ---- Per launch ----
    def launch_rounding(self, param_dtype, state_dtype):
        """The op's `param_rounding` for a launch of params and states of these (real) dtypes. Launches with
        nothing in low precision round nothing: "nearest", so float32/float64 params update exactly as with the
        default options and draw no random numbers."""
        low_param = param_dtype in LOW_PRECISION_DTYPES
        if self._param_rounding == "kahan":
            return "kahan" if low_param else "nearest"
        if self.stochastic and (low_param or state_dtype in LOW_PRECISION_DTYPES):
            return "stochastic"
        return "nearest"

    def rng_state(self, device):
        """The device's int64 [seed, counter], created at first use; the same tensor for the optimizer's life
        (cached op calls and captured CUDA graphs hold it), so loading a state dict writes into it."""
        rng = self._rng.get(device)
        if rng is None:
            counter = self._pending.pop(str(device), 0)
            rng = torch.tensor([self._seed, counter], dtype=torch.int64, device=device)
            self._rng[device] = rng
        return rng

    # ---- The stream in state dicts ----
    def rng_state_dict(self):
        """{"seed": int, "counters": {device name: int}}: plain data (torch.load's weights_only accepts it)."""
        counters = dict(self._pending)
        counters.update({str(device): int(rng[1]) for device, rng in self._rng.items()})  # syncs: saving only
        return {"seed": self._seed, "counters": counters}

    @staticmethod
    def check_rng_state_dict(saved):
        """Raises ValueError for a malformed "fusedopt_rng" entry, before load_state_dict changes anything."""
        ok = (isinstance(saved, dict) and isinstance(saved.get("seed"), numbers.Integral)
              and isinstance(saved.get("counters"), dict)
              and all(isinstance(k, str) and isinstance(v, numbers.Integral) for k, v in saved["counters"].items()))
        if not ok:
            raise ValueError(f"Invalid {RNG_KEY!r} entry in the state dict: {saved!r} (expected "
                             "{'seed': int, 'counters': {device name: int}})")

    def load_rng_state_dict(self, saved):
        self._seed = int(saved["seed"])
        counters = {name: int(counter) for name, counter in saved["counters"].items()}
        for device, rng in self._rng.items():  # a device the saved run never rounded on starts at 0, as it did
            rng.copy_(torch.tensor([self._seed, counters.pop(str(device), 0)], dtype=torch.int64))
        self._pending = counters


# ---- State dicts ----

def _params_by_saved_index(optimizer, state_dict):
    """{saved param index: param} as torch's load_state_dict pairs them (groups zipped in order); {} where the
    groups do not match, which torch's load then rejects with its own error."""
    saved_groups = state_dict.get("param_groups")
    groups = optimizer.param_groups
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(groups):
        return {}
    pairs = {}
    for saved, group in zip(saved_groups, groups):
        indices = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(indices, (list, tuple)) or len(indices) != len(group["params"]):
            return {}
        pairs.update(zip(indices, group["params"]))
    return pairs


def saved_tensors(optimizer, state_dict):
    """load_state_dict's pre-hook half: {param: {key: tensor as saved}} for every state buffer, extra and scalar
    state but `step` of the incoming state dict, which torch's load will cast to the param's dtype (rounding a
    float32 master copy, float32 moments or NAdam's float32 `mu_product` of a bf16 param, widening bf16 moments
    of a float32 one)."""
    spec = optimizer._spec
    keys = set(spec.states) | set(EXTRA_KEYS) | (set(spec.scalars) - {"step"})
    state = state_dict.get("state")
    if not isinstance(state, dict):
        return {}
    saved = {}
    for index, param in _params_by_saved_index(optimizer, state_dict).items():
        entry = state.get(index)
        if isinstance(entry, dict):
            saved[param] = {k: v for k, v in entry.items() if k in keys and torch.is_tensor(v)}
    return saved


def restore_tensors(optimizer, saved):
    """load_state_dict's post-hook half: each buffer in the configured state dtype, each extra in its own
    (float32 master, param-dtype compensation) and each scalar state in float32 (as the kernels keep it),
    converted from the tensors as saved: exact wherever the saving optimizer had the same options. Extras this
    optimizer's options do not use are dropped."""
    low_precision = optimizer.low_precision
    buffers = set(optimizer._spec.states)
    for param, tensors in saved.items():
        state = optimizer.state.get(param)
        if state is None:
            continue
        extra = low_precision.extra_key(param)
        for key, value in tensors.items():
            if key in EXTRA_KEYS and key != extra:
                state.pop(key, None)
                continue
            if key == extra:
                dtype = low_precision.extra_dtype(key, param)
            elif key in buffers:
                dtype = low_precision.state_dtype_for(param)
            else:
                dtype = torch.float32
            state[key] = value.to(device=param.device, dtype=dtype)


def for_torch(optimizer, state_dict):
    """`state_dict` as torch.optim would have saved it: no extras, no "fusedopt_rng", buffers in the params'
    dtypes (scalar state such as `step` as it is)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    buffers = set(optimizer._spec.states) if _ops.EXTENSION_AVAILABLE else set()
    state = {}
    for index, entry in state_dict["state"].items():
        param = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        state[index] = {
            key: value.to(param.dtype) if param is not None and key in buffers and torch.is_tensor(value) else value
            for key, value in entry.items() if key not in EXTRA_KEYS
        }
    out = {key: value for key, value in state_dict.items() if key != RNG_KEY}
    out["state"] = state
    return out
