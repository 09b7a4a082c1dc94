"""Per-layer paged storage for many resident adapters, and its forward paths.

A pool gives each LoRA layer a :class:`LoRASlots`. Its adapters live in
pages (S-LoRA's unified paging): page ``p`` is one rank component, ``A``'s
column ``p`` (``a_pages[p]``, the shape of the kernel's fan-in) and row ``p``
of ``scale * B`` (``b_pages[p]``). A slot's adapter of rank ``r`` in this
layer owns ``r`` pages, listed in the slot's row of ``page_table`` (then
zeros: page 0 is all zeros), its rank in ``ranks``. So memory and compute
follow each adapter's own rank, per layer (a rank pattern costs what each
layer's rank costs), never the pool's ``max_rank``. The stacks grow as
adapters load (:mod:`~.pages` decides by how much), which changes their
leading dimension, not the traced graphs (it is left unknown).

DoRA adapters keep their output scale ``g`` (DoRA's ``magnitude / ||W0 +
scale * A @ B||`` per output, a constant at inference, computed once when the
adapter loads), and adapters that bring a bias keep it, in row stacks of
their own: ``g_rows``/``bias_rows``, row 0 the default (ones; the base bias)
for every adapter without one. Every forward path multiplies the
LoRA-augmented output by ``g`` before the bias.

Slot 0 is "off": rank 0 in every layer, the base layer's own weights.

Mixed batches cost what the adapters present in them cost: Dense layers
gather each sample's pages up to the largest rank in the batch (padding with
the zero page, which adds exact zeros), convolutions run the LoRA branch once
per distinct adapter in the batch on that adapter's samples.
"""

import numpy as np

from .._tf import tf
from ..errors import AdapterMismatchError
from ..layers import DORA, matmul_last_axis
from .pages import RowAllocator
from .routing import BASE_ONLY, Routing, grouped_by_slot, per_sample
from .slot_views import SlotView

__all__ = ["LoRASlots"]


TYPICAL_BATCH = 8
"""Samples a single-adapter batch of unknown size is assumed to have when a
layer chooses between an updated kernel and the LoRA branch."""


def _growable(initial: np.ndarray) -> tf.Variable:
    """A variable whose leading dimension may change (the graphs leave it unknown)."""
    shape = tf.TensorShape([None, *initial.shape[1:]])
    return tf.Variable(initial, shape=shape, trainable=False)


def _static_batch(x: tf.Tensor) -> int:
    return x.shape[0] if x.shape[0] is not None else TYPICAL_BATCH


class LoRASlots:
    """The resident adapters of one LoRA layer, and the layer's serving hook.

    Args:
        layer: A built LoRA layer (it gets this object as ``lora_hook``).
        num_slots: Number of slots, slot 0 included.
        max_rank: The largest rank an adapter may have in this layer.
        routing: The pool's routing.

    Attributes:
        a_pages, b_pages: The pages ``[pages, *fan_in]`` and ``[pages, out]``.
        page_table: ``[slots, max_rank]`` each slot's pages (0 past its rank).
        ranks: ``[slots]`` each slot's rank in this layer.
        g_rows, g_index: DoRA output scales ``[rows, out]`` and each slot's row.
        bias_rows, bias_index: Biases and each slot's row (``None`` without a bias).
    """

    def __init__(self, layer, num_slots: int, max_rank: int, routing: Routing):
        dtype = layer.kernel.dtype
        self.layer, self.routing, self.max_rank, self.dtype = layer, routing, max_rank, dtype
        self.a_shape = list(layer.kernel_lora_a.shape[:-1])
        self.fan_in = int(np.prod(self.a_shape))
        self.out_dim = int(layer.kernel.shape[-1])
        self.is_dense = len(self.a_shape) == 1
        np_dtype = dtype.as_numpy_dtype
        self.pages = RowAllocator(limit=(num_slots - 1) * max_rank + 1)
        self.a_pages = _growable(np.zeros([1, *self.a_shape], np_dtype))
        self.b_pages = _growable(np.zeros([1, self.out_dim], np_dtype))
        self.page_table = tf.Variable(tf.zeros([num_slots, max_rank], tf.int32), trainable=False)
        self.ranks = tf.Variable(tf.zeros([num_slots], tf.int32), trainable=False)
        self.g_alloc = RowAllocator(limit=num_slots)
        self.g_rows = _growable(np.ones([1, self.out_dim], np_dtype))
        self.g_index = tf.Variable(tf.zeros([num_slots], tf.int32), trainable=False)
        self.base_bias = layer.bias.numpy() if layer.use_bias else None
        self.bias_alloc = RowAllocator(limit=num_slots) if layer.use_bias else None
        self.bias_rows = _growable(self.base_bias[None]) if layer.use_bias else None
        self.bias_index = (
            tf.Variable(tf.zeros([num_slots], tf.int32), trainable=False)
            if layer.use_bias
            else None
        )
        layer.lora_hook = self

    def detach(self) -> None:
        """Gives the layer back its plain forward pass."""
        if self.layer.lora_hook is self:
            self.layer.lora_hook = None

    # ---- what a slot holds ---------------------------------------------------------

    @property
    def a(self) -> SlotView:
        """Every slot's ``A``, zero-padded to ``max_rank``: ``[slots, *fan_in, max_rank]``."""
        return SlotView(self, "a")

    @property
    def b(self) -> SlotView:
        """Every slot's ``scale * B``, zero-padded: ``[slots, max_rank, out]``."""
        return SlotView(self, "b")

    @property
    def g(self) -> SlotView:
        """Every slot's output scale ``[slots, out]`` (ones for plain LoRA)."""
        return SlotView(self, "g")

    @property
    def bias(self) -> SlotView | None:
        """Every slot's bias ``[slots, out]``, or ``None`` for a layer without one."""
        return SlotView(self, "bias") if self.bias_rows is not None else None

    @property
    def slot_variables(self) -> list:
        """Every variable a slot write changes."""
        variables = [self.a_pages, self.b_pages, self.page_table, self.ranks]
        variables += [self.g_rows, self.g_index]
        if self.bias_rows is not None:
            variables += [self.bias_rows, self.bias_index]
        return variables

    def slot_values(self, a, b, scale: float, bias, magnitude=None) -> tuple:
        """One slot's contents for an adapter's ``A[..., r]``, ``B[r, out]``,
        scaling, bias and DoRA magnitude (``None``: a layer it does not adapt,
        the base bias, a plain LoRA layer). The slot keeps ``scale * B``: two
        ops fewer per layer in every forward pass.

        Returns:
            ``(a_pages[r, *fan_in], b_pages[r, out], g or None, bias or None)``.

        Raises:
            AdapterMismatchError: If a DoRA layer's updated kernel has a column
                of norm zero (its output scale would not be finite).
        """
        dtype = self.dtype.as_numpy_dtype
        if a is None:
            a_pages = np.zeros([0, *self.a_shape], dtype)
            b_pages = np.zeros([0, self.out_dim], dtype)
        else:
            a_pages = np.moveaxis(np.asarray(a, dtype), -1, 0)
            b_pages = np.asarray(b, dtype) * np.asarray(scale, dtype)
        g = None if magnitude is None else self.output_scale(a_pages, b_pages, magnitude)
        own_bias = None if bias is None or self.bias_rows is None else np.asarray(bias, dtype)
        return a_pages, b_pages, g, own_bias

    def plan(self, slot: int, contents: tuple | None) -> tuple[np.ndarray, list, list, list]:
        """Takes the pages and rows ``slot`` needs for ``contents``, freeing those
        it held (plain Python: the caller serialises plans). The caller then
        grows the stacks that are short (:meth:`grow`) and runs :meth:`write`
        in a graph.

        Args:
            slot: The pool slot.
            contents: As :meth:`slot_values` returned, or ``None`` (a cleared slot).

        Returns:
            The slot's ints ``[rank, g row, bias row, pages padded to max_rank]``
            (row 0: the default), its four float parts raveled (``a_pages``,
            ``b_pages``, its ``g`` row, its bias row; empty where it has none),
            the rows each part goes to (its pages; its ``g`` row, its bias row,
            or none), and the stacks to grow first as ``(variable, rows)``.
        """
        a, b, g, bias = contents if contents is not None else self.slot_values(*[None] * 4)
        growths = []
        pages, grown = self.pages.assign(slot, len(a))
        if grown is not None:
            growths += [(self.a_pages, grown), (self.b_pages, grown)]
        ints = [len(a), self._row(self.g_alloc, self.g_rows, slot, g, growths)]
        if self.bias_alloc is not None:
            ints.append(self._row(self.bias_alloc, self.bias_rows, slot, bias, growths))
        else:
            ints.append(0)
        rows = [pages, ints[1:2] if g is not None else [], ints[2:3] if ints[2] else []]
        ints += pages + [0] * (self.max_rank - len(pages))
        parts = [np.ravel(p) if p is not None else np.zeros([0], a.dtype) for p in (a, b, g, bias)]
        return np.asarray(ints, np.int32), parts, rows, growths

    @staticmethod
    def _row(allocator, variable, slot: int, value, growths: list) -> int:
        rows, grown = allocator.assign(slot, 0 if value is None else 1)
        if grown is not None:
            growths.append((variable, grown))
        return rows[0] if rows else 0

    @staticmethod
    def grow(variable, size: int) -> None:
        """Extends a stack to ``size`` rows (a copy: no write may run meanwhile)."""
        old = tf.convert_to_tensor(variable)
        if size <= old.shape[0]:
            return
        extra = tf.zeros([size - old.shape[0], *old.shape[1:]], old.dtype)
        variable.assign(tf.concat([old, extra], 0))

    def write(self, slot, ints, parts, rows) -> None:
        """Writes one slot (inside the pool's compiled slot write): a scatter
        per variable, so the write graph stays small (it is traced per pool).

        Args:
            slot: The slot, shape ``[1]``.
            ints: Its ints as :meth:`plan` returned them, shape ``[1, 3 + max_rank]``.
            parts: Its four float parts, as :meth:`plan` returned them.
            rows: The rows of each part, as :meth:`plan` returned them.
        """
        a, b, g, bias = parts
        pages, g_row, bias_row = rows
        self.a_pages.scatter_update(tf.IndexedSlices(tf.reshape(a, [-1, *self.a_shape]), pages))
        self.b_pages.scatter_update(tf.IndexedSlices(tf.reshape(b, [-1, self.out_dim]), pages))
        self.g_rows.scatter_update(tf.IndexedSlices(tf.reshape(g, [-1, self.out_dim]), g_row))
        rank, g_index, bias_index, table = tf.split(ints, [1, 1, 1, self.max_rank], axis=1)
        self.page_table.scatter_update(tf.IndexedSlices(table, slot))
        self.ranks.scatter_update(tf.IndexedSlices(rank[0], slot))
        self.g_index.scatter_update(tf.IndexedSlices(g_index[0], slot))
        if self.bias_rows is not None:
            shaped = tf.reshape(bias, [-1, self.out_dim])
            self.bias_rows.scatter_update(tf.IndexedSlices(shaped, bias_row))
            self.bias_index.scatter_update(tf.IndexedSlices(bias_index[0], slot))

    def slot_bytes(self, slot: int) -> int:
        """Bytes ``slot``'s adapter takes in this layer's pages and rows."""
        size = self.dtype.size
        total = len(self.pages.rows_of(slot)) * (self.fan_in + self.out_dim) * size
        total += len(self.g_alloc.rows_of(slot)) * self.out_dim * size
        if self.bias_alloc is not None:
            total += len(self.bias_alloc.rows_of(slot)) * self.out_dim * size
        return total

    def allocated_bytes(self) -> int:
        """Bytes of this layer's page and row stacks (free rows and row 0 included)."""
        size = self.dtype.size
        total = self.pages.size * (self.fan_in + self.out_dim) * size
        total += self.g_alloc.size * self.out_dim * size
        if self.bias_alloc is not None:
            total += self.bias_alloc.size * self.out_dim * size
        return total

    # ---- reading one slot (merge, DoRA, inspection) ---------------------------------

    def base_kernel(self) -> tf.Tensor:
        """The layer's base kernel ``W0``, also while an adapter is merged into it."""
        return self.layer.base_kernel()

    def output_scale(self, a_pages, b_scaled, magnitude) -> np.ndarray:
        """DoRA's ``magnitude / ||W0 + A @ (scale * B)||`` per output, in float32
        from the base kernel (the layer's own, never a merged one)."""
        kernel = tf.cast(self.base_kernel(), tf.float32)
        update = self._delta(tf.constant(a_pages, tf.float32), tf.constant(b_scaled, tf.float32))
        # DoRA's own rule (the layers' variant object), not a second copy of it here.
        g = DORA.adapter_output_scale(kernel, update, magnitude).numpy()
        if not np.isfinite(g).all():
            raise AdapterMismatchError(
                f"The DoRA output scale (magnitude / column norm) of layer '{self.layer.name}' "
                "overflows float32 on this base; the adapter does not fit it."
            )
        return g.astype(self.dtype.as_numpy_dtype)

    def _delta(self, a_pages, b_pages) -> tf.Tensor:
        """``A @ B`` in the shape of the kernel, from pages ``[r, *fan_in]`` and ``[r, out]``."""
        if self.is_dense:  # two reshapes fewer per layer and request
            return tf.matmul(a_pages, b_pages, transpose_a=True)
        flat = tf.reshape(a_pages, [-1, self.fan_in])
        return tf.reshape(tf.matmul(flat, b_pages, transpose_a=True), [*self.a_shape, self.out_dim])

    def factors(self, slot, least: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
        """One slot's pages: ``A`` as ``[r, *fan_in]`` and ``scale * B`` as ``[r, out]``
        (at least ``least`` pages: the zero page pads them)."""
        # tf.gather reads rows of a variable; indexing would read all of it first.
        rank = tf.gather(self.ranks, slot)
        rank = tf.maximum(rank, least) if least else rank
        ids = tf.gather(self.page_table, slot)[:rank]
        return tf.gather(self.a_pages, ids), tf.gather(self.b_pages, ids)

    def delta(self, slot) -> tf.Tensor:
        """``scale * A @ B`` of one slot, in the shape of the kernel."""
        return self._delta(*self.factors(slot))

    def g_of(self, slot) -> tf.Tensor:
        """The output scale of ``slot`` (ones for plain LoRA)."""
        return tf.gather(self.g_rows, tf.gather(self.g_index, slot))

    def bias_of(self, slot) -> tf.Tensor | None:
        """The bias of ``slot`` (the base bias unless its adapter brought one)."""
        if self.bias_rows is None:
            return None
        return tf.gather(self.bias_rows, tf.gather(self.bias_index, slot))

    # ---- forward ----------------------------------------------------------------

    # It branches in Python on static facts only (shapes, the routing) and
    # with tf.while_loop on tensors: autograph has nothing to convert here,
    # and converting this code made building a pool slower.
    @tf.autograph.experimental.do_not_convert
    def __call__(self, layer, x):
        routing = self.routing.current()
        if routing is None:
            return None
        if routing is BASE_ONLY:
            return self._flat(
                x, lambda rows: self._with_bias(layer.base_op(rows, layer.kernel), layer.bias)
            )
        if routing.shape.rank == 0:
            return self.uniform(x, routing)
        outputs = self.mixed(x, routing)
        if not layer.use_bias:
            return outputs
        return outputs + per_sample(tf.cast(self.bias_of(routing), x.dtype), outputs)

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
        return (
            self._rows(x) * (self.fan_in + 2 * self.out_dim) * samples
            >= 2 * self.fan_in * self.out_dim
        )

    def uniform(self, x, slot):
        """Output (bias included, activation not) when every sample uses ``slot``,
        whose adapter has no output scale in any layer."""
        kernel_path = self._prefers_kernel(x, _static_batch(x))
        return self._flat(x, lambda rows: self._uniform(rows, slot, kernel_path))

    def _flat(self, x, compute):
        """``compute`` on a Dense layer's input as rows ``[n, in]``: its matmul, bias
        and any add are then adjacent, which grappler's remapper fuses into one
        oneDNN matmul (a tensordot's reshapes sit between them)."""
        if not self.is_dense or x.shape.rank == 2:
            return compute(x)
        y = compute(tf.reshape(x, [-1, self.a_shape[0]]))
        y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [-1]], 0))
        y.set_shape(x.shape[:-1].concatenate([self.out_dim]))
        return y

    def _uniform(self, x, slot, kernel_path: bool):
        # No output scale: the pool sends batches for adapters with one (DoRA)
        # through the mixed graph. Plain LoRA, the common case, so skips a
        # multiply by ones (an output-sized pass) and the bias follows the base
        # op, where grappler fuses them; a tf.cond per layer that chose at run
        # time made tracing a pool seconds slower.
        layer, bias = self.layer, self.bias_of(slot)
        if kernel_path:
            kernel = layer.kernel + tf.cast(self.delta(slot), x.dtype)
            return self._with_bias(layer.base_op(x, kernel), bias)
        return self._with_bias(layer.base_op(x, layer.kernel), bias) + self.uniform_update(x, slot)

    def mixed(self, x, slot_ids):
        """Pre-bias output, each sample with its own slot."""
        layer = self.layer
        g = tf.cast(self.g_of(slot_ids), x.dtype)
        if not self.is_dense:
            base = layer.base_op(x, layer.kernel)
            outputs = grouped_by_slot(x, slot_ids, self.uniform_update, base)
            return outputs * per_sample(g, outputs)
        # Each sample's pages up to the batch's largest rank; the zero page pads the rest.
        rank = tf.reduce_max(tf.gather(self.ranks, slot_ids))
        ids = tf.gather(self.page_table, slot_ids)[:, :rank]
        a = tf.cast(tf.gather(self.a_pages, ids), x.dtype)  # [batch, rank, in]
        b = tf.cast(tf.gather(self.b_pages, ids), x.dtype)  # [batch, rank, out]
        # self.a_shape[0] is static even where x.shape[-1] is not (ViT attention).
        rows = tf.reshape(x, [tf.shape(x)[0], -1, self.a_shape[0]])
        if self._prefers_kernel(x, 1):
            # Early, wide layers: each sample's own updated kernel, one batched matmul
            # in place of the base matmul.
            kernels = (layer.kernel[None] + tf.matmul(a, b, transpose_a=True)) * g[:, None]
            y = tf.matmul(rows, kernels)
        else:
            update = tf.matmul(tf.matmul(rows, a, transpose_b=True), b)
            y = (matmul_last_axis(rows, layer.kernel) + update) * g[:, None]
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.out_dim]], 0))

    def uniform_update(self, x, slot):
        """The LoRA update alone (no base) for samples that all use ``slot``."""
        # A convolution refuses an empty filter: rank 0 ("off") runs the zero page.
        a, b = self.factors(slot, least=0 if self.is_dense else 1)
        a, b = tf.cast(a, x.dtype), tf.cast(b, x.dtype)
        if self.is_dense:
            # (A x^T)^T B: both matmuls read the pages as stored; x @ A^T then
            # @ B (a transposed page operand) ran 1.2% slower on convnext_tiny's
            # batch 1 (benchmarks/README.md), with the same outputs.
            return tf.matmul(tf.matmul(a, x, transpose_b=True), b, transpose_a=True)
        kernel = tf.transpose(a, [1, 2, 3, 0])  # pages [r, kh, kw, in] -> [kh, kw, in, r]
        return matmul_last_axis(self.layer.base_op(x, kernel), b)
