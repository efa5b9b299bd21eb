"""`sm3_tf.SM3`: the SM3-II optimizer as a Keras 3 optimizer."""

import keras
import numpy as np
from keras import ops

from sm3_tf import rule

_HALF_DTYPES = ("float16", "bfloat16")


def _is_tensorflow():
    return keras.backend.backend() == "tensorflow"


def _check_range(name, value, low, high, low_open, high_open, allowed):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(
            f"SM3 argument `{name}` must be a number in {allowed}; "
            f"received {name}={value!r}."
        )
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ValueError(
            f"SM3 argument `{name}` must be in {allowed}; "
            f"received {name}={value!r}."
        )


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

    Sparse gradients (`tf.IndexedSlices`, as an `Embedding` produces on the
    TensorFlow backend) take an exact sparse path that touches only the rows
    in the batch and gives the same parameters as the dense rule.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            Defaults to `0.1`. The running sum already shrinks the step, so no
            decay is needed; the published recipes use a quadratic warm-up
            (see `sm3_tf.schedules.QuadraticWarmup`).
        momentum: Float in `[0, 1)`. Exponential moving average of the
            preconditioned gradient, `m = momentum * m + (1 - momentum) * u`.
            `0` keeps no momentum slot at all. Defaults to `0.9`.
        beta2: Float in `(0, 1]`. `1.0` (default) is the paper's running sum
            of squared gradients; a value below one replaces it by an
            exponential moving average (no bias correction).
        epsilon: Float `>= 0` added to the second moment inside the square
            root. Entries whose second moment is zero get a zero update, so
            `0` is valid. Defaults to `1e-30`.
        cpu_kernel: Boolean (TensorFlow backend). `True` runs the dense
            step of each float32 matrix (rank >= 2) as one hand-written
            AVX-512 pass inside the XLA program, which reads the gradient
            once where XLA:CPU reads it three times, and the step's vectors
            together in one more call: about the speed of SGD with
            momentum (docs/performance.md). Built with the system's
            C++ compiler at first use and cached; where the CPU, compiler or
            device does not allow it, SM3 logs why once and takes its
            portable path. Same rule, rounded as the NumPy reference rounds
            it. Defaults to `False`.
        {{base_optimizer_keyword_args}}

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
        cpu_kernel=False,
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
        if isinstance(learning_rate, (int, float)) and not isinstance(
            learning_rate, bool
        ):
            _check_range(
                "learning_rate", learning_rate, 0.0, float("inf"),
                False, False, "[0, inf)",
            )
        _check_range("momentum", momentum, 0.0, 1.0, False, True, "[0, 1)")
        _check_range("beta2", beta2, 0.0, 1.0, True, False, "(0, 1]")
        _check_range(
            "epsilon", epsilon, 0.0, float("inf"), False, False, "[0, inf)"
        )
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
        if not isinstance(cpu_kernel, bool):
            raise ValueError(
                "SM3: `cpu_kernel` must be a bool (True or False), got "
                f"{cpu_kernel!r}"
            )
        if cpu_kernel and not _is_tensorflow():
            raise ValueError(
                "SM3: `cpu_kernel=True` needs Keras's TensorFlow backend "
                f"(this is {keras.backend.backend()!r}); leave it False"
            )
        self.momentum = float(momentum)
        self.beta2 = float(beta2)
        self.epsilon = float(epsilon)
        self.cpu_kernel = cpu_kernel

    # ------------------------------------------------------------------ state

    def build(self, var_list):
        """Creates the accumulators (and momentum) for `var_list`, in order.

        For each variable, in the order given: its `accumulator`, then
        `momentum` when `momentum > 0`. The accumulator of a variable of
        rank >= 2 holds its per-axis vectors end to end (`d0 + d1 + ...`
        entries, axis 0 first; `accumulators_for` splits it); of a scalar or
        vector, one entry per entry. One variable, not one per axis: each
        variable a step updates costs TensorFlow about 10 us to launch
        (docs/performance.md). Keras saves optimizer variables by position, so
        this order is part of the checkpoint format; `load_own_variables`
        also reads the layout of sm3_tf 0.1, one variable per axis.
        """
        if self.built:
            return
        for variable in var_list:
            if any(d is None for d in _static_shape(variable)):
                raise ValueError(
                    "SM3 needs variables with a fully known shape, to size "
                    f"its per-dimension accumulators; variable "
                    f"{_variable_name(variable)!r} has shape "
                    f"{_static_shape(variable)}."
                )
        super().build(var_list)
        self._accumulators = []
        self._momentums = []
        for variable in var_list:
            shape = _static_shape(variable)
            if self._overwrite_variable_with_gradient(variable) or (
                0 in shape
            ):
                self._accumulators.append(None)
                self._momentums.append(None)
                continue
            self._accumulators.append(
                self._add_slot(
                    variable,
                    "accumulator",
                    shape if len(shape) <= 1 else (sum(shape),),
                    _compute_dtype(variable.dtype),
                )
            )
            self._momentums.append(
                self.add_variable_from_reference(variable, "momentum")
                if self.momentum > 0
                else None
            )

    def _add_slot(self, variable, slot_name, shape, dtype):
        """An optimizer variable named after `variable`, placed beside it."""
        name = f"{_slot_prefix(variable)}_{slot_name}"
        if _is_tensorflow() and hasattr(self, "_distribution_strategy"):
            colocate = (
                variable.value
                if isinstance(variable, keras.Variable)
                else variable
            )
            with self._distribution_strategy.extended.colocate_vars_with(
                colocate
            ):
                return self.add_variable(shape, dtype=dtype, name=name)
        return self.add_variable(shape, dtype=dtype, name=name)

    def load_own_variables(self, store):
        """Sets the state from `store` (Keras's saving), by position.

        Also reads what sm3_tf 0.1 saved, with one accumulator variable per
        axis: each variable's axes are packed into its one accumulator.
        Anything else Keras handles (a different count: a warning, nothing
        loaded).
        """
        legacy = self._from_per_axis_layout(store)
        if legacy is None:
            super().load_own_variables(store)
            return
        for variable, value in zip(self.variables, legacy):
            variable.assign(value)

    def _from_per_axis_layout(self, store):
        """`store` read as sm3_tf 0.1's layout, in this layout; None if it
        is not that layout (or this layout is the same)."""
        count = len(store.keys())
        if not self.built or count == len(self.variables):
            return None
        slots = sum(a is not None for a in self._accumulators) + sum(
            m is not None for m in self._momentums
        )
        head = len(self.variables) - slots
        saved = [store[str(i)] for i in range(count)]
        values, position = saved[:head], head
        for variable, accumulator, momentum in zip(
            self._trainable_variables, self._accumulators, self._momentums
        ):
            if accumulator is None:
                continue
            shape = _static_shape(variable)
            axes = len(shape) if len(shape) > 1 else 1
            parts = saved[position:position + axes]
            position += axes
            if len(parts) != axes:
                return None
            values.append(
                parts[0] if axes == 1 else np.concatenate(
                    [np.reshape(p, (-1,)) for p in parts])
            )
            if momentum is not None:
                values.append(saved[position] if position < count else None)
                position += 1
        if position != count or any(
            value is None or tuple(np.shape(value)) != _static_shape(target)
            for value, target in zip(values, self.variables)
        ):
            return None
        return values

    def accumulator_for(self, variable):
        """The accumulator variable of a model variable (None if it has none:
        zero-size variables). Rank >= 2: its per-axis vectors end to end."""
        return self._accumulators[self._get_variable_index(variable)]

    def accumulators_for(self, variable):
        """A model variable's accumulators as values, one per axis (rank >= 2)
        or one of the variable's shape (rank <= 1); for inspection."""
        accumulator = self.accumulator_for(variable)
        if accumulator is None:
            return []
        return rule.unpack(
            ops.convert_to_tensor(accumulator), _static_shape(variable)
        )

    def momentum_for(self, variable):
        """The momentum variable of a model variable, or None."""
        return self._momentums[self._get_variable_index(variable)]

    # ------------------------------------------------------------------ step

    def apply(self, grads, trainable_variables=None):
        """Applies `grads` to `trainable_variables` (see Keras's `apply`)."""
        if _is_tensorflow():
            from sm3_tf import tf_compile

            tf_compile.wait_for_all_gradients(self, grads)
        return super().apply(grads, trainable_variables)

    def _distributed_tf_update_step(
        self, distribution, grads_and_vars, learning_rate
    ):
        """Keras's loop over the step's variables (TensorFlow backend), with
        the vectors the CPU kernel takes stepped together at its end."""
        from sm3_tf import tf_compile

        with tf_compile.vectors_grouped(self, distribution, learning_rate):
            super()._distributed_tf_update_step(
                distribution, grads_and_vars, learning_rate
            )

    def update_step(self, gradient, variable, learning_rate):
        """Applies one SM3 step to `variable`."""
        index = self._get_variable_index(variable)
        accumulator = self._accumulators[index]
        if accumulator is None:  # a zero-size variable: nothing to do
            return
        momentum = self._momentums[index]
        if _is_tensorflow():
            from sm3_tf import sparse
            from sm3_tf import tf_compile

            if sparse.is_sparse(gradient):
                if self.beta2 < 1.0 or len(variable.shape) == 0:
                    # With beta2 < 1 every row's statistics decay: the
                    # step is dense by nature (spec, sparse rule 6).
                    gradient = sparse.densify(gradient)
                else:
                    sparse.sparse_step(
                        self, gradient, variable, accumulator, momentum,
                        learning_rate,
                    )
                    return
            tf_compile.dense_update(
                self, gradient, variable, accumulator, momentum,
                learning_rate,
            )
            return
        self._dense_update(
            gradient, variable, accumulator, momentum, learning_rate
        )

    def _dense_update(
        self, gradient, variable, accumulator, momentum, learning_rate
    ):
        """The dense rule on one variable and its state (any backend)."""
        grad = ops.cast(gradient, _compute_dtype(variable.dtype))
        shape = _static_shape(variable)
        update, new_accumulators = rule.dense_step(
            grad,
            rule.unpack(ops.convert_to_tensor(accumulator), shape),
            self.beta2,
            self.epsilon,
            blocks=_reduction_blocks(variable),
            split_fold_reductions=_split_fold_reductions(),
        )
        self.assign(accumulator, rule.pack(new_accumulators, shape))
        self._apply_update(variable, momentum, update, learning_rate)

    def _apply_update(self, variable, momentum, update, learning_rate):
        """`m = momentum * m + (1 - momentum) * u; var -= lr * m`, dense."""
        compute_dtype = update.dtype
        lr = ops.cast(learning_rate, compute_dtype)
        if momentum is None:
            self.assign_sub(variable, ops.cast(lr * update, variable.dtype))
            return
        m = ops.cast(momentum, compute_dtype)
        new_m = self.momentum * m + (1.0 - self.momentum) * update
        self.assign(momentum, ops.cast(new_m, momentum.dtype))
        self.assign_sub(variable, ops.cast(lr * new_m, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "beta2": self.beta2,
                "epsilon": self.epsilon,
                "cpu_kernel": self.cpu_kernel,
            }
        )
        return config


# How many slices `rule.fold_max` folds a large tensor into before reducing
# it. On XLA:CPU, reductions write their input to memory first, while
# elementwise maxima of slices fuse with the gradient's expression into one
# vectorized loop: folding measured about twice as fast there
# (docs/performance.md). GPU and TPU compilers fuse reductions with
# their producers, and eager PyTorch would copy every slice: 1 there.
CPU_REDUCTION_BLOCKS = 8


def _reduction_blocks(variable):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        placed = getattr(variable, "value", variable)  # the tf.Variable
        device = (getattr(placed, "device", "") or "").upper()
        on_cpu = "GPU" not in device and "TPU" not in device
    elif backend == "jax":
        import jax

        on_cpu = jax.default_backend() == "cpu"
    else:
        on_cpu = False
    return CPU_REDUCTION_BLOCKS if on_cpu else 1


def _split_fold_reductions():
    """Whether folded tensors are reduced as two slices (`rule.fold_max`).

    On Keras's JAX backend (CPU, where it folds), jaxlib's XLA otherwise
    writes every slice of a fold out in full at each step: SM3's step on
    ResNet-50's and Transformer-Big's variables measured 3.1-4.2x as long.
    TensorFlow's XLA fuses the folds either way and runs slower with it.
    """
    return keras.backend.backend() == "jax"


def _static_shape(variable):
    shape = variable.shape
    if hasattr(shape, "as_list"):  # tf.TensorShape
        if shape.rank is None:
            return (None,)
        return tuple(shape.as_list())
    return tuple(shape)


def _variable_name(variable):
    return getattr(variable, "path", None) or str(variable.name).split(":")[0]


def _slot_prefix(variable):
    """The prefix Keras's `add_variable_from_reference` gives slot names, so
    that accumulators and momentum are named alike."""
    if hasattr(variable, "path"):
        return variable.path.replace("/", "_")
    return str(variable.name).replace("/", "_").replace(":", "_")


def _compute_dtype(dtype):
    """float32 for half-precision variables (so epsilon and small squares
    survive), otherwise the variable's own dtype (float64 stays float64)."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in _HALF_DTYPES else dtype


SM3.__doc__ = SM3.__doc__.replace(
    "{{base_optimizer_keyword_args}}",
    keras.src.optimizers.optimizer.base_optimizer_keyword_args,
)
