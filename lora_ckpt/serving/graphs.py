"""The compiled forward passes of one adapter pool.

A pool serves through four traced forward passes, one per kind of request,
each traced once, never again: the three with slots when the pool is built
(the warm-up), the base graph (merged adapters) at the first merge. The only
input besides the batch is the slot ids, so loading, evicting and switching
adapters change tensor values, not graphs (the page stacks that grow as
adapters load have an unknown leading dimension in the graphs). Batch 1 has
its own graph so each layer can choose its cheapest path for it. The
single-adapter graphs leave out output scales (no multiply by ones for plain
LoRA); batches for an adapter with output scales (DoRA) run the mixed graph,
which applies each sample's. The slot write is :mod:`~.slot_writer`'s.
"""

import threading

import numpy as np

from .._tf import tf
from ..errors import LoRAConfigError
from .routing import BASE_ONLY, Routing

__all__ = ["ServingGraphs"]


class ServingGraphs:
    """The traced forward passes of one pool's model.

    Args:
        model: The pool's LoRA model, its layers already given their slots.
        routing: The pool's routing (the slot ids reach the layers through it).

    Attributes:
        input_shape: One sample's shape (no batch axis).
        dtype: The dtype of inputs: the model's variables' dtype, also under
            mixed precision.
        output_width: The width of the model's output.
        trace_count: How many times a forward pass with slots was traced: 3
            after construction, and it stays 3.
    """

    def __init__(self, model: tf.keras.Model, routing: Routing):
        self.model = model
        self.routing = routing
        self.trace_count = 0
        sample = getattr(model, "dummy_inputs", None)
        shape = tuple(sample.shape[1:]) if sample is not None else tuple(model.input_shape[1:])
        self.input_shape = shape
        self.dtype = model.dtype or "float32"
        batch, single = (
            tf.TensorSpec([None, *shape], self.dtype),
            tf.TensorSpec([1, *shape], self.dtype),
        )
        scalar, vector = tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32)
        self._one = tf.function(self._serve, input_signature=[batch, scalar])
        self._single = tf.function(self._serve, input_signature=[single, scalar])
        self._mixed = tf.function(self._serve, input_signature=[batch, vector])
        self._base = tf.function(self._serve_base, input_signature=[batch])
        self._lock = threading.Lock()  # the base graph is traced once, at the first merge
        # The warm-up: every slot graph traced now, not by a first request.
        zeros = np.zeros([1, *shape], self.dtype)
        self.output_width = int(self._one(zeros, tf.constant(0)).shape[-1])
        self._single(zeros, tf.constant(0))
        self._mixed(zeros, tf.zeros([1], tf.int32))
        # Requests call the traced graphs directly: a tf.function would first
        # hash its inputs and every captured variable (hundreds) to find one.
        # The base graph is traced when first needed (a merge): most pools never are.
        self._calls = {
            name: getattr(self, name).get_concrete_function()
            for name in ("_one", "_single", "_mixed")
        }

    def _serve(self, x, slot_ids):
        self.trace_count += 1  # runs only while tracing
        with self.routing.route(slot_ids):
            return self.model(x, training=False)

    def _concrete(self, name: str):
        """The traced graph ``name``, tracing it the first time."""
        call = self._calls.get(name)
        if call is None:
            with self._lock:
                call = self._calls.get(name)
                if call is None:
                    call = self._calls[name] = getattr(self, name).get_concrete_function()
        return call

    def _serve_base(self, x):
        with self.routing.route(BASE_ONLY):
            return self.model(x, training=False)

    def check_batch(self, x) -> np.ndarray:
        """The input as an array the graphs take.

        Args:
            x: A batch ``[n, *input_shape]`` of finite numbers.

        Returns:
            ``x`` as a numpy array of :attr:`dtype`.

        Raises:
            LoRAConfigError: For anything else (with what was expected).
        """
        try:
            x = np.asarray(x, dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            raise LoRAConfigError(f"The input is not an array of numbers: {exc}.") from exc
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise LoRAConfigError(
                f"Expected a batch of shape [n, {', '.join(map(str, self.input_shape))}], "
                f"got {list(x.shape)}."
            )
        if len(x) == 0:
            raise LoRAConfigError("The batch is empty; send at least one sample.")
        if not np.isfinite(x).all():
            raise LoRAConfigError("The input holds NaN or infinite values.")
        return x

    def forward(
        self, x: np.ndarray, slot_ids: np.ndarray, merged: bool, scaled: bool = False
    ) -> tf.Tensor:
        """Runs the graph for one request.

        Args:
            x: A batch checked by :meth:`check_batch`.
            slot_ids: One slot per sample (int32).
            merged: Whether the adapter of every sample is merged into the
                base kernels: the plain base graph then serves it.
            scaled: Whether some sample's adapter has output scales (DoRA):
                the mixed graph serves the batch, as the single-adapter graphs
                leave them out.

        Returns:
            The model's outputs.
        """
        if merged:
            return self._concrete("_base")(x)
        if scaled or np.any(slot_ids != slot_ids[0]):
            return self._concrete("_mixed")(x, slot_ids)
        return self._concrete("_single" if len(x) == 1 else "_one")(x, slot_ids[0])
