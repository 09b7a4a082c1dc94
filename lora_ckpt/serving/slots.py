"""Per-layer slot storage for many resident adapters, and its forward paths.

A pool gives each LoRA layer a :class:`LoRASlots` (``A[K, ..., R]``,
``B[K, R, out]``, an output scale ``g[K, out]`` and a bias per slot; smaller
ranks zero-padded, each layer to ``R`` on its own, which adds exact zeros)
and each layer an adapter may carry in full (a classifier head of its own
width, norm statistics) a :class:`FullLayerSlots`.
Slot 0 is "off": zero update, the base layer's own weights.

DoRA adapters are served by the same storage: at inference DoRA's
``magnitude / ||W0 + scaling * A @ B||`` (column norms) is a constant per
output, computed once when the adapter loads and kept as the slot's ``g``;
every forward path multiplies the LoRA-augmented output by it before the bias.
Plain LoRA slots (and free ones) hold ``g = 1``, which multiplies exactly.

Requests reach the slots through the pool's :class:`Routing`: a scalar slot
id (the whole batch uses one adapter) or a vector (one slot per sample) that
the pool's compiled forward takes as an input, so nothing retraces when
adapters load, evict or switch. A routing value set by one pool reaches only
that pool's layers; outside its routing the layers behave as plain layers.

Mixed batches cost what the adapters present in them cost, never what the
resident ones would: Dense layers gather each sample's ``A``/``B`` (or its
updated kernel), convolutions run the LoRA branch once per distinct adapter
in the batch on that adapter's samples.
"""

import contextlib
import contextvars
import itertools

import numpy as np

from .._tf import tf
from ..errors import AdapterMismatchError, LoRAConfigError
from ..layers import dora_scale, matmul_last_axis

BASE_ONLY = object()
"""Routing value that makes every layer of the pool compute its base layer alone."""

TYPICAL_BATCH = 8
"""Samples a single-adapter batch of unknown size is assumed to have when a
layer chooses between an updated kernel and the LoRA branch."""

_ids = itertools.count()


class Routing:
    """The slot routing of one pool: a context variable no other pool reads."""

    def __init__(self):
        self._var = contextvars.ContextVar(f"lora_slot_routing_{next(_ids)}", default=None)
        # The slot whose full layers (heads, norms) serve while LoRA is merged.
        self.merged_slot = tf.Variable(0, trainable=False)

    @contextlib.contextmanager
    def route(self, slot_ids):
        """Routes this pool's layers called inside the block.

        Args:
            slot_ids: An int32 tensor (a scalar slot for the whole batch, or
                ``[batch]`` slots), or :data:`BASE_ONLY`.
        """
        token = self._var.set(slot_ids)
        try:
            yield
        finally:
            self._var.reset(token)

    def current(self):
        """The routing value in force, or ``None`` outside :meth:`route`."""
        return self._var.get()


def _per_sample(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes ``values[batch, n]`` to broadcast against ``like[batch, ..., n]``."""
    extra = like.shape.rank - values.shape.rank
    shape = tf.concat([tf.shape(values)[:1], tf.ones([extra], tf.int32), tf.shape(values)[1:]], 0)
    return tf.reshape(values, shape)


def _static_batch(x: tf.Tensor) -> int:
    return x.shape[0] if x.shape[0] is not None else TYPICAL_BATCH


def grouped_by_slot(x: tf.Tensor, slot_ids: tf.Tensor, branch, out: tf.Tensor) -> tf.Tensor:
    """Adds ``branch(samples, slot)`` to ``out`` once per distinct slot of the batch.

    Args:
        x: The layer input ``[batch, ...]``.
        slot_ids: ``[batch]`` slot per sample.
        branch: ``(x_of_group, slot) -> update`` for the samples of one slot.
        out: The base output ``[batch, ..., out]``; the updates are added to it.

    Returns:
        ``out`` plus each sample's update.
    """
    slots, group = tf.unique(slot_ids)
    updates = tf.TensorArray(out.dtype, size=tf.size(slots), infer_shape=False)
    positions = tf.TensorArray(tf.int32, size=tf.size(slots), infer_shape=False)

    def body(i, updates, positions):
        members = tf.cast(tf.where(tf.equal(group, i))[:, 0], tf.int32)
        update = branch(tf.gather(x, members), slots[i])
        return i + 1, updates.write(i, update), positions.write(i, members)

    _, updates, positions = tf.while_loop(
        lambda i, *_: i < tf.size(slots), body, [tf.constant(0), updates, positions]
    )
    # Undo the grouping: position p of the concatenation holds sample order[p].
    order = positions.concat()
    update = tf.gather(updates.concat(), tf.math.invert_permutation(order))
    return out + tf.reshape(update, tf.shape(out))


class LoRASlots:
    """The resident adapters of one LoRA layer, and the layer's serving hook.

    Args:
        layer: A built LoRA layer (it gets this object as ``lora_hook``).
        num_slots: Number of slots, slot 0 included.
        max_rank: Rank every slot is padded to.
        routing: The pool's routing.
    """

    def __init__(self, layer, num_slots: int, max_rank: int, routing: Routing):
        dtype = layer.kernel.dtype
        self.layer = layer
        self.routing = routing
        self.max_rank = max_rank
        self.a_shape = list(layer.kernel_lora_a.shape[:-1])
        self.out_dim = int(layer.kernel.shape[-1])
        self.dtype = dtype
        self.a = tf.Variable(tf.zeros([num_slots, *self.a_shape, max_rank], dtype), trainable=False)
        self.b = tf.Variable(tf.zeros([num_slots, max_rank, self.out_dim], dtype), trainable=False)
        # DoRA's per-output factor of each slot; 1 for plain LoRA and free slots.
        self.g = tf.Variable(tf.ones([num_slots, self.out_dim], dtype), trainable=False)
        self.bias = (
            tf.Variable(tf.tile(layer.bias[None], [num_slots, 1]), trainable=False)
            if layer.use_bias
            else None
        )
        self.base_bias = layer.bias.numpy() if layer.use_bias else None
        self.is_dense = len(self.a_shape) == 1
        layer.lora_hook = self

    def detach(self) -> None:
        """Gives the layer back its plain forward pass."""
        if self.layer.lora_hook is self:
            self.layer.lora_hook = None

    # ---- writing (inside the pool's compiled slot write) ----------------------

    def padded(self, a: np.ndarray | None, b: np.ndarray | None):
        """An adapter's ``A[..., r]`` and ``B[r, out]`` zero-padded to ``max_rank``
        (zeros for a layer the adapter does not adapt); pass ``B`` already scaled."""
        a_padded = np.zeros([*self.a_shape, self.max_rank], self.dtype.as_numpy_dtype)
        b_padded = np.zeros([self.max_rank, self.out_dim], self.dtype.as_numpy_dtype)
        if a is not None:
            a_padded[..., : a.shape[-1]] = a
            b_padded[: b.shape[0]] = b
        return a_padded, b_padded

    @property
    def slot_variables(self) -> list:
        """The stacked ``[slots, ...]`` variables, in the order of :meth:`slot_values`."""
        return [self.a, self.b, self.g] + ([self.bias] if self.bias is not None else [])

    def slot_values(self, a, b, scale: float, bias, magnitude=None) -> list[np.ndarray]:
        """One slot's values for an adapter's ``A``, ``B``, scaling, bias and
        DoRA magnitude (``None``: a layer it does not adapt, the base bias, a
        plain LoRA layer). The slot keeps ``scale * B``: two ops fewer per
        layer in every forward pass.

        Raises:
            AdapterMismatchError: If a DoRA layer's updated kernel has a column
                of norm zero (its output scale would not be finite).
        """
        dtype = self.dtype.as_numpy_dtype
        scaled = None if b is None else b.astype(dtype) * np.asarray(scale, dtype)
        a_padded, b_padded = self.padded(a, scaled)
        values = [a_padded, b_padded, np.ones([self.out_dim], dtype)]
        if magnitude is not None:
            values[2] = self.output_scale(a_padded, b_padded, magnitude)
        if self.bias is not None:
            values.append(self.base_bias if bias is None else bias)
        return values

    def base_kernel(self) -> tf.Tensor:
        """The layer's base kernel ``W0``, also while an adapter is merged into it."""
        return self.layer.base_kernel()

    def output_scale(self, a_padded, b_scaled, magnitude) -> np.ndarray:
        """DoRA's ``magnitude / ||W0 + A @ (scale * B)||`` per output, in float32
        from the base kernel (the layer's own, never a merged one)."""
        kernel = tf.cast(self.base_kernel(), tf.float32)
        update = matmul_last_axis(
            tf.constant(a_padded, tf.float32), tf.constant(b_scaled, tf.float32)
        )
        g = dora_scale(tf.constant(magnitude, tf.float32), kernel + update).numpy()
        if not np.isfinite(g).all():
            raise AdapterMismatchError(
                f"The DoRA output scale (magnitude / column norm) of layer '{self.layer.name}' "
                "overflows float32 on this base; the adapter does not fit it."
            )
        return g.astype(self.dtype.as_numpy_dtype)

    # ---- forward ----------------------------------------------------------------

    def __call__(self, layer, x):
        routing = self.routing.current()
        if routing is None:
            return None
        if routing is BASE_ONLY:
            return self._with_bias(layer.base_op(x, layer.kernel), layer.bias)
        if routing.shape.rank == 0:
            return self.uniform(x, routing)
        outputs = self.mixed(x, routing)
        if not layer.use_bias:
            return outputs
        return outputs + _per_sample(tf.cast(tf.gather(self.bias, routing), x.dtype), outputs)

    def _with_bias(self, outputs, bias):
        # bias_add right after the matmul/convolution: the two fuse into one op,
        # so the output is not read and written once more for the bias.
        if not self.layer.use_bias:
            return outputs
        return tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))

    def _rows(self, x) -> int:
        """Output positions per sample (h*w, tokens); unknown dims count as one."""
        if self.is_dense:
            return x.shape[1:-1].num_elements() or 1 if x.shape.rank > 2 else 1
        out = self.layer.compute_output_shape(x.shape)
        return out[1:-1].num_elements() or 1

    def _prefers_kernel(self, x, samples: int) -> bool:
        # Memory traffic decides on a CPU: the LoRA branch reads the input and
        # writes and adds an output-sized tensor per sample; an updated kernel
        # costs in*out once per kernel.
        fan_in = int(np.prod(self.a_shape))
        return self._rows(x) * (fan_in + 2 * self.out_dim) * samples >= 2 * fan_in * self.out_dim

    # tf.gather reads one slot of a variable; indexing would read all of it first.
    def delta(self, slot) -> tf.Tensor:
        """``scale * A @ B`` of one slot, in the shape of the kernel."""
        return matmul_last_axis(tf.gather(self.a, slot), tf.gather(self.b, slot))

    def uniform(self, x, slot):
        """Output (bias included, activation not) when every sample uses ``slot``."""
        layer = self.layer
        bias = tf.gather(self.bias, slot) if layer.use_bias else None
        g = tf.cast(tf.gather(self.g, slot), x.dtype)
        if self._prefers_kernel(x, _static_batch(x)):
            # The output scale folded into the kernel: kernel-sized, not output-sized.
            kernel = (layer.kernel + tf.cast(self.delta(slot), x.dtype)) * g
            return self._with_bias(layer.base_op(x, kernel), bias)
        outputs = layer.base_op(x, layer.kernel) + self.uniform_update(x, slot)
        return self._with_bias(outputs * g, bias)

    def mixed(self, x, slot_ids):
        """Pre-bias output, each sample with its own slot."""
        layer = self.layer
        g = tf.cast(tf.gather(self.g, slot_ids), x.dtype)
        if not self.is_dense:
            base = layer.base_op(x, layer.kernel)
            outputs = grouped_by_slot(x, slot_ids, self.uniform_update, base)
            return outputs * _per_sample(g, outputs)
        # self.a_shape[0] is static even where x.shape[-1] is not (ViT attention).
        rows = tf.reshape(x, [tf.shape(x)[0], -1, self.a_shape[0]])
        b = tf.gather(self.b, slot_ids)
        a = tf.gather(self.a, slot_ids)
        if self._prefers_kernel(x, 1):
            # Early, wide layers: each sample's own updated kernel, one batched matmul
            # in place of the base matmul.
            kernels = (layer.kernel[None] + tf.cast(tf.matmul(a, b), x.dtype)) * g[:, None]
            y = tf.matmul(rows, kernels)
        else:
            update = tf.matmul(tf.matmul(rows, tf.cast(a, x.dtype)), tf.cast(b, x.dtype))
            y = (matmul_last_axis(rows, layer.kernel) + update) * g[:, None]
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.out_dim]], 0))

    def uniform_update(self, x, slot):
        """The LoRA update alone (no base) for samples that all use ``slot``."""
        a = tf.cast(tf.gather(self.a, slot), x.dtype)
        b = tf.cast(tf.gather(self.b, slot), x.dtype)
        if self.is_dense:  # one broadcasting matmul each: fewer ops than tensordot
            return tf.matmul(tf.matmul(x, a), b)
        return matmul_last_axis(self.layer.base_op(x, a), b)


class FullLayerSlots:
    """Per-slot copies of a layer an adapter carries in full (PEFT's ``modules_to_save``).

    Supported: ``Dense`` (a classifier head may be narrower than
    ``max_width``: its output is zero-padded and the pool masks it),
    ``BatchNormalization`` and ``LayerNormalization`` (inference statistics
    and scale/offset). Slot 0 and every free slot hold the base layer's own
    weights.

    Args:
        layer: The built layer.
        num_slots: Number of slots, slot 0 included.
        routing: The pool's routing.
        max_width: Output width of each slot (a Dense head's ``max_classes``).

    Raises:
        LoRAConfigError: For another layer type.
    """

    SUPPORTED = ("Dense", "BatchNormalization", "LayerNormalization")

    def __init__(self, layer, num_slots: int, routing: Routing, max_width: int | None = None):
        kind = type(layer).__name__
        if not isinstance(
            layer,
            (
                tf.keras.layers.Dense,
                tf.keras.layers.BatchNormalization,
                tf.keras.layers.LayerNormalization,
            ),
        ) or getattr(layer, "is_lora_layer", False):
            raise LoRAConfigError(
                f"Layer '{layer.name}' ({kind}) cannot be served per slot; a pool serves "
                f"full layers of types {list(self.SUPPORTED)}."
            )
        self.layer, self.routing = layer, routing
        self.is_dense = isinstance(layer, tf.keras.layers.Dense)
        self.width = int(max_width or layer.units) if self.is_dense else None
        self.base = {self._name(v): v.numpy() for v in layer.weights}
        self.slots = {
            name: tf.Variable(np.repeat(self.pad(value)[None], num_slots, 0), trainable=False)
            for name, value in self.base.items()
        }
        self._plain_call = layer.call
        layer.call = self._call  # scoped: only this layer object, undone by detach()

    @staticmethod
    def _name(variable) -> str:
        return variable.name.rsplit("/", 1)[-1].split(":", 1)[0]

    def detach(self) -> None:
        """Gives the layer back its plain ``call``."""
        if self.layer.__dict__.get("call") == self._call:
            del self.layer.call

    def pad(self, value: np.ndarray) -> np.ndarray:
        """A variable's value padded on its output axis to the slot width."""
        if not self.is_dense or value.shape[-1] == self.width:
            return value
        padded = np.zeros([*value.shape[:-1], self.width], value.dtype)
        padded[..., : value.shape[-1]] = value
        return padded

    @property
    def slot_variables(self) -> list:
        """The stacked ``[slots, ...]`` variables, in the order of :meth:`slot_values`."""
        return list(self.slots.values())

    def slot_values(self, values: dict) -> list[np.ndarray]:
        """One slot's values: the adapter's where it has them (``name -> array``),
        else the base layer's, padded to the slot width."""
        return [self.pad(values.get(name, base)) for name, base in self.base.items()]

    def _call(self, inputs, *args, **kwargs):
        routing = self.routing.current()
        if routing is None:
            return self._plain_call(inputs, *args, **kwargs)
        if routing is BASE_ONLY:
            routing = self.routing.merged_slot
        x = tf.cast(inputs, self.layer.compute_dtype)
        pick = lambda name: tf.gather(self.slots[name], routing)  # noqa: E731
        if self.is_dense:
            kernel, layer = pick("kernel"), self.layer
            if routing.shape.rank == 0:
                y = matmul_last_axis(x, tf.cast(kernel, x.dtype))
            else:
                rows = tf.reshape(x, [tf.shape(x)[0], -1, layer.kernel.shape[0]])
                y = tf.matmul(rows, tf.cast(kernel, x.dtype))
                y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.width]], 0))
            if layer.use_bias:
                bias = tf.cast(pick("bias"), y.dtype)
                y += bias if routing.shape.rank == 0 else _per_sample(bias, y)
            return layer.activation(y) if layer.activation is not None else y
        return self._normalize(x, pick, routing.shape.rank == 0)

    def _normalize(self, x, pick, uniform: bool):
        layer = self.layer
        x32 = tf.cast(x, tf.float32)  # statistics in float32, also under mixed precision
        shaped = (
            (lambda v: tf.cast(v, tf.float32))
            if uniform
            else (lambda v: _per_sample(tf.cast(v, tf.float32), x32))
        )
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            mean, variance = shaped(pick("moving_mean")), shaped(pick("moving_variance"))
        else:
            axes = [a % x.shape.rank for a in layer.axis]
            mean, variance = tf.nn.moments(x32, axes, keepdims=True)
        y = (x32 - mean) * tf.math.rsqrt(variance + layer.epsilon)
        if layer.scale:
            y *= shaped(pick("gamma"))
        if layer.center:
            y += shaped(pick("beta"))
        return tf.cast(y, x.dtype)
