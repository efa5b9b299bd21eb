"""`sm3_tf.SM3`: the SM3-II optimizer as a Keras 3 optimizer."""

import dataclasses
import math
import numbers
from typing import Any, Tuple

import keras

from sm3_tf import _compat
from sm3_tf import kernels

_HALF_DTYPES = ("float16", "bfloat16")
MOMENTUM_DTYPES = (None, "float32", "bfloat16")


@keras.saving.register_keras_serializable(package="sm3_tf")
class SM3(keras.optimizers.Optimizer):
    """Optimizer that implements SM3-II (Anil, Gupta, Koren and Singer, 2019).

    SM3 is an adaptive optimizer like Adagrad whose second-moment statistics
    cost almost no memory: a weight matrix of shape `(rows, cols)` keeps one
    number per row and one per column instead of one per entry. Each step
    estimates an entry's sum of squared gradients as the smaller of its row's
    and its column's number, adds the new squared gradient, and resets every
    row's (and column's) number to the largest estimate along it. A tensor of
    shape `(d0, ..., dk)` keeps `d0 + ... + dk` numbers; scalars and vectors
    keep a full Adagrad-style accumulator.

    State, per model variable `v` of path `p` (slashes as underscores): for
    rank >= 2, `p_accumulator_0`, ..., `p_accumulator_k` of shapes `(d0,)`,
    ..., `(dk,)`; for rank <= 1, `p_accumulator` of `v`'s shape; and
    `p_momentum` of `v`'s shape when `momentum > 0`. Each sits where Keras
    puts a slot of `v`. Zero-size variables keep nothing.

    Sparse gradients (`tf.IndexedSlices`, as an `Embedding` produces on the
    TensorFlow backend) take an exact sparse path that touches only the rows
    in the batch and gives the same parameters as the dense rule.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            Defaults to `0.1`. The running sum already shrinks the step, so no
            decay is needed; the published recipes use a quadratic warm-up
            (`sm3_tf.QuadraticWarmup`).
        momentum: Float in `[0, 1)`. Exponential moving average of the
            preconditioned gradient, `m = momentum * m + (1 - momentum) * u`.
            `0` keeps no momentum slot at all. Defaults to `0.9`.
        beta2: Float in `(0, 1]`. `1.0` (default) is the paper's running sum
            of squared gradients; a value below one replaces it by an
            exponential moving average (no bias correction).
        epsilon: Float `>= 0` added to the second moment inside the square
            root. Entries whose second moment is zero get a zero update, so
            `0` is valid. Defaults to `1e-30`.
        momentum_dtype: `None` (default: the variable's dtype), `"float32"`
            or `"bfloat16"`: the dtype the momentum is stored in. Its
            arithmetic is float32 either way; `"bfloat16"` halves the only
            per-parameter state SM3 keeps.
        cpu_kernel: `"auto"` (default), `True` or `False`. The CPU kernel runs
            each float32 matrix's step as one native pass inside the XLA
            program, in place, on TensorFlow and on JAX
            (`sm3_tf.kernels.native`). `"auto"` takes it where it can run;
            `True` also warns where it cannot; `False` never takes it.
        weight_decay: Float. If set, weight decay is applied (decoupled, as
            in Keras's optimizers).
        clipnorm: Float. If set, the gradient of each weight is individually
            clipped so that its norm is no higher than this value.
        clipvalue: Float. If set, the gradient of each weight is clipped to be
            no higher than this value.
        global_clipnorm: Float. If set, the gradient of all weights is clipped
            so that their global norm is no higher than this value.
        use_ema: Boolean, defaults to `False`. If `True`, an exponential
            moving average of the model's weights is kept (Polyak
            averaging); `finalize_variable_values` copies it in.
        ema_momentum: Float, defaults to 0.99. Only used if `use_ema=True`.
        ema_overwrite_frequency: Int or None. Only used if `use_ema=True`:
            every this many iterations the weights are overwritten by their
            moving average.
        loss_scale_factor: Float or `None`. If a float, gradients are divided
            by it before the step (the loss was multiplied by it).
        gradient_accumulation_steps: Int or `None`. If an int, gradients are
            accumulated and the step applied every this many calls, with
            their mean.
        name: String, the name of the optimizer's variables' scope.

    Reference:
        - [Anil et al., 2019](https://arxiv.org/abs/1901.11150),
          "Memory-Efficient Adaptive Optimization", NeurIPS 2019.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        beta2=1.0,
        epsilon=1e-30,
        momentum_dtype=None,
        cpu_kernel="auto",
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="sm3",
        **kwargs,
    ):
        if _is_number(learning_rate):
            _check_range("learning_rate", learning_rate, "[0, inf)",
                         lambda x: 0 <= x < math.inf)
            learning_rate = float(learning_rate)  # NumPy scalars too
        _check_range("momentum", momentum, "[0, 1)", lambda x: 0 <= x < 1)
        _check_range("beta2", beta2, "(0, 1]", lambda x: 0 < x <= 1)
        _check_range("epsilon", epsilon, "[0, inf)",
                     lambda x: 0 <= x < math.inf)
        if momentum_dtype is not None:
            momentum_dtype = keras.backend.standardize_dtype(momentum_dtype)
        if momentum_dtype not in MOMENTUM_DTYPES:
            raise ValueError(
                "SM3 argument `momentum_dtype` must be one of (None, "
                f"'float32', 'bfloat16'); received {momentum_dtype!r}.")
        if not (isinstance(cpu_kernel, bool) or cpu_kernel == "auto"):
            raise ValueError(
                "SM3 argument `cpu_kernel` must be one of (\"auto\", True, "
                f"False); received cpu_kernel={cpu_kernel!r}.")
        if cpu_kernel is True and keras.backend.backend() not in (
                "tensorflow", "jax"):
            raise ValueError(
                "SM3 argument `cpu_kernel=True` needs Keras's TensorFlow or "
                f"JAX backend (this is {keras.backend.backend()!r}); leave "
                "it \"auto\" or set it False.")
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        self.momentum = float(momentum)
        self.beta2 = float(beta2)
        self.epsilon = float(epsilon)
        self.momentum_dtype = momentum_dtype
        self.cpu_kernel = cpu_kernel
        self._settings = kernels.Settings(self.momentum, self.beta2,
                                          self.epsilon, cpu_kernel)
        self._order = None

    # ------------------------------------------------------------------ state

    def build(self, var_list):
        """Creates each variable's accumulators, then its momentum, in order
        (Keras saves optimizer variables by position: this is the format)."""
        if self.built:
            return
        for variable in var_list:
            if None in _shape(variable):
                raise ValueError(
                    "SM3 needs variables with a fully known shape, to size "
                    f"its per-dimension accumulators; variable "
                    f"{_name(variable)!r} has shape {_shape(variable)}.")
        super().build(var_list)
        slots = []
        for variable in var_list:
            shape = _shape(variable)
            if getattr(variable, "overwrite_with_gradient", False) or (
                    0 in shape):
                slots.append(None)
                continue
            compute_dtype = _compute_dtype(variable.dtype)
            if len(shape) <= 1:
                accumulators = (self._add_slot(
                    variable, "accumulator", shape, compute_dtype, None),)
            else:
                accumulators = tuple(
                    self._add_slot(variable, f"accumulator_{axis}", (size,),
                                   compute_dtype, axis)
                    for axis, size in enumerate(shape))
            momentum = None
            if self.momentum > 0:
                momentum = self._add_slot(
                    variable, "momentum", shape,
                    self.momentum_dtype or variable.dtype, "all")
            slots.append(kernels.Slots(accumulators, momentum))
        # A plain object: Keras's tracker would take a list of model
        # variables for optimizer state.
        self._state = _State(tuple(var_list), tuple(slots))

    def _add_slot(self, variable, suffix, shape, dtype, axis):
        """A slot of `variable`, named and placed as Keras places one."""
        layout = _slot_layout(variable, axis)
        with kernels.placed_beside(variable):
            return self.add_variable(
                shape, dtype=dtype, name=f"{_slot_prefix(variable)}_{suffix}",
                **({} if layout is None else {"layout": layout}))

    def accumulators_for(self, variable):
        """A model variable's accumulator variables: one per axis (rank >= 2)
        or one of its shape (rank <= 1); `()` for a zero-size variable."""
        slots = self._slots_of(variable)
        return () if slots is None else slots.accumulators

    def momentum_for(self, variable):
        """A model variable's momentum variable, or None."""
        slots = self._slots_of(variable)
        return None if slots is None else slots.momentum

    def _slots_of(self, variable):
        return self._state.slots[_compat.variable_index(self, variable)]

    # ------------------------------------------------------------------ step

    def apply(self, grads, trainable_variables=None):
        """Applies `grads` to `trainable_variables` (see Keras's `apply`).

        Refuses, before writing anything, a gradient whose shape is not its
        variable's, and a sparse gradient with rows outside its variable. Steps the variables last first, the order in which
        backpropagation produces their gradients (`sm3_tf.kernels`).
        """
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                return super().apply(grads)  # Keras's error
            variables = list(self._state.variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                self.build(variables)
        for gradient, variable in zip(grads, variables):
            _check_gradient_shape(gradient, variable)
        self._order = kernels.Order(grads)
        try:
            with kernels.checked(grads, variables):
                return super().apply(grads[::-1], variables[::-1])
        finally:
            self._order = None

    def update_step(self, gradient, variable, learning_rate):
        """Applies one SM3 step to `variable` (`sm3_tf.kernels.update`)."""
        index = _compat.variable_index(self, variable)
        slots = self._state.slots[index]
        if slots is not None:
            kernels.update(self._settings, gradient, variable, slots,
                           learning_rate, self._order, index)

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "beta2": self.beta2,
            "epsilon": self.epsilon,
            "momentum_dtype": self.momentum_dtype,
            "cpu_kernel": self.cpu_kernel,
        })
        return config


@dataclasses.dataclass(frozen=True)
class _State:
    variables: Tuple[Any, ...]  # the model variables, in build order
    slots: Tuple[Any, ...]  # their `kernels.Slots`, None for no state


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_range(name, value, allowed, test):
    if not _is_number(value) or not test(float(value)):
        raise ValueError(
            f"SM3 argument `{name}` must be a number in {allowed}; "
            f"received {name}={value!r}.")


def _check_gradient_shape(gradient, variable):
    """A ValueError naming `variable` where `gradient` does not fit it (a
    `tf.IndexedSlices` must fit its rows: every axis but the first)."""
    if gradient is None:
        return
    shape = _shape(variable)
    sparse = kernels.is_sparse(gradient)
    given = tuple(gradient.values.shape if sparse else gradient.shape)
    if sparse:
        given, shape = given[1:], shape[1:]
    if len(given) != len(shape) or any(
            a is not None and a != b for a, b in zip(given, shape)):
        what = "rows of its sparse gradient have" if sparse else (
            "gradient has")
        raise ValueError(
            f"SM3: variable {_name(variable)!r} has shape "
            f"{_shape(variable)}, but the {what} shape {given}.")


def _slot_layout(variable, axis):
    """The layout of a slot of `variable` under a Keras distribution: the
    variable's own (axis "all" or None), its axis `axis`'s (an
    accumulator); None without a distribution, or on a Keras whose
    optimizers place no variable by layout (before 3.9)."""
    distribution = keras.distribution.distribution()
    if distribution is None or not _compat.ADD_VARIABLE_TAKES_LAYOUT:
        return None
    layout = distribution.get_variable_layout(variable)
    if layout is None or axis in ("all", None):
        return layout
    return keras.distribution.TensorLayout([layout.axes[axis]],
                                           layout.device_mesh)


def _shape(variable):
    shape = variable.shape
    if hasattr(shape, "as_list"):  # tf.TensorShape
        return (None,) if shape.rank is None else tuple(shape.as_list())
    return tuple(shape)


def _name(variable):
    return getattr(variable, "path", None) or str(variable.name).split(":")[0]


def _slot_prefix(variable):
    """The prefix Keras's `add_variable_from_reference` gives slot names."""
    if hasattr(variable, "path"):
        return variable.path.replace("/", "_")
    return str(variable.name).replace("/", "_").replace(":", "_")


def _compute_dtype(dtype):
    """float32 for half-precision variables (so epsilon and small squares
    survive), otherwise the variable's own dtype (float64 stays float64)."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in _HALF_DTYPES else dtype

