"""A NumPy transcription of the rule in docs/spec.md, written for clarity.

It reduces each axis directly (no pass-saving view) so that the package's
implementations are checked against the plain statement of the rule.
"""

import ml_dtypes
import numpy as np


class SM3Reference:
    """Dense SM3-II on one NumPy array, one `step(grad)` at a time.

    `momentum_dtype`: None (the variable's) or "bfloat16": the momentum is
    stored rounded to it (from float32: a float64 momentum is rounded to
    float32 first), its arithmetic done in the variable's dtype, and the
    variable steps by the momentum as stored.
    """

    def __init__(self, var, learning_rate=0.1, momentum=0.9, beta2=1.0,
                 epsilon=1e-30, momentum_dtype=None):
        self.var = np.array(var)
        self.lr = learning_rate
        self.momentum = momentum
        self.beta2 = beta2
        self.epsilon = epsilon
        dtype = self.var.dtype
        if self.var.ndim <= 1:
            self.acc = [np.zeros(self.var.shape, dtype)]
        else:
            self.acc = [np.zeros(d, dtype) for d in self.var.shape]
        self.stored = (ml_dtypes.bfloat16 if momentum_dtype == "bfloat16"
                       else dtype)
        self.m = np.zeros(self.var.shape, self.stored)

    def prev(self):
        if self.var.ndim <= 1:
            return self.acc[0]
        prev = None
        for axis, acc in enumerate(self.acc):
            shape = [1] * self.var.ndim
            shape[axis] = -1
            laid = acc.reshape(shape)
            prev = laid if prev is None else np.minimum(prev, laid)
        return np.broadcast_to(prev, self.var.shape)

    def step(self, grad):
        grad = np.asarray(grad, self.var.dtype)
        if self.var.size == 0:
            return self.var
        prev = self.prev()
        with np.errstate(invalid="ignore", over="ignore"):
            square = grad * grad
        square = np.where(np.isnan(square), np.inf, square)  # NaN counts as inf
        if self.beta2 == 1.0:
            nu = prev + square
        else:
            nu = self.beta2 * prev + (1 - self.beta2) * square
        if self.var.ndim <= 1:
            self.acc = [nu]
        else:
            axes = range(self.var.ndim)
            self.acc = [
                nu.max(axis=tuple(a for a in axes if a != i))
                for i in axes
            ]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(nu == 0, 0.0, grad / np.sqrt(nu + self.epsilon))
        u = u.astype(self.var.dtype)
        if self.momentum > 0:
            m = self.m.astype(self.var.dtype)
            self.velocity = self.momentum * m + (1 - self.momentum) * u
            self._before = self.var
            self.continue_from(self._rounded(self.velocity))
        else:
            self.var = self.var - self.lr * u
        return self.var

    def _rounded(self, m):
        """`m` as the momentum is stored."""
        if self.stored is ml_dtypes.bfloat16:
            m = np.asarray(m).astype(np.float32)  # rounded from float32
        return np.asarray(m).astype(self.stored)

    def stored_momentum_bounds(self, rtol, atol):
        """The least and the greatest stored momentum that a velocity within
        `rtol`, `atol` of the last step's rounds to: float arithmetic's
        freedom in the last bits (a fused multiply-add, say) moves a
        velocity by an ulp, and stored in bfloat16 one that close to a
        rounding midpoint rounds to either neighbour. Away from midpoints
        both bounds are the step's own stored value."""
        v = self.velocity.astype(np.float64)
        tolerance = atol + rtol * np.abs(v)
        return self._rounded(v - tolerance), self._rounded(v + tolerance)

    def continue_from(self, stored_momentum):
        """Takes `stored_momentum` as the last step's stored momentum and
        steps the variable by it (from where the last step began)."""
        self.m = np.asarray(stored_momentum).astype(self.stored)
        self.var = self._before - self.lr * self.m.astype(self.var.dtype)


def dense_from_slices(indices, values, num_rows):
    """The dense gradient of `IndexedSlices(values, indices)`: repeats summed."""
    values = np.asarray(values)
    dense = np.zeros((num_rows,) + values.shape[1:], values.dtype)
    np.add.at(dense, np.asarray(indices, np.int64), values)
    return dense
