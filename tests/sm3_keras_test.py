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


def test_loads_the_per_axis_layout_that_sm3_tf_0_1_saved():
    # sm3_tf 0.1 kept one accumulator variable per axis; Keras files it
    # saved load into this layout (one per matrix, one for all vectors).
    variables = [
        keras.Variable(np.zeros((4, 3, 2), np.float32), name="conv"),
        keras.Variable(np.zeros((3,), np.float32), name="bias"),
        keras.Variable(np.zeros((0, 3), np.float32), name="empty"),
        keras.Variable(np.zeros((5, 2), np.float32), name="dense"),
    ]
    opt = SM3(momentum=0.9)
    opt.build(variables)
    rng = np.random.default_rng(0)

    def draw(*shape):
        return rng.random(shape).astype(np.float32)

    conv_axes, dense_axes = [draw(4), draw(3), draw(2)], [draw(5), draw(2)]
    conv_m, bias_acc, bias_m, dense_m = (
        draw(4, 3, 2), draw(3), draw(3), draw(5, 2))
    legacy = [np.int64(7), np.float32(0.25), *conv_axes, conv_m, bias_acc,
              bias_m, *dense_axes, dense_m]
    opt.load_own_variables({str(i): v for i, v in enumerate(legacy)})
    assert int(opt.iterations.numpy()) == 7
    for var, axes in [(variables[0], conv_axes), (variables[1], [bias_acc]),
                      (variables[3], dense_axes)]:
        for got, want in zip(opt.accumulators_for(var), axes, strict=True):
            np.testing.assert_array_equal(got.numpy(), want)
    for var, want in [(variables[0], conv_m), (variables[1], bias_m),
                      (variables[3], dense_m)]:
        np.testing.assert_array_equal(opt.momentum_for(var).numpy(), want)
    # This layout round-trips as Keras saves it; a store that is neither
    # loads nothing (Keras's warning).
    store = {}
    opt.save_own_variables(store)
    again = SM3(momentum=0.9)
    again.build(variables)
    again.load_own_variables(store)
    for a, b in zip(again.variables, opt.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fresh = SM3(momentum=0.9)
    fresh.build(variables)
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        fresh.load_own_variables({str(i): v for i, v in
                                  enumerate(legacy[:-1])})
    assert int(fresh.iterations.numpy()) == 0


def test_loads_the_layout_that_sm3_tf_0_2_saved_where_counts_agree():
    # sm3_tf 0.2 kept each bias's accumulator beside its momentum; 0.3 keeps
    # all of them in one `vector_accumulator` at the end. For a Dense layer
    # both layouts hold 6 arrays of the same shapes in different roles:
    # files saved without a layout number are read as 0.2's.
    kernel = keras.Variable(np.zeros((5, 2), np.float32), name="kernel")
    bias = keras.Variable(np.zeros((2,), np.float32), name="bias")
    opt = SM3(momentum=0.9)
    opt.build([kernel, bias])
    rng = np.random.default_rng(1)
    kernel_acc, kernel_m = rng.random(7), rng.random((5, 2))
    bias_acc, bias_m = rng.random(2), rng.random(2)
    saved = [np.int64(3), np.float32(0.25), kernel_acc, kernel_m, bias_acc,
             bias_m]
    assert len(saved) == len(opt.variables)
    opt.load_own_variables({str(i): v for i, v in enumerate(saved)})
    np.testing.assert_allclose(opt.accumulators_for(bias)[0], bias_acc)
    np.testing.assert_allclose(opt.momentum_for(bias).numpy(), bias_m)
    np.testing.assert_allclose(
        np.concatenate([a.numpy() for a in opt.accumulators_for(kernel)]),
        kernel_acc, rtol=1e-7)
    # What 0.3 saves carries its layout's number; one it does not know is
    # refused by name, loading nothing.
    store = {}
    opt.save_own_variables(store)
    assert int(store["sm3_tf_layout"]) == 3
    newer = dict(store, sm3_tf_layout=np.array(4))
    fresh = SM3(momentum=0.9)
    fresh.build([kernel, bias])
    with pytest.raises(ValueError, match="layout 4"):
        fresh.load_own_variables(newer)
    assert int(fresh.iterations.numpy()) == 0
    fresh.load_own_variables(store)
    for a, b in zip(fresh.variables, opt.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


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


# momentum 0: the embedding's sparse step, which takes TensorFlow's ops
# under several replicas (the CPU kernel's call wants local variables).
# (XLA over two logical CPUs fails in TensorFlow itself: a variable on
# another device.)
@pytest.mark.parametrize("momentum, jit_compile", [
    (0.9, "auto"), (0.0, False)])
def test_mirrored_strategy_two_replicas_matches_one_device(momentum,
                                                           jit_compile):
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs two logical CPUs, configured in conftest.py before "
                    "TensorFlow starts; another import initialized it first")
    model = _compile(_model(), SM3(learning_rate=0.05, momentum=momentum),
                     jit_compile=jit_compile)
    _fit(model)
    strategy = tf.distribute.MirroredStrategy([c.name for c in cpus[:2]])
    with strategy.scope():
        mirrored = _compile(_model(), SM3(learning_rate=0.05,
                                          momentum=momentum),
                            jit_compile=jit_compile)
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
    # The embedding's accumulator sits with the embedding.
    emb = mirrored.layers[0].embeddings
    acc = mirrored.optimizer.accumulator_for(emb)
    assert acc.value.device == emb.value.device


def test_plain_tf_variables_are_accepted_like_keras_variables():
    tf_var = tf.Variable(V0, name="plain")
    keras_var = keras.Variable(V0)
    a, b = SM3(learning_rate=LR), SM3(learning_rate=LR)
    for i in range(2):
        a.apply_gradients([(tf.constant(G * (i + 1)), tf_var)])
        b.apply_gradients([(tf.constant(G * (i + 1)), keras_var)])
    np.testing.assert_array_equal(tf_var.numpy(), keras_var.numpy())
    assert [v.name for v in a.variables[2:]] == [
        "plain_0_accumulator", "plain_0_momentum"]


def test_rule_is_traced_into_an_enclosing_xla_program():
    # A nested compiled function inside a compiled step passes the variables
    # by copy; sm3_tf traces the rule inline there instead.
    from sm3_tf import tf_compile

    seen = {}

    @tf.function(jit_compile=True)
    def compiled():
        seen["compiled"] = tf_compile.in_xla_program()
        return tf.constant(0)

    @tf.function
    def plain():
        seen["plain"] = tf_compile.in_xla_program()
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


def test_compiled_updates_run_one_after_another_in_a_traced_step():
    # Concurrent per-variable launches would each hold a variable-sized
    # temporary at once; each launch waits for the previous one.
    opt = SM3(learning_rate=LR)
    large = (512, 512)  # 1 MiB: sm3_tf.tf_compile.ORDERED_MIN_SIZE entries
    variables = [keras.Variable(np.ones(large, np.float32) * i)
                 for i in range(3)]
    opt.build(variables)

    @tf.function
    def step():
        opt.apply_gradients([(tf.ones(large), v) for v in variables])

    graph = step.get_concrete_function().graph
    launches = _compiled_update_launches(graph)
    assert len(launches) == 3

    for earlier, later in zip(launches, launches[1:]):
        assert earlier in _ancestors(later)
    assert launches[1] not in _ancestors(launches[0])


def _grappler_ancestors(graph, fetches):
    """For each op in `fetches`, the names of the ops it waits for once
    Grappler, TensorFlow's graph optimizer, has rewritten `graph` (as it does
    before running a `tf.function`; it removes, for one, the IdentityN that
    Keras passes the gradients through)."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    meta_graph = tf.compat.v1.train.export_meta_graph(
        graph_def=graph.as_graph_def(add_shapes=True), graph=graph)
    meta_graph.collection_def["train_op"].node_list.value.extend(
        op.name for op in fetches)
    nodes = {node.name: node for node in tf_optimizer.OptimizeGraph(
        config_pb2.ConfigProto(), meta_graph).node}

    def parents(name):  # "^op" is a control input, "op:1" an output
        return [edge.lstrip("^").split(":")[0] for edge in nodes[name].input]

    return [_reachable(op.name, parents) for op in fetches]


@pytest.mark.skipif(
    bool(tf.config.list_logical_devices("GPU")),
    reason="the updates wait for the gradients only where TensorFlow sees "
    "no GPU (tf_compile.wait_for_all_gradients)")
def test_compiled_updates_wait_for_every_gradient_in_a_traced_step():
    # Started in the middle of backpropagation, the compiled updates slowed
    # a training step down (docs/performance.md): each update waits for all
    # of the step's gradients, not only its own, in the graph as run.
    opt = SM3(learning_rate=LR)
    variables = [keras.Variable(np.full((4, 3), i, np.float32))
                 for i in (1.0, 2.0)]
    opt.build(variables)

    @tf.function
    def step(x):
        opt.apply([tf.sin(x), tf.cos(x)], variables)

    graph = step.get_concrete_function(tf.TensorSpec((4, 3))).graph
    launches = _compiled_update_launches(graph)
    gradients = {op.name for op in graph.get_operations()
                 if op.type in ("Sin", "Cos")}
    assert len(launches) == 2 and len(gradients) == 2
    for ancestors in _grappler_ancestors(graph, launches):
        assert gradients <= ancestors

    # The gate only orders the launches: the same values as eagerly.
    x = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
    eager_opt = SM3(learning_rate=LR)
    eager_variables = [keras.Variable(np.full((4, 3), i, np.float32))
                       for i in (1.0, 2.0)]
    step(tf.constant(x))
    eager_opt.apply([tf.sin(x), tf.cos(x)], eager_variables)
    for traced, eager in zip(variables, eager_variables):
        np.testing.assert_array_equal(traced.numpy(), eager.numpy())


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


def test_reductions_fold_on_cpu_and_not_on_accelerators():
    from sm3_tf import optimizer as sm3_optimizer

    on_cpu = keras.Variable(np.ones((4, 4), np.float32))
    assert (sm3_optimizer._reduction_blocks(on_cpu)
            == sm3_optimizer.CPU_REDUCTION_BLOCKS > 1)

    class Placed:
        def __init__(self, device):
            self.device = device

    assert sm3_optimizer._reduction_blocks(
        Placed("/job:localhost/replica:0/task:0/device:GPU:0")) == 1
    assert sm3_optimizer._reduction_blocks(
        Placed("/job:worker/replica:0/task:0/device:TPU:3")) == 1
