"""Optimizer memory: the state optimizers keep, what a compiled step holds.

    python scripts/memory_report.py [--model=transformer_big]   # counted state
    python scripts/memory_report.py --apply_step [--model=resnet50,...]
    python scripts/memory_report.py --whole_step
    python scripts/memory_report.py --largest_model --budget_gib=8 \\
        [--plot=FILE]
    (any compiled section: [--cache=FILE] [--backends=tensorflow,jax]
    [--optimizers=...] [--json]; docs/memory.md has the commands it ran)

Counting (the default section): from the model's variable shapes
(`sm3_tf.memory.state_report`), the state bytes each optimizer keeps, in
total, per kind of variable and as a share of the parameters. Nothing is
allocated.

The other sections report what a compiled step holds at once: XLA's buffer
assignment, which is exact and the same on every run (parameters,
gradients, optimizer state, inputs and every temporary, less the outputs
written over donated inputs). Keras-JAX: `jax.jit(...).lower(...).compile()
.memory_analysis()` on `jax.ShapeDtypeStruct`s (compile only: nothing is
allocated). TensorFlow: a `tf.function(jit_compile=True)` step, read from
XLA's dump (`sm3_tf.memory.tf_step_bytes`), each optimizer in a fresh
process of this script (XLA reads its dump flag once); TensorFlow's
variables must exist, so a child allocates the model's variables and the
optimizer's state (BERT-large with Adam: about 4 GB).

--apply_step    `optimizer.apply_gradients` over a model's variables (the
                gradients are inputs): parameters + gradients + state +
                the update's temporaries.
--whole_step    the whole training step (forward, backward, update) of an
                MLP of --mlp_layers Dense layers of --mlp_width at batch
                --batch_size, parameters and optimizer state donated (JAX)
                or updated in place (TensorFlow's resource variables);
                --xla_cpu_scheduler=memory_optimized: under XLA:CPU's
                memory-optimized scheduler instead of its default.
--largest_model the largest Transformer (models/transformer/model.py, 6+6
                layers, d_ff = 4 d_model, 64 per head, vocabulary 32000,
                no dropout) whose whole training step at --batch_size x
                --sequence_length fits --budget_gib, per optimizer,
                searched over d_model in steps of --d_step (Keras-JAX,
                compile only; Adafactor from optax, factored, no momentum).

Figures are multiples of the parameters' bytes and MiB; --json prints
everything as JSON instead of tables.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import model_shapes  # noqa: E402

MiB = 2**20
GiB = 2**30

# The compiled-step sections' optimizers: name -> (label, backends).
STEP_OPTIMIZERS = {
    "sgd": ("SGD", ("tensorflow", "jax")),
    "sgd_momentum": ("SGD + momentum 0.9", ("tensorflow", "jax")),
    "adam": ("Adam", ("tensorflow", "jax")),
    "adagrad": ("Adagrad", ("tensorflow", "jax")),
    "adafactor_keras": ("Adafactor (Keras, with velocity)",
                        ("tensorflow", "jax")),
    "adafactor_optax": ("Adafactor (optax, factored, no momentum)",
                        ("jax",)),
    "sm3_kernel": ("SM3 m=0, CPU kernel", ("tensorflow", "jax")),
    "sm3_kernel_momentum": ("SM3 m=0.9, CPU kernel", ("tensorflow", "jax")),
    "sm3_kernel_bf16": ("SM3 m=0.9 bf16 momentum, CPU kernel",
                        ("tensorflow", "jax")),
    "sm3_portable": ("SM3 m=0, portable", ("tensorflow", "jax")),
    "sm3_portable_momentum": ("SM3 m=0.9, portable", ("tensorflow", "jax")),
    "sm3_portable_bf16": ("SM3 m=0.9 bf16 momentum, portable",
                          ("tensorflow", "jax")),
}
APPLY_STEP_MODELS = ("resnet50", "transformer_big", "bert_large")
BACKENDS = ("tensorflow", "jax")

# Targets of issue 18 for SM3's compiled steps: (sm3, reference, bound).
# "factor": SM3's total <= factor x the reference's; "largest": SM3's total
# <= the reference's + the largest variable's bytes + SM3's accumulators
# (its own state, which the reference does not keep).
TARGETS = (
    ("sm3_kernel", "sgd", ("factor", 1.05)),
    ("sm3_kernel_momentum", "sgd_momentum", ("factor", 1.05)),
    ("sm3_portable", "sgd", ("largest", None)),
    ("sm3_portable_momentum", "sgd_momentum", ("largest", None)),
)


def make_optimizer(name):
    """A fresh Keras optimizer for a compiled-step section (not optax's)."""
    import keras

    import sm3_tf

    lr = 1e-3
    return {
        "sgd": lambda: keras.optimizers.SGD(lr),
        "sgd_momentum": lambda: keras.optimizers.SGD(lr, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(lr),
        "adagrad": lambda: keras.optimizers.Adagrad(lr),
        "adafactor_keras": lambda: keras.optimizers.Adafactor(lr),
        "sm3_kernel": lambda: sm3_tf.SM3(lr, momentum=0.0, cpu_kernel=True),
        "sm3_kernel_momentum": lambda: sm3_tf.SM3(lr, momentum=0.9,
                                                  cpu_kernel=True),
        "sm3_kernel_bf16": lambda: sm3_tf.SM3(
            lr, momentum=0.9, momentum_dtype="bfloat16", cpu_kernel=True),
        "sm3_portable": lambda: sm3_tf.SM3(lr, momentum=0.0,
                                           cpu_kernel=False),
        "sm3_portable_momentum": lambda: sm3_tf.SM3(lr, momentum=0.9,
                                                    cpu_kernel=False),
        "sm3_portable_bf16": lambda: sm3_tf.SM3(
            lr, momentum=0.9, momentum_dtype="bfloat16", cpu_kernel=False),
    }[name]()


# ------------------------------------------------------------------ counting


def count(model, optimizers):
    from sm3_tf import memory

    named = model_shapes.MODELS[model]()
    variables = [(name, shape, "float32") for name, shape in named]
    return memory.state_report(variables, optimizers)


def print_counts(model, report):
    params = report["parameters"]
    print(f"{model}: {params['count'] / 1e6:.1f} M parameters, "
          f"{params['bytes'] / MiB:.1f} MiB (float32)")
    kinds = sorted(params["by_kind"])
    header = (f"{'optimizer':36s} {'state MiB':>10s} {'x params':>9s}  "
              + "  ".join(f"{k:>14s}" for k in kinds))
    print(header)
    print(f"{'(parameters)':36s} {params['bytes'] / MiB:10.1f} {1.0:9.3f}  "
          + "  ".join(f"{params['by_kind'][k] / MiB:14.2f}" for k in kinds))
    for name, row in report["optimizers"].items():
        print(f"{row['label']:36s} {row['state_bytes'] / MiB:10.2f} "
              f"{row['ratio_to_parameters']:9.4f}  "
              + "  ".join(f"{row['state_by_kind'].get(k, 0) / MiB:14.3f}"
                          for k in kinds))


# ----------------------------------------------- children: one compiled step
#
# Every compiled step is measured in a child process of this script with
# KERAS_BACKEND set for it: TensorFlow's, one optimizer each (XLA's dump
# flag must be set before the process's first compilation); JAX's, all the
# optimizers of one model in one process (nothing is allocated).


def _variable_name(path):
    return path.replace("/", "_").replace(":", "_")


def _deferred_scope():
    """A Keras scope in which new variables keep no value (Keras-JAX:
    shapes only, nothing allocated) and stay so when it closes."""
    from keras.src.backend.common.stateless_scope import StatelessScope

    return StatelessScope(initialize_variables=False)


def _build_shapes_only(optimizer, variables):
    """`optimizer.build(variables)`, its state kept as shapes where Keras
    allows (Keras's Adafactor makes its vectors' placeholders from values:
    its state is allocated)."""
    import keras

    if isinstance(optimizer, keras.optimizers.Adafactor):
        optimizer.build(variables)
        return
    with _deferred_scope():
        optimizer.build(variables)


def _spec(v):
    import jax

    return jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)


def _mlp(width, layers):
    import keras

    return keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="relu",
                              name=f"dense_{i}") for i in range(layers - 1)]
        + [keras.layers.Dense(width, name=f"dense_{layers - 1}")],
        name="mlp")


def _jax_train_step(model, inputs_fn, loss_fn, optimizer_name):
    """`(jitted step, args as ShapeDtypeStructs)` of the whole training
    step of `model` (built in a deferred scope) with params, non-trainable
    variables and optimizer state donated."""
    import jax

    trainable = [_spec(v) for v in model.trainable_variables]
    non_trainable = [_spec(v) for v in model.non_trainable_variables]

    def loss_and_grads(tv, ntv, x, y):
        def loss(tv):
            pred, ntv_new = model.stateless_call(tv, ntv, inputs_fn(x, y),
                                                 training=True)
            return loss_fn(y, pred), ntv_new
        return jax.value_and_grad(loss, has_aux=True)(tv)

    if optimizer_name == "adafactor_optax":
        import optax

        tx = optax.adafactor(learning_rate=1e-3)
        state = jax.eval_shape(tx.init, trainable)

        def step(tv, ntv, state, x, y):
            (loss, ntv), grads = loss_and_grads(tv, ntv, x, y)
            updates, state = tx.update(grads, state, tv)
            return loss, optax.apply_updates(tv, updates), ntv, state
    else:
        optimizer = make_optimizer(optimizer_name)
        _build_shapes_only(optimizer, model.trainable_variables)
        state = [_spec(v) for v in optimizer.variables]

        def step(tv, ntv, state, x, y):
            (loss, ntv), grads = loss_and_grads(tv, ntv, x, y)
            tv, state = optimizer.stateless_apply(state, grads, tv)
            return loss, tv, ntv, state

    return (jax.jit(step, donate_argnums=(0, 1, 2)),
            (trainable, non_trainable, state))


def _jax_bytes(jitted, *args):
    from sm3_tf import memory

    with _deferred_scope():  # the variables stay shapes while tracing
        return memory.jax_step_bytes(jitted, *args)


def _described(variables):
    """Parameters' bytes (float32), the largest variable's, and SM3's
    accumulators' (one per row, column, ...; full for vectors)."""
    shapes = [tuple(v.shape) for v in variables]
    sizes = [math.prod(s) * 4 for s in shapes]
    return {"parameters": sum(sizes), "largest": max(sizes),
            "count": sum(math.prod(s) for s in shapes),
            "accumulators": sum(
                (sum(s) if len(s) >= 2 else math.prod(s)) * 4
                for s in shapes)}


def jax_apply_step(model, optimizers):
    import jax
    import keras

    named = model_shapes.MODELS[model]()
    with _deferred_scope():
        variables = [keras.Variable(initializer="zeros", shape=shape,
                                    dtype="float32",
                                    name=_variable_name(name))
                     for name, shape in named]
    result = {"model": _described(variables), "steps": {}}
    specs = [_spec(v) for v in variables]
    for name in optimizers:
        if name == "adafactor_optax":
            import optax

            tx = optax.adafactor(learning_rate=1e-3)
            state = jax.eval_shape(tx.init, specs)

            def apply(tv, state, grads, tx=tx):
                updates, state = tx.update(grads, state, tv)
                return optax.apply_updates(tv, updates), state
        else:
            optimizer = make_optimizer(name)
            _build_shapes_only(optimizer, variables)
            state = [_spec(v) for v in optimizer.variables]

            def apply(tv, state, grads, o=optimizer):
                return o.stateless_apply(state, grads, tv)
        step = jax.jit(apply, donate_argnums=(0, 1))
        result["steps"][name] = _jax_bytes(step, specs, state, specs)
    return result


def jax_whole_step(width, layers, batch, optimizers):
    import jax
    import keras

    with _deferred_scope():
        model = _mlp(width, layers)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = jax.ShapeDtypeStruct((batch, width), "float32")
    y = jax.ShapeDtypeStruct((batch,), "int32")
    result = {"model": _described(model.trainable_variables), "steps": {}}
    for name in optimizers:
        step, args = _jax_train_step(model, lambda x, y: x, loss, name)
        result["steps"][name] = _jax_bytes(step, *args, x, y)
    return result


def _portable_transformer_class():
    """models/transformer/model.py's Transformer with its few TensorFlow
    calls written as keras.ops, so that Keras-JAX can trace it."""
    import keras
    from keras import ops

    from models.transformer import model as transformer

    class PortableTransformer(transformer.Transformer):
        def _embed(self, ids, training):
            d = self.params.d_model
            x = self.embedding(ids) * math.sqrt(d)
            positions = transformer.positional_encoding(ids.shape[1], d)
            x = x + ops.cast(ops.convert_to_tensor(positions), x.dtype)[None]
            return self.input_dropout(x, training=training)

        def encode(self, source, training=False):
            mask = ops.not_equal(source, transformer.PAD_ID)[:, None, :]
            x = self._embed(source, training)
            for attention, ffn in zip(self.encoder_self, self.encoder_ffn):
                x = attention(x, attention_mask=mask, training=training)
                x = ffn(x, training=training)
            return self.encoder_norm(x), mask

        def decode(self, decoder_input, encoded, source_mask,
                   training=False):
            x = self._embed(decoder_input, training)
            for self_attention, cross, ffn in zip(
                    self.decoder_self, self.decoder_cross, self.decoder_ffn):
                x = self_attention(x, causal=True, training=training)
                x = cross(x, context=encoded, attention_mask=source_mask,
                          training=training)
                x = ffn(x, training=training)
            x = self.decoder_norm(x)
            weights = ops.cast(self.embedding.embeddings, x.dtype)
            return ops.cast(ops.einsum("btd,vd->btv", x, weights), "float32")

    return PortableTransformer, transformer, keras


def transformer_params(d_model, layers, vocab):
    """Parameters of the ladder's Transformer at `d_model` (exact)."""
    d, ff = d_model, 4 * d_model
    attention = 4 * d * d + 4 * d + 2 * d  # q, k, v, o and biases; its norm
    ffn = 2 * d * ff + ff + d + 2 * d
    return vocab * d + layers * (attention + ffn) + layers * (
        2 * attention + ffn) + 4 * d


def jax_transformer_step(d_model, layers, batch, length, vocab, optimizer):
    import jax

    cls, transformer, keras = _portable_transformer_class()
    params = transformer.TransformerParams(
        d_model=d_model, d_ff=4 * d_model, num_heads=d_model // 64,
        num_layers=layers, dropout=0.0)
    with _deferred_scope():
        model = cls(params, vocab, length)
        ids = keras.KerasTensor((batch, length), "int32")
        model((ids, ids))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # The inputs: source and target ids; the decoder reads the target
    # shifted right, as in training.
    shift = lambda y: keras.ops.pad(y, [[0, 0], [1, 0]])[:, :-1]  # noqa
    step, args = _jax_train_step(model, lambda x, y: (x, shift(y)), loss,
                                 optimizer)
    ids = jax.ShapeDtypeStruct((batch, length), "int32")
    figures = _jax_bytes(step, *args, ids, ids)
    figures.update(_described(model.trainable_variables))
    return figures


def tf_child_step(section, model, optimizer_name, width, layers, batch):
    """In a fresh process: one optimizer's compiled TensorFlow step."""
    import keras
    import tensorflow as tf

    from sm3_tf import memory

    optimizer = make_optimizer(optimizer_name)
    if section == "apply_step":
        variables = [keras.Variable(initializer="zeros", shape=shape,
                                    dtype="float32",
                                    name=_variable_name(name))
                     for name, shape in model_shapes.MODELS[model]()]
        optimizer.build(variables)

        @tf.function(jit_compile=True)
        def step(*grads):
            optimizer.apply_gradients(zip(grads, variables))

        args = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
    else:
        net = _mlp(width, layers)
        variables = net.trainable_variables
        optimizer.build(variables)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function(jit_compile=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                value = loss(y, net(x, training=True))
            grads = tape.gradient(value, variables)
            optimizer.apply_gradients(zip(grads, variables))
            return value

        args = [tf.TensorSpec((batch, width), tf.float32),
                tf.TensorSpec((batch,), tf.int32)]
    figures = memory.tf_step_bytes(step, *args)
    return {"model": _described(variables), "step": figures}


def _child_command(args, **extra):
    command = [sys.executable, os.path.abspath(__file__), "--_child"]
    for key, value in extra.items():
        command.append(f"--{key}={value}")
    for flag in ("mlp_width", "mlp_layers", "batch_size", "sequence_length",
                 "layers", "vocab"):
        command.append(f"--{flag}={getattr(args, flag)}")
    return command


# XLA:CPU's schedulers (--xla_cpu_scheduler): its default runs independent
# work breadth first, for concurrency; this one keeps the fewest bytes alive.
MEMORY_OPTIMIZED_FLAG = ("--xla_cpu_enable_concurrency_optimized_scheduler"
                         "=false")


def _run_child(command, backend, what, scheduler="default"):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if scheduler == "memory_optimized":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " "
                            + MEMORY_OPTIMIZED_FLAG).strip()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {what} on {backend} failed:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(args):
    if args._section == "largest_model":
        print(json.dumps(jax_transformer_step(
            args._d_model, args.layers, args.batch_size,
            args.sequence_length, args.vocab, args._optimizer)))
        return
    optimizers = args._optimizer.split(",")
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        import shutil
        import tempfile

        from sm3_tf import memory

        dump = tempfile.mkdtemp(prefix="sm3_tf_memory_report_")
        memory.start_tf_xla_dump(dump)  # before anything is compiled
        try:
            print(json.dumps(tf_child_step(
                args._section, args.model, optimizers[0], args.mlp_width,
                args.mlp_layers, args.batch_size)))
        finally:
            shutil.rmtree(dump, ignore_errors=True)
    elif args._section == "apply_step":
        print(json.dumps(jax_apply_step(args.model, optimizers)))
    else:
        print(json.dumps(jax_whole_step(args.mlp_width, args.mlp_layers,
                                        args.batch_size, optimizers)))


# --------------------------------------------- the compiled-step sections


def measure_steps(args, cache, section, key, optimizers, backends):
    """Measures what `cache[section][key]` lacks and returns it:
    `{backend: {"model": ..., "steps": {optimizer: figures}}}`. `key` is
    the model (--apply_step) or the MLP's configuration (--whole_step)."""
    out = cache.setdefault(section, {}).setdefault(key, {})
    model = key if section == "apply_step" else "mlp"
    for backend in backends:
        have = out.setdefault(backend, {"steps": {}})
        _drop_stale(have["steps"], f"{section} {key} {backend}")
        names = [o for o in optimizers if backend in STEP_OPTIMIZERS[o][1]
                 and o not in have["steps"]]
        what = f"{section} of {model}"
        if backend == "jax" and names:
            started = time.time()
            child = _run_child(_child_command(
                args, _section=section, model=model,
                _optimizer=",".join(names)), backend, what,
                args.xla_cpu_scheduler)
            have["model"] = child["model"]
            have["steps"].update(_stamped(child["steps"]))
            _save_cache(args.cache, cache)
            _progress(f"{what}: jax, {len(names)} optimizers, "
                      f"{time.time() - started:.0f} s")
            continue
        for name in names:
            started = time.time()
            child = _run_child(_child_command(
                args, _section=section, model=model, _optimizer=name),
                backend, f"{what} with {name}", args.xla_cpu_scheduler)
            have["model"] = child["model"]
            have["steps"].update(_stamped({name: child["step"]}))
            _save_cache(args.cache, cache)
            _progress(f"{what}: tensorflow {name}, "
                      f"{time.time() - started:.0f} s")
    return {b: {"model": out[b]["model"],
                "steps": {o: out[b]["steps"][o] for o in optimizers
                          if o in out[b]["steps"]}}
            for b in backends if out.get(b, {}).get("steps")}


def _progress(line):
    print(f"  [{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr,
          flush=True)


def targets(result):
    """Issue 18's targets on one backend's steps: a list of dicts."""
    steps, largest = result["steps"], result["model"]["largest"]
    rows = []
    for sm3, reference, (kind, factor) in TARGETS:
        if sm3 not in steps or reference not in steps:
            continue
        mine, theirs = steps[sm3]["total"], steps[reference]["total"]
        bound = (theirs * factor if kind == "factor" else
                 theirs + largest + result["model"]["accumulators"])
        rows.append({"sm3": sm3, "reference": reference, "bytes": mine,
                     "reference_bytes": theirs, "bound_bytes": bound,
                     "ratio": mine / theirs, "met": mine <= bound,
                     "rule": (f"<= {factor} x {reference}" if kind == "factor"
                              else f"<= {reference} + largest variable + "
                              "accumulators")})
    return rows


def _model_line(title, model):
    return (f"{title}: {model['count'] / 1e6:.2f} M parameters, "
            f"{model['parameters'] / MiB:.1f} MiB; largest variable "
            f"{model['largest'] / MiB:.1f} MiB "
            f"({model['largest'] / model['parameters']:.4f} x params); SM3's "
            f"accumulators {model['accumulators'] / MiB:.2f} MiB")


def print_targets(columns):
    """Issue 18's targets, one markdown table: a row per target, a column
    per `(label, {backend: result})` in `columns` (one figure where the
    backends agree to the digits shown)."""
    short = {"tensorflow": "TF", "jax": "JAX"}
    print("\n| target | " + " | ".join(label for label, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for sm3, reference, (kind, factor) in TARGETS:
        rule = (f"{sm3} <= {factor} x {reference}" if kind == "factor"
                else f"{sm3} <= {reference} + largest variable + "
                     "accumulators")
        cells = []
        for _, by_backend in columns:
            figures = {}
            for b, result in by_backend.items():
                row = {r["sm3"]: r for r in targets(result)}.get(sm3)
                if row is not None:
                    margin = (row["bound_bytes"] - row["bytes"]) / MiB
                    figures[b] = (f"{row['ratio']:.4f}x: "
                                  + ("met" if row["met"] else "**missed**")
                                  + f" ({margin:+.1f} MiB)")
            if not figures:
                cells.append("-")
            elif len(set(figures.values())) == 1:
                cells.append(next(iter(figures.values())))
            else:
                cells.append(", ".join(f"{short[b]} {f}"
                                       for b, f in figures.items()))
        print(f"| {rule} | " + " | ".join(cells) + " |")


def print_step_table(title, measured):
    """One markdown table: optimizers down, backends across."""
    backends = list(measured)
    model = next(iter(measured.values()))["model"]
    print("\n" + _model_line(title, model) + "\n")
    print("| optimizer | " + " | ".join(
        f"{b} x params | {b} MiB" for b in backends) + " |")
    print("|---|" + "---:|---:|" * len(backends))
    for name in STEP_OPTIMIZERS:
        if not any(name in measured[b]["steps"] for b in backends):
            continue
        cells = []
        for b in backends:
            step = measured[b]["steps"].get(name)
            cells += (["-", "-"] if step is None else [
                f"{step['total'] / model['parameters']:.4f}",
                f"{step['total'] / MiB:.1f}"])
        print(f"| {STEP_OPTIMIZERS[name][0]} | " + " | ".join(cells) + " |")
    print_targets([(b, {b: measured[b]}) for b in backends])


def print_apply_tables(measured_by_model):
    """The apply_gradients steps: one table, a column per model, each cell
    `x params (MiB)`, one figure where the backends agree (to the digits
    shown) and both where they do not."""
    print("\napply_gradients step, compiled whole (XLA buffer assignment): "
          "x the parameters' bytes (MiB)\n")
    for m, by_backend in measured_by_model.items():
        print("- " + _model_line(m, next(iter(by_backend.values()))["model"]))
    models = list(measured_by_model)
    print("\n| optimizer | " + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    short = {"tensorflow": "TF", "jax": "JAX"}
    for name in STEP_OPTIMIZERS:
        cells = []
        for m in models:
            figures = {}
            for b, result in measured_by_model[m].items():
                step = result["steps"].get(name)
                if step is not None:
                    ratio = step["total"] / result["model"]["parameters"]
                    figures[b] = (f"{ratio:.4f} "
                                  f"({step['total'] / MiB:.0f})")
            if not figures:
                cells.append("-")
            elif (len(set(figures.values())) == 1
                  and len(figures) == len(measured_by_model[m])):
                cells.append(next(iter(figures.values())))
            else:
                cells.append(", ".join(f"{short[b]} {f}"
                                       for b, f in figures.items()))
        if any(c != "-" for c in cells):
            print(f"| {STEP_OPTIMIZERS[name][0]} | " + " | ".join(cells)
                  + " |")
    print_targets(list(measured_by_model.items()))


# ------------------------------------------------------- the largest model


def _config_key(args):
    return (f"layers{args.layers}_batch{args.batch_size}_"
            f"length{args.sequence_length}_vocab{args.vocab}")


def _sm3_tf_fingerprint():
    """A digest of sm3_tf's sources: a cache measured with other code is
    not reused."""
    import hashlib

    digest = hashlib.sha256()
    package = os.path.join(ROOT, "sm3_tf")
    for folder, dirs, files in sorted(os.walk(package)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".py", ".h", ".cc")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, package).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def _stamped(steps):
    """SM3's figures marked with the sources they were measured with."""
    for name, figures in steps.items():
        if name.startswith("sm3"):
            figures["sm3_tf_sources"] = _sm3_tf_fingerprint()
    return steps


def _drop_stale(entries, where):
    """Forgets SM3's entries measured with other sm3_tf sources."""
    current = _sm3_tf_fingerprint()
    for name in [n for n, e in entries.items() if n.startswith("sm3")
                 and e.get("sm3_tf_sources") != current]:
        _progress(f"{where}: {name} was measured with other sm3_tf "
                  "sources: measuring again")
        del entries[name]


def _versions():
    from importlib import metadata

    found = {}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "jax", "jaxlib",
                    "optax"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _load_cache(path):
    """The measurements kept in `path` (--cache), if they were made with
    the packages installed now."""
    if not (path and os.path.exists(path)):
        return {"versions": _versions()}
    with open(path) as f:
        cache = json.load(f)
    if cache.get("versions") != _versions():
        sys.exit(f"--cache {path} was measured with {cache.get('versions')}, "
                 f"not {_versions()}: delete it or choose another file")
    # (SM3's entries also carry a digest of sm3_tf's sources: those measured
    # with other sources are measured again.)
    return cache


def _save_cache(path, cache):
    if path:
        with open(path, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
            f.write("\n")


def largest_model(args, cache, optimizers):
    """Per optimizer: the largest d_model (a multiple of --d_step) whose
    whole step fits the budget, found by compiling rungs of the ladder
    (each in a fresh child: XLA's compiler keeps memory between programs).
    """
    measured = cache.setdefault("largest_model", {}).setdefault(
        _config_key(args), {})
    budget = args.budget_gib * GiB
    step = args.d_step
    results = {}
    for name in optimizers:
        _drop_stale(measured, "largest_model")
        points = measured.setdefault(name, {"points": {}})
        if name.startswith("sm3"):
            points["sm3_tf_sources"] = _sm3_tf_fingerprint()
        points = points["points"]  # str(d_model) -> figures

        def fits(d):
            if str(d) not in points:
                started = time.time()
                points[str(d)] = _run_child(_child_command(
                    args, _section="largest_model", _optimizer=name,
                    _d_model=d), "jax",
                    f"the Transformer d_model={d} with {name}")
                _save_cache(args.cache, cache)
                _progress(f"{name} d_model={d}: "
                          f"{points[str(d)]['total'] / GiB:.2f} GiB, "
                          f"{time.time() - started:.0f} s")
            return points[str(d)]["total"] <= budget

        while True:
            lo = max((int(d) for d, p in points.items()
                      if p["total"] <= budget), default=None)
            hi = min((int(d) for d, p in points.items()
                      if p["total"] > budget), default=None)
            if lo is not None and hi is not None and hi - lo <= step:
                break
            d = _next_probe(args, points, lo, hi, budget)
            if d < step:
                raise RuntimeError(f"{name}: even d_model={step} does not "
                                   f"fit {args.budget_gib:g} GiB")
            if d > args.d_max:
                raise RuntimeError(f"{name}: d_model={args.d_max} still "
                                   f"fits {args.budget_gib:g} GiB (raise "
                                   "--d_max)")
            fits(d)
        best, over = points[str(lo)], points[str(hi)]
        results[name] = {"d_model": lo, "parameters": best["count"],
                         "total": best["total"],
                         "temporary": best["temporary"],
                         "next_d_model": hi, "next_total": over["total"]}
    return results


def _next_probe(args, points, lo, hi, budget):
    """The rung to compile next: d_model 1024 and 2048 first, then where
    the budget meets the line through the two measured points nearest it
    (bytes against parameters), kept strictly inside the bracket."""
    step = args.d_step
    for d in (1024, 2048):
        d = max(step, d // step * step)
        if str(d) not in points and (lo is None or d > lo) and (
                hi is None or d < hi):
            return d
    params = lambda d: transformer_params(d, args.layers, args.vocab)  # noqa
    nearest = sorted(((int(d), p["total"]) for d, p in points.items()),
                     key=lambda p: abs(p[1] - budget))[:2]
    d = None
    if len(nearest) == 2 and nearest[0][0] != nearest[1][0]:
        (d0, t0), (d1, t1) = nearest
        slope = (t1 - t0) / (params(d1) - params(d0))
        if slope > 0:
            target = params(d0) + (budget - t0) / slope
            d = step
            while params(d + step) <= target and d <= 2 * args.d_max:
                d += step
    if d is None:  # no usable line: double, halve or bisect
        if hi is None:
            d = 2 * lo
        elif lo is None:
            d = hi // 2 // step * step
        else:
            d = (lo + hi) // 2 // step * step
    low = (lo or 0) + step
    high = hi - step if hi is not None else max(d, low)
    return min(max(d, low), high)


def print_largest(args, results):
    print(f"\nLargest Transformer whose whole training step fits "
          f"{args.budget_gib:g} GiB (batch {args.batch_size} x "
          f"{args.sequence_length} tokens, {args.layers}+{args.layers} "
          f"layers, d_ff = 4 d_model, Keras-JAX buffer assignment)\n")
    print("| optimizer | d_model | parameters (M) | x SGD's | step GiB | "
          f"next rung's GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    sgd = results.get("sgd", {}).get("parameters")
    for name, row in results.items():
        ratio = f"{row['parameters'] / sgd:.2f}" if sgd else "-"
        print(f"| {STEP_OPTIMIZERS[name][0]} | {row['d_model']} | "
              f"{row['parameters'] / 1e6:.0f} | {ratio} | "
              f"{row['total'] / GiB:.2f} | "
              f"{row['next_total'] / GiB:.2f} (d {row['next_d_model']}) |")


def plot_largest(args, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    params = [results[n]["parameters"] / 1e6 for n in names]
    colors = ["tab:red" if n.startswith("sm3") else "tab:gray"
              for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(names) + 1.4))
    bars = ax.barh(range(len(names)), params, color=colors)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([STEP_OPTIMIZERS[n][0] for n in names], fontsize=8)
    ax.invert_yaxis()
    for bar, n in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {bar.get_width():.0f} M (d {results[n]['d_model']})",
                va="center", fontsize=7)
    ax.set_xlabel("parameters of the largest Transformer (millions)")
    ax.set_xlim(0, max(params) * 1.25)
    ax.set_title(f"Largest Transformer whose training step fits "
                 f"{args.budget_gib:g} GiB\n(batch {args.batch_size} x "
                 f"{args.sequence_length}, XLA buffer assignment, Keras-JAX)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


# --------------------------------------------------------------------- main


def _split(parser, flag, value, known):
    names = [n for n in value.split(",") if n]
    if not names:
        parser.error(f"{flag}: empty list")
    for name in names:
        if name not in known:
            parser.error(f"{flag}: unknown {name!r}; choose from "
                         f"{', '.join(known)}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Sections: counting (default), --apply_step, --whole_step, "
               "--largest_model. See the module docstring for details.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    section = parser.add_argument_group("sections (one or more)")
    section.add_argument("--apply_step", action="store_true",
                         help="compiled apply_gradients step of --model "
                              "(default resnet50,transformer_big,bert_large)")
    section.add_argument("--whole_step", action="store_true",
                         help="compiled whole training step of the MLP")
    section.add_argument("--largest_model", action="store_true",
                         help="largest Transformer whose whole step fits "
                              "--budget_gib (Keras-JAX, compile only)")
    parser.add_argument("--model", default=None,
                        help="comma-separated, from "
                             f"{', '.join(model_shapes.MODELS)} (counting: "
                             "default transformer_big; --apply_step: "
                             "default " + ",".join(APPLY_STEP_MODELS) + ")")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated. Counting: names of "
                             "sm3_tf.memory.STATE_RULES (default all); "
                             "compiled steps: "
                             + ", ".join(STEP_OPTIMIZERS)
                             + " (default all; adafactor_optax is JAX "
                               "only)")
    parser.add_argument("--backends", default="tensorflow,jax",
                        help="compiled steps: tensorflow, jax or both "
                             "(--largest_model is jax only)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of tables")
    parser.add_argument("--xla_cpu_scheduler",
                        choices=("default", "memory_optimized"),
                        default="default",
                        help="--whole_step: XLA:CPU's scheduler, its default "
                             "(breadth first, for concurrency) or the "
                             "memory-optimized one (" + MEMORY_OPTIMIZED_FLAG
                             + " in XLA_FLAGS)")
    mlp = parser.add_argument_group("--whole_step")
    mlp.add_argument("--mlp_width", type=int, default=2048,
                     help="width of each Dense layer (default 2048)")
    mlp.add_argument("--mlp_layers", type=int, default=8,
                     help="number of Dense layers (default 8)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="--whole_step and --largest_model (default 8)")
    big = parser.add_argument_group("--largest_model")
    big.add_argument("--budget_gib", type=float, default=8.0,
                     help="memory budget of the whole step (default 8)")
    big.add_argument("--sequence_length", type=int, default=128,
                     help="tokens per example (default 128)")
    big.add_argument("--layers", type=int, default=6,
                     help="encoder and decoder layers each (default 6)")
    big.add_argument("--vocab", type=int, default=32000,
                     help="shared vocabulary (default 32000)")
    big.add_argument("--d_step", type=int, default=64,
                     help="the ladder's d_model step, a multiple of 64 "
                          "(default 64)")
    big.add_argument("--d_max", type=int, default=8192,
                     help="the largest d_model tried (default 8192)")
    parser.add_argument("--cache", default=None,
                        help="JSON file of compiled-step measurements: "
                             "read, then extended, so a rerun compiles only "
                             "what it lacks (and prints the tables of what "
                             "it has). SM3's entries are measured again when "
                             "sm3_tf's sources change; delete the file to "
                             "measure everything again")
    big.add_argument("--plot", default=None,
                     help="write the figure (PNG) to this path")
    parser.add_argument("--_child", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--_section", help=argparse.SUPPRESS)
    parser.add_argument("--_optimizer", help=argparse.SUPPRESS)
    parser.add_argument("--_d_model", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("mlp_width", "mlp_layers", "batch_size", "sequence_length",
                 "layers", "vocab", "d_max"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.d_step < 64 or args.d_step % 64:
        parser.error(f"--d_step must be a positive multiple of 64 (64 per "
                     f"attention head), got {args.d_step}")
    if args.xla_cpu_scheduler != "default" and (
            args.apply_step or args.largest_model):
        parser.error("--xla_cpu_scheduler applies to --whole_step only")
    if not 0 < args.budget_gib < 1024:
        parser.error(f"--budget_gib must be in (0, 1024), got "
                     f"{args.budget_gib}")
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    if args._child:
        return child_main(args)
    backends = _split(parser, "--backends", args.backends, BACKENDS)
    steps = args.apply_step or args.whole_step or args.largest_model
    output = {}
    if not steps:
        from sm3_tf import memory

        models = _split(parser, "--model", args.model or "transformer_big",
                        model_shapes.MODELS)
        optimizers = _split(parser, "--optimizers",
                            args.optimizers or ",".join(memory.STATE_RULES),
                            memory.STATE_RULES)
        for model in models:
            counted = count(model, optimizers)
            if args.json:
                for row in counted["optimizers"].values():
                    row.pop("per_variable")
                output.setdefault("counted", {})[model] = counted
            else:
                print_counts(model, counted)
    cache = _load_cache(args.cache)
    for section in ("apply_step", "whole_step", "largest_model"):
        if not getattr(args, section):
            continue
        runs_on = ["jax"] if section == "largest_model" else backends
        # The default: every optimizer that runs on these backends; one
        # named that runs on none of them is an error.
        optimizers = _split(
            parser, "--optimizers",
            args.optimizers or ",".join(
                name for name, (_, on) in STEP_OPTIMIZERS.items()
                if set(on) & set(runs_on)),
            STEP_OPTIMIZERS)
        for name in optimizers:
            if not set(STEP_OPTIMIZERS[name][1]) & set(runs_on):
                parser.error(f"--optimizers: {name!r} runs on "
                             f"{', '.join(STEP_OPTIMIZERS[name][1])} only, "
                             f"not on --backends={','.join(runs_on)}")
        if section == "apply_step":
            models = _split(parser, "--model",
                            args.model or ",".join(APPLY_STEP_MODELS),
                            model_shapes.MODELS)
            measured = {model: measure_steps(args, cache, section, model,
                                             optimizers, backends)
                        for model in models}
            output[section] = measured
            if not args.json:
                print_apply_tables(measured)
        elif section == "whole_step":
            key = (f"mlp{args.mlp_layers}x{args.mlp_width}_"
                   f"batch{args.batch_size}")
            scheduler = ""
            if args.xla_cpu_scheduler != "default":
                key += f"_{args.xla_cpu_scheduler}_scheduler"
                scheduler = (f", XLA:CPU's {args.xla_cpu_scheduler} "
                             "scheduler").replace("_", "-")
            measured = measure_steps(args, cache, section, key, optimizers,
                                     backends)
            output[section] = measured
            if not args.json:
                print_step_table(
                    f"whole training step, MLP {args.mlp_layers} x Dense "
                    f"{args.mlp_width}, batch {args.batch_size}{scheduler}",
                    measured)
        else:
            if "jax" not in backends:
                parser.error("--largest_model runs on jax: --backends must "
                             "include it")
            results = largest_model(args, cache, optimizers)
            output[section] = {"budget_gib": args.budget_gib,
                               "results": results}
            if not args.json:
                print_largest(args, results)
            if args.plot:
                plot_largest(args, results, args.plot)
    if args.json:
        print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
