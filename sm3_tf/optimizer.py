"""`sm3_tf.SM3`: the SM3-II optimizer as a Keras 3 optimizer."""

import warnings

import keras
import numpy as np
from keras import ops

from sm3_tf import rule

_HALF_DTYPES = ("float16", "bfloat16")

# The optimizer state's layout in Keras's saving (`SM3.save_own_variables`):
# 1 was sm3_tf 0.1 (one accumulator per axis), 2 was 0.2 (one per variable).
LAYOUT = 3
LAYOUT_KEY = "sm3_tf_layout"


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
        cpu_kernel: `"auto"` (default), `True` or `False`; TensorFlow
            backend. The CPU kernel runs the dense step of each float32
            matrix (rank >= 2) as one hand-written AVX-512 pass inside the
            XLA program, which reads the gradient once where XLA:CPU reads
            it three times, and the step's vectors together in one more
            call: about the speed of SGD with momentum
            (docs/performance.md). Built with the system's C++ compiler at
            first use (about 10 s) and cached. `"auto"` takes it wherever it
            can run (an x86-64 CPU with AVX-512F, a C++ compiler, no GPU or
            TPU in the process) and SM3's portable path elsewhere, saying
            why at INFO level; `True` asks for it and warns once where it
            cannot run; `False` never takes it. Same rule either way,
            rounded as the NumPy reference rounds it. On Keras's other
            backends SM3 always takes its portable path (`True` is refused
            there).
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
        if not (isinstance(cpu_kernel, bool) or (
            isinstance(cpu_kernel, str) and cpu_kernel == "auto")):
            raise ValueError(
                "SM3 argument `cpu_kernel` must be one of (\"auto\", True, "
                f"False); received cpu_kernel={cpu_kernel!r}."
            )
        if cpu_kernel is True and not _is_tensorflow():
            raise ValueError(
                "SM3: `cpu_kernel=True` needs Keras's TensorFlow backend "
                f"(this is {keras.backend.backend()!r}); leave it \"auto\" "
                "or set it False"
            )
        self.momentum = float(momentum)
        self.beta2 = float(beta2)
        self.epsilon = float(epsilon)
        self.cpu_kernel = cpu_kernel

    # ------------------------------------------------------------------ state

    def build(self, var_list):
        """Creates the accumulators (and momentum) for `var_list`, in order.

        For each variable, in the order given: its `accumulator` when its
        rank is >= 2 (its per-axis vectors end to end, `d0 + d1 + ...`
        entries, axis 0 first; `accumulators_for` splits it), then
        `momentum` when `momentum > 0`. After them, one `vector_accumulator`
        per compute dtype holds the accumulators of every scalar and vector
        (one entry per entry, in `var_list` order). Few variables, not one
        per axis or per bias: each variable a step updates costs TensorFlow
        about 10 us to launch (docs/performance.md), and a step's scalars
        and vectors are stepped together. Keras saves optimizer variables by
        position, so this order is the checkpoint format (`save_own_variables`
        marks it); `load_own_variables` also reads the layouts of sm3_tf 0.1
        and 0.2.
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
        self._vector_slots = []  # (vector_accumulator index, offset)
        self._momentums = []
        vector_dtypes = []
        vector_sizes = []
        for variable in var_list:
            shape = _static_shape(variable)
            if self._overwrite_variable_with_gradient(variable) or (
                0 in shape
            ):
                self._accumulators.append(None)
                self._vector_slots.append(None)
                self._momentums.append(None)
                continue
            dtype = _compute_dtype(variable.dtype)
            if len(shape) <= 1:
                if dtype not in vector_dtypes:
                    vector_dtypes.append(dtype)
                    vector_sizes.append(0)
                buffer = vector_dtypes.index(dtype)
                self._vector_slots.append((buffer, vector_sizes[buffer]))
                vector_sizes[buffer] += int(np.prod(shape))
                self._accumulators.append(None)
            else:
                self._vector_slots.append(None)
                self._accumulators.append(
                    self._add_slot(
                        variable, "accumulator", (sum(shape),), dtype
                    )
                )
            self._momentums.append(
                self.add_variable_from_reference(variable, "momentum")
                if self.momentum > 0
                else None
            )
        self._vector_accumulators = [
            self.add_variable(
                (size,),
                dtype=dtype,
                name="vector_accumulator"
                + ("" if len(vector_dtypes) == 1 else f"_{dtype}"),
            )
            for dtype, size in zip(vector_dtypes, vector_sizes)
        ]

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

    def save_own_variables(self, store):
        """Keras's saving (the variables by position), and the layout's
        number under `"sm3_tf_layout"`, so a later version can read it."""
        super().save_own_variables(store)
        store[LAYOUT_KEY] = np.array(LAYOUT)

    def load_own_variables(self, store):
        """Sets the state from `store` (Keras's saving), by position.

        Reads this layout and those of sm3_tf 0.1 (one accumulator variable
        per axis) and 0.2 (one per variable, scalars and vectors included),
        which saved no layout number. A store that fits none of them gets
        Keras's warning and loads nothing.
        """
        keys = list(store.keys())
        if LAYOUT_KEY in keys:
            layout = int(np.asarray(store[LAYOUT_KEY]))
            if layout != LAYOUT:
                raise ValueError(
                    f"SM3: the optimizer state was saved in layout {layout}, "
                    f"which this sm3_tf (layout {LAYOUT}) cannot read; load "
                    "it with the sm3_tf that saved it."
                )
            values = [store[str(i)] for i in range(len(keys) - 1)]
        else:
            values = self._from_older_layout(store)
            if values is None:
                super().load_own_variables(store)
                return
        if len(values) != len(self.variables):
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}', "
                f"because it has {len(self.variables)} variables whereas "
                f"the saved optimizer has {len(values)} variables.",
                stacklevel=2,
            )
            return
        for variable, value in zip(self.variables, values):
            variable.assign(value)

    def _from_older_layout(self, store):
        """`store` read as sm3_tf 0.2's layout or else 0.1's, in this layout;
        None if it is neither (shapes must match throughout)."""
        if not self.built:
            return None
        saved = [store[str(i)] for i in range(len(store.keys()))]
        for per_axis in (False, True):
            values = self._read_older_layout(saved, per_axis)
            if values is not None:
                return values
        return None

    def _read_older_layout(self, saved, per_axis):
        """0.2: per variable with any state, its accumulator (rank >= 2:
        packed) then its momentum; 0.1: the same with one accumulator per
        axis. Both start with Keras's own variables (iterations, ...)."""
        slots = (
            sum(a is not None for a in self._accumulators)
            + sum(m is not None for m in self._momentums)
            + len(self._vector_accumulators)
        )
        head = len(self.variables) - slots
        values, position = list(saved[:head]), head
        vectors = [
            np.zeros(tuple(buffer.shape), buffer.dtype)
            for buffer in self._vector_accumulators
        ]
        for variable, accumulator, slot, momentum in zip(
            self._trainable_variables, self._accumulators,
            self._vector_slots, self._momentums,
        ):
            if accumulator is None and slot is None:
                continue
            shape = _static_shape(variable)
            axes = len(shape) if per_axis and len(shape) > 1 else 1
            parts = saved[position:position + axes]
            position += axes
            if len(parts) != axes:
                return None
            if slot is not None:
                if tuple(np.shape(parts[0])) != shape:
                    return None
                buffer, offset = slot
                size = int(np.prod(shape))
                vectors[buffer][offset:offset + size] = np.reshape(
                    parts[0], (-1,))
            else:
                values.append(np.concatenate(
                    [np.reshape(p, (-1,)) for p in parts]))
            if momentum is not None:
                values.append(
                    saved[position] if position < len(saved) else None)
                position += 1
        values += vectors
        if position != len(saved) or len(values) != len(self.variables) or any(
            value is None or tuple(np.shape(value)) != _static_shape(target)
            for value, target in zip(values, self.variables)
        ):
            return None
        return values

    def accumulator_for(self, variable):
        """The optimizer variable that holds a model variable's accumulator:
        its own for rank >= 2 (its per-axis vectors end to end); for a scalar
        or vector, the `vector_accumulator` it shares with the others of its
        dtype (`accumulators_for` gives its part). None for zero-size
        variables."""
        index = self._get_variable_index(variable)
        slot = self._vector_slots[index]
        if slot is not None:
            return self._vector_accumulators[slot[0]]
        return self._accumulators[index]

    def accumulators_for(self, variable):
        """A model variable's accumulators as values, one per axis (rank >= 2)
        or one of the variable's shape (rank <= 1); for inspection."""
        index = self._get_variable_index(variable)
        shape = _static_shape(variable)
        slot = self._vector_slots[index]
        if slot is not None:
            buffer, offset = slot
            return [_vector_part(
                ops.convert_to_tensor(self._vector_accumulators[buffer]),
                offset, shape)]
        accumulator = self._accumulators[index]
        if accumulator is None:
            return []
        return rule.unpack(ops.convert_to_tensor(accumulator), shape)

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

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Steps each variable of rank >= 2 on its own and each dtype's
        scalars and vectors together (TensorFlow: in
        `_distributed_tf_update_step`, under the distribution strategy)."""
        if _is_tensorflow():
            super()._backend_update_step(
                grads, trainable_variables, learning_rate
            )
            return
        others, groups = self._vector_groups(zip(grads, trainable_variables))
        for gradient, variable in others:
            self.update_step(gradient, variable, learning_rate)
        for accumulator, items in groups:
            self._step_vectors(accumulator, items, learning_rate)

    def _distributed_tf_update_step(
        self, distribution, grads_and_vars, learning_rate
    ):
        """Keras's loop over the step's variables (TensorFlow backend), then
        each dtype's scalars and vectors in one update."""
        from sm3_tf import tf_compile

        others, groups = self._vector_groups(grads_and_vars)
        super()._distributed_tf_update_step(
            distribution, others, learning_rate
        )
        for accumulator, items in groups:
            tf_compile.vector_update(
                self, distribution, accumulator, items, learning_rate
            )

    def _vector_groups(self, grads_and_vars):
        """Splits a step's `(gradient, variable)` pairs into the scalars and
        vectors that take the dense rule, grouped by the `vector_accumulator`
        they share as `(accumulator, [(gradient, variable, offset,
        momentum), ...])`, and the other pairs."""
        others, groups = [], {}
        for gradient, variable in grads_and_vars:
            index = self._get_variable_index(variable)
            slot = self._vector_slots[index]
            if slot is None or self._takes_sparse_step(gradient, variable):
                others.append((gradient, variable))
                continue
            buffer, offset = slot
            groups.setdefault(buffer, []).append(
                (_dense(gradient), variable, offset, self._momentums[index])
            )
        return others, [
            (self._vector_accumulators[buffer], items)
            for buffer, items in sorted(groups.items())
        ]

    def _takes_sparse_step(self, gradient, variable):
        """Whether `gradient` takes the sparse path (`sm3_tf.sparse`). With
        beta2 < 1 every row's statistics decay: the step is dense by nature
        (spec, sparse rule 6)."""
        if not _is_tensorflow():
            return False
        from sm3_tf import sparse

        return (sparse.is_sparse(gradient) and self.beta2 == 1.0
                and len(variable.shape) >= 1)

    def update_step(self, gradient, variable, learning_rate):
        """Applies one SM3 step to `variable` (Keras's `apply` steps the
        scalars and vectors together instead, `_step_vectors`)."""
        index = self._get_variable_index(variable)
        accumulator = self._accumulators[index]
        slot = self._vector_slots[index]
        momentum = self._momentums[index]
        if accumulator is None and slot is None:  # zero-size: nothing to do
            return
        offset = 0
        if slot is not None:
            buffer, offset = slot
            accumulator = self._vector_accumulators[buffer]
        if self._takes_sparse_step(gradient, variable):
            from sm3_tf import sparse

            sparse.sparse_step(
                self, gradient, variable, accumulator, momentum,
                learning_rate, offset=offset,
            )
            return
        gradient = _dense(gradient)
        if slot is not None:
            self._step_vectors(
                accumulator, [(gradient, variable, offset, momentum)],
                learning_rate,
            )
        elif _is_tensorflow():
            from sm3_tf import tf_compile

            tf_compile.dense_update(
                self, gradient, variable, accumulator, momentum,
                learning_rate,
            )
        else:
            self._dense_update(
                gradient, variable, accumulator, momentum, learning_rate
            )

    def _step_vectors(self, accumulator, items, learning_rate):
        """The dense rule on scalars and vectors that share `accumulator`
        (any backend). For them it is Adagrad's, entry by entry.

        Args:
            accumulator: their `vector_accumulator`.
            items: `(gradient, variable, offset, momentum)` per variable,
                `offset` where its entries start in `accumulator`.
            learning_rate: this step's learning rate.
        """
        old = ops.convert_to_tensor(accumulator)
        parts = []
        for gradient, variable, offset, momentum in items:
            shape = _static_shape(variable)
            update, (new,) = rule.dense_step(
                ops.cast(gradient, old.dtype),
                [_vector_part(old, offset, shape)],
                self.beta2,
                self.epsilon,
            )
            parts.append((offset, ops.reshape(new, (-1,))))
            self._apply_update(variable, momentum, update, learning_rate)
        self.assign(accumulator, _spliced(old, parts))

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


def _vector_part(vector, offset, shape):
    """The entries of a variable of `shape` in a `vector_accumulator`."""
    size = int(np.prod(shape))
    return ops.reshape(ops.slice(vector, (offset,), (size,)), shape)


def _spliced(vector, parts):
    """`vector` with each `(offset, part)` of `parts` written from `offset`."""
    pieces, end = [], 0
    for offset, part in sorted(parts, key=lambda p: p[0]):
        if offset > end:
            pieces.append(ops.slice(vector, (end,), (offset - end,)))
        pieces.append(part)
        end = offset + part.shape[0]
    if end < vector.shape[0]:
        pieces.append(ops.slice(vector, (end,), (vector.shape[0] - end,)))
    return pieces[0] if len(pieces) == 1 else ops.concatenate(pieces)


def _dense(gradient):
    """A dense gradient (TensorFlow's `tf.IndexedSlices` made dense, their
    repeated rows summed)."""
    if _is_tensorflow():
        from sm3_tf import sparse

        if sparse.is_sparse(gradient):
            return sparse.densify(gradient)
    return gradient


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
