"""SM3 inside Keras: fit, XLA, saving, mixed precision, base arguments, tf.distribute."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from sm3_tf import SM3

from numpy_reference import SM3Reference

# ----------------------------------------------------------------- models


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 20, size=(n, 6)).astype("int32")
    y = (tokens.sum(axis=1) % 3).astype("int32")
    return tokens, y


def _model(seed=0):
    """An Embedding (sparse gradient), a convolution and a Dense layer."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(20, 8),
        keras.layers.Conv1D(8, 3, activation="relu"),
        keras.layers.GlobalMaxPooling1D(),
        keras.layers.Dense(3),
    ])


def _compile(model, optimizer, **kwargs):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def _fit(model, epochs=2, batch_size=16, seed=0):
    x, y = _data(seed=seed)
    return model.fit(x, y, batch_size=batch_size, epochs=epochs,
                     shuffle=False, verbose=0)


def _weights(model):
    return [w.numpy() for w in model.weights]


def _assert_weights_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------- fit


def test_fit_with_and_without_xla_gives_the_same_weights():
    results = []
    for jit in (False, True):
        model = _compile(_model(), SM3(learning_rate=0.05), jit_compile=jit)
        history = _fit(model)
        results.append(_weights(model))
        assert history.history["loss"][-1] < history.history["loss"][0]
    _assert_weights_close(*results)
    before = _weights(_model())
    assert any(np.abs(x - y).max() > 1e-3 for x, y in zip(before, results[0]))


# ----------------------------------------------------------------- saving


def test_keras_file_save_load_continues_exactly(tmp_path):
    model = _compile(_model(), SM3(learning_rate=0.05))
    _fit(model, epochs=1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, SM3)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    _assert_weights_close(
        [v.numpy() for v in loaded.optimizer.variables],
        [v.numpy() for v in model.optimizer.variables], atol=0)
    _fit(model, epochs=1, seed=1)
    _fit(loaded, epochs=1, seed=1)
    _assert_weights_close(_weights(loaded), _weights(model), atol=0)


def test_tf_train_checkpoint_round_trip_continues_exactly(tmp_path):
    model = _compile(_model(), SM3(learning_rate=0.05))
    _fit(model, epochs=1)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = ckpt.save(str(tmp_path / "ckpt"))

    fresh = _compile(_model(seed=7), SM3(learning_rate=0.05))
    fresh.optimizer.build(fresh.trainable_variables)
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer
                                 ).restore(path)
    status.assert_existing_objects_matched()
    _assert_weights_close(
        [v.numpy() for v in fresh.optimizer.variables],
        [v.numpy() for v in model.optimizer.variables], atol=0)
    _fit(model, epochs=1, seed=1)
    _fit(fresh, epochs=1, seed=1)
    _assert_weights_close(_weights(fresh), _weights(model), atol=0)


def test_checkpoint_of_another_layout_is_refused_not_misread(tmp_path):
    # Each slot is its own variable, restored by position: a checkpoint of
    # SM3 with momentum does not load into SM3 without it.
    model = _compile(_model(), SM3(learning_rate=0.05))
    _fit(model, epochs=1)
    path = tf.train.Checkpoint(optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    other = _compile(_model(), SM3(learning_rate=0.05, momentum=0.0))
    other.optimizer.build(other.trainable_variables)
    with pytest.raises((ValueError, AssertionError)):
        tf.train.Checkpoint(optimizer=other.optimizer).restore(
            path).assert_consumed()


# ----------------------------------------------------------------- mixed precision


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_loss_scale_optimizer_trains_under_mixed_float16(mixed_float16):
    opt = keras.optimizers.LossScaleOptimizer(SM3(learning_rate=0.05))
    model = _compile(_model(), opt)
    history = _fit(model, epochs=3)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_loss_scale_optimizer_skips_non_finite_step(mixed_float16):
    inner = SM3(learning_rate=0.05, momentum=0.9)
    opt = keras.optimizers.LossScaleOptimizer(inner)
    var = keras.Variable(np.ones((3, 2), np.float32))
    opt.apply_gradients([(tf.ones((3, 2)), var)])
    state = [v.numpy().copy() for v in inner.variables[2:]]
    weights = var.numpy().copy()
    bad = tf.constant([[np.inf, 1.0], [1.0, 1.0], [np.nan, 1.0]])
    opt.apply_gradients([(bad, var)])
    np.testing.assert_array_equal(var.numpy(), weights)
    for before, v in zip(state, inner.variables[2:]):
        np.testing.assert_array_equal(v.numpy(), before)
    opt.apply_gradients([(tf.ones((3, 2)), var)])
    assert np.all(var.numpy() < weights)


# ----------------------------------------------------------------- base arguments

G = np.float32([[0.3, -0.2, 0.1], [2.0, 0.5, -1.5]])
V0 = np.float32([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4]])
LR = 0.25


def _run_sm3(steps=3, grads=None, **kwargs):
    opt = SM3(learning_rate=kwargs.pop("learning_rate", LR), momentum=0.9,
              **kwargs)
    var = keras.Variable(V0)
    for i in range(steps):
        g = G * (i + 1) if grads is None else grads[i]
        opt.apply_gradients([(tf.constant(g), var)])
    return opt, var.numpy()


def _reference(steps=3, transform=lambda g, var, i: g, lr=lambda i: LR,
               decay=None):
    ref = SM3Reference(V0, LR, 0.9, 1.0, 1e-30)
    for i in range(steps):
        if decay is not None:
            ref.var = ref.var - ref.var * decay * lr(i)
        ref.lr = lr(i)
        ref.step(transform(G * (i + 1), ref.var, i))
    return ref.var


def test_without_base_arguments_matches_reference():
    np.testing.assert_allclose(_run_sm3()[1], _reference(), rtol=1e-6)


def test_weight_decay_is_decoupled_before_the_step():
    _, got = _run_sm3(weight_decay=0.1)
    np.testing.assert_allclose(got, _reference(decay=0.1), rtol=1e-6)
    assert np.abs(got - _reference()).max() > 1e-3


def test_clipnorm_clips_each_gradient_norm():
    def clip(g, var, i):
        return g * min(1.0, 0.5 / np.linalg.norm(g))
    _, got = _run_sm3(clipnorm=0.5)
    np.testing.assert_allclose(got, _reference(transform=clip), rtol=1e-5)
    assert np.abs(got - _reference()).max() > 1e-3


def test_global_clipnorm_clips_the_global_norm():
    _, got = _run_sm3(global_clipnorm=0.5)
    np.testing.assert_allclose(
        got, _reference(transform=lambda g, v, i:
                        g * min(1.0, 0.5 / np.linalg.norm(g))), rtol=1e-5)


def test_clipvalue_clips_each_entry():
    _, got = _run_sm3(clipvalue=0.4)
    np.testing.assert_allclose(
        got, _reference(transform=lambda g, v, i: np.clip(g, -0.4, 0.4)),
        rtol=1e-6)
    assert np.abs(got - _reference()).max() > 1e-3


def test_loss_scale_factor_divides_gradients():
    grads = [G * (i + 1) * 8.0 for i in range(3)]
    _, got = _run_sm3(grads=grads, loss_scale_factor=8.0)
    np.testing.assert_allclose(got, _reference(), rtol=1e-6)


def test_learning_rate_schedule_is_followed():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [0, 1], [0.25, 0.125, 0.0625])  # lr(step): step <= 0, <= 1, > 1
    _, got = _run_sm3(learning_rate=schedule)
    np.testing.assert_allclose(
        got, _reference(lr=lambda i: [0.25, 0.125, 0.0625][i]), rtol=1e-6)
    assert np.abs(got - _reference()).max() > 1e-3


def test_callable_learning_rate():
    _, got = _run_sm3(learning_rate=lambda: 0.25)
    np.testing.assert_allclose(got, _reference(), rtol=1e-6)


def test_gradient_accumulation_applies_the_mean_every_k_steps():
    grads = [G, 3 * G, G, 3 * G]
    opt, got = _run_sm3(steps=4, grads=grads, gradient_accumulation_steps=2)
    ref = SM3Reference(V0, LR, 0.9, 1.0, 1e-30)
    ref.step(2 * G)
    ref.step(2 * G)
    np.testing.assert_allclose(got, ref.var, rtol=1e-6)


def test_use_ema_keeps_a_polyak_average_and_finalizes_to_it():
    opt = SM3(learning_rate=LR, momentum=0.9, use_ema=True, ema_momentum=0.5)
    var = keras.Variable(V0)
    ref = SM3Reference(V0, LR, 0.9, 1.0, 1e-30)
    average = None
    for i in range(3):
        opt.apply_gradients([(tf.constant(G * (i + 1)), var)])
        ref.step(G * (i + 1))
        average = ref.var if average is None else 0.5 * average + 0.5 * ref.var
    np.testing.assert_allclose(var.numpy(), ref.var, rtol=1e-6)
    opt.finalize_variable_values([var])
    np.testing.assert_allclose(var.numpy(), average, rtol=1e-6)


# ----------------------------------------------------------------- distribute


@pytest.mark.parametrize("momentum, cpu_kernel", [
    (0.9, False), (0.0, False), (0.9, "auto"), (0.0, "auto")])
def test_mirrored_strategy_two_replicas_matches_one_device(momentum,
                                                           cpu_kernel):
    # `fit` without whole-step XLA (TensorFlow's XLA fails on several CPU
    # replicas for any optimizer): each replica's dense updates run as
    # compiled per-variable functions on its own variables, as with one
    # replica, and give the same weights. momentum 0 takes the embedding's
    # sparse step.
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs two logical CPUs, configured in conftest.py before "
                    "TensorFlow starts; another import initialized it first")
    make = lambda: SM3(learning_rate=0.05, momentum=momentum,  # noqa: E731
                       cpu_kernel=cpu_kernel)
    model = _compile(_model(), make(), jit_compile=False)
    _fit(model)
    strategy = tf.distribute.MirroredStrategy(
        [c.name for c in cpus[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        mirrored = _compile(_model(), make(), jit_compile=False)
    _fit(mirrored)
    _assert_weights_close(_weights(mirrored), _weights(model))
    slots = mirrored.optimizer.variables[2:]
    assert slots
    for v in slots:
        assert isinstance(v.value, tf.distribute.DistributedValues)
        assert "Mirrored" in type(v.value).__name__, type(v.value)
        copies = strategy.experimental_local_results(v.value)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())
    # Each slot sits with its variable, on every replica.
    emb = mirrored.layers[0].embeddings
    for slot in mirrored.optimizer.accumulators_for(emb):
        assert [c.device for c in strategy.experimental_local_results(
            slot.value)] == [c.device for c in
                             strategy.experimental_local_results(emb.value)]


def test_mirrored_strategy_compiles_each_replicas_update():
    # The step's graph calls one compiled update per replica and variable,
    # each on that replica's variables (not the plain TensorFlow ops of the
    # rule: about twice Adam's step there).
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs two logical CPUs, configured in conftest.py")
    strategy = tf.distribute.MirroredStrategy(
        [c.name for c in cpus[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        variables = [keras.Variable(np.ones((8, 4), np.float32)),
                     keras.Variable(np.ones((4,), np.float32))]
        opt = SM3(learning_rate=LR, cpu_kernel=False)
        opt.build(variables)

    @tf.function
    def step():
        def replica_step():
            opt.apply_gradients([(tf.ones((8, 4)), variables[0]),
                                 (tf.ones((4,)), variables[1])])
        strategy.run(replica_step)

    graph = step.get_concrete_function().graph
    launches = _compiled_update_launches(graph)
    assert len(launches) == 2 * 2
    assert len({op.device for op in launches}) == 2
    step()
    ref = SM3Reference(np.ones((8, 4), np.float32), LR, 0.9, 1.0, 1e-30)
    ref.step(np.full((8, 4), 2.0, np.float32))  # the two replicas' sum
    for copy in strategy.experimental_local_results(variables[0].value):
        np.testing.assert_allclose(copy.numpy(), ref.var, rtol=1e-6)


def test_plain_tf_variables_are_accepted_like_keras_variables():
    tf_var = tf.Variable(V0, name="plain")
    keras_var = keras.Variable(V0)
    a, b = SM3(learning_rate=LR), SM3(learning_rate=LR)
    for i in range(2):
        a.apply_gradients([(tf.constant(G * (i + 1)), tf_var)])
        b.apply_gradients([(tf.constant(G * (i + 1)), keras_var)])
    np.testing.assert_array_equal(tf_var.numpy(), keras_var.numpy())
    assert [v.name for v in a.variables[2:]] == [
        "plain_0_accumulator_0", "plain_0_accumulator_1", "plain_0_momentum"]


def test_rule_is_traced_into_an_enclosing_xla_program():
    # A nested compiled function inside a compiled step passes the variables
    # by copy; sm3_tf traces the rule inline there instead.
    from sm3_tf.kernels import tensorflow as tf_kernels

    seen = {}

    @tf.function(jit_compile=True)
    def compiled():
        seen["compiled"] = tf_kernels.in_xla_program()
        return tf.constant(0)

    @tf.function
    def plain():
        seen["plain"] = tf_kernels.in_xla_program()
        return tf.constant(0)

    compiled()
    plain()
    assert seen == {"compiled": True, "plain": False}


def _reachable(start, parents):
    """Everything `start` waits for, following `parents(node)` back."""
    seen, todo = set(), [start]
    while todo:
        for parent in parents(todo.pop()):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _ancestors(op):
    """Every op that `op` waits for, through data or control edges."""
    return _reachable(op, lambda current: [t.op for t in current.inputs]
                      + list(current.control_inputs))


def _compiled_update_launches(graph):
    return [op for op in graph.get_operations()
            if op.type in ("StatefulPartitionedCall", "PartitionedCall")
            and "update" in op.get_attr("f").name]


def test_compiled_updates_run_one_after_another_last_variable_first():
    # Concurrent per-variable updates would each hold a variable-sized
    # temporary at once: each compiled update takes the previous one's
    # result as an input (a data edge, not a control dependency), last
    # variable first (backpropagation's order).
    opt = SM3(learning_rate=LR, cpu_kernel=False)
    variables = [keras.Variable(np.ones((64, 32), np.float32) * i)
                 for i in range(3)]
    opt.build(variables)

    @tf.function
    def step():
        opt.apply_gradients([(tf.ones((64, 32)), v) for v in variables])

    graph = step.get_concrete_function().graph
    launches = _compiled_update_launches(graph)
    assert len(launches) == 3

    def data_ancestors(op):
        return _reachable(op, lambda current: [t.op for t in current.inputs])

    for earlier, later in zip(launches, launches[1:]):
        assert earlier in data_ancestors(later)
    assert launches[1] not in data_ancestors(launches[0])
    handles = {id(external): internal for external, internal in
               graph.captures}
    last = handles[id(variables[-1].value.handle)]
    first = handles[id(variables[0].value.handle)]
    assert any(t is last for t in launches[0].inputs)
    assert any(t is first for t in launches[-1].inputs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compiled_step_builds_no_variable_sized_constants(momentum):
    # A fill or constant shaped like a variable (`ones_like`, `zeros_like`)
    # in a step compiled by XLA left memory of its size resident after
    # compiling: about 15 bytes per parameter for ResNet-50 (docs/memory.md).
    opt = SM3(learning_rate=LR, momentum=momentum)
    matrix = keras.Variable(np.ones((64, 32), np.float32))
    vector = keras.Variable(np.ones((32,), np.float32))
    opt.build([matrix, vector])

    @tf.function(jit_compile=True)
    def step(matrix_grad, vector_grad):
        opt.apply_gradients([(matrix_grad, matrix), (vector_grad, vector)])

    graph = step.get_concrete_function(
        tf.TensorSpec((64, 32)), tf.TensorSpec((32,))).graph
    built = [
        (op.type, op.outputs[0].shape) for op in graph.get_operations()
        if op.type in ("Fill", "OnesLike", "ZerosLike")
        or (op.type == "Const" and op.outputs[0].shape.num_elements() > 4)
    ]
    assert built == []
