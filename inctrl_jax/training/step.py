"""The head training step, its optimiser and its data-parallel sharding.

One step scores a batch of queries against their own references with
:func:`inctrl_jax.model.scoring.score_queries` in train mode (BatchNorm on batch statistics over
the whole global batch), takes the focal loss of :mod:`inctrl_jax.training.losses` and applies one
AdamW update to the head parameters. The backbone is not part of the step: its features come from
the frozen-feature cache.

Parallelism is declared, not hand-written: a 1-D ``Mesh`` over devices with axis ``"data"``; the
batch is sharded along its leading axis with ``NamedSharding(mesh, P("data"))`` and the train
state is replicated; ``jax.jit`` with explicit in/out shardings lets XLA insert the reductions
(BatchNorm statistics, loss mean, gradients) across devices. The step computes the same function
on 1 or N devices; only the order of floating-point reductions may differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from inctrl_jax.model.scoring import score_queries
from inctrl_jax.training.losses import LossKind, inctrl_loss

TrainState = dict[str, Any]
"""``{"step": int32 [], "params": ..., "batch_stats": ..., "opt_state": ...}``."""

BATCH_KEYS = (
    "query_tokens",
    "query_embeds",
    "reference_tokens",
    "reference_embeds",
    "text_prototypes",
    "labels",
)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on the head parameters (reference: lr 1e-3, betas 0.9/0.999, eps 1e-8, wd 0.01, constant)."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay ``lr * wd * p`` (same update as ``torch.optim.AdamW``).

    The heads here have no unused ``bn1`` (see :mod:`inctrl_jax.model.heads`), so every head
    parameter is trained and decayed; PyTorch skips the gradient-less ``bn1`` parameters, which
    therefore stay untouched in both implementations.
    """
    return optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def init_train_state(head_variables: dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
    params = head_variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": head_variables["batch_stats"],
        "opt_state": tx.init(params),
    }


def loss_and_outputs(
    params: Any,
    batch_stats: Any,
    batch: dict[str, jax.Array],
    *,
    loss_kind: LossKind,
    legacy_batch_scramble: bool,
    references_normalized: bool = True,
) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
    """Train-mode forward of the heads and the loss; returns ``(loss, (new_batch_stats, aux))``."""
    out = score_queries(
        {"params": params, "batch_stats": batch_stats},
        batch["query_tokens"],
        batch["query_embeds"],
        batch["reference_tokens"],
        batch["reference_embeds"],
        batch["text_prototypes"],
        train=True,
        references_normalized=references_normalized,
        legacy_batch_scramble=legacy_batch_scramble,
    )
    loss, terms = inctrl_loss(jnp.asarray(out.score), jnp.asarray(out.s_i), batch["labels"], loss_kind)
    aux: dict[str, jax.Array] = {
        **terms,
        "score": jnp.asarray(out.score),
        "s_i": jnp.asarray(out.s_i),
        "s_p": jnp.asarray(out.s_p),
        "s_a": jnp.asarray(out.s_a),
        "h": jnp.asarray(out.h),
        "residual_map": jnp.asarray(out.residual_map),
        "residual_map_plus": jnp.asarray(out.residual_map_plus),
        "image_residual": jnp.asarray(out.image_residual),
    }
    return loss, (out.batch_stats, aux)


def make_train_step(
    tx: optax.GradientTransformation,
    *,
    loss_kind: LossKind = "reference",
    legacy_batch_scramble: bool = False,
    references_normalized: bool = True,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the (un-jitted) step ``(state, batch) -> (state, metrics)``.

    ``metrics`` holds the scalar ``loss``, ``loss_score``, ``loss_s_i`` and the mean scores of the
    normal / anomalous queries; ``grads`` are not returned (see :func:`loss_and_outputs`).
    """

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(
            lambda p: loss_and_outputs(
                p,
                state["batch_stats"],
                batch,
                loss_kind=loss_kind,
                legacy_batch_scramble=legacy_batch_scramble,
                references_normalized=references_normalized,
            ),
            has_aux=True,
        )
        (loss, (batch_stats, aux)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        labels = batch["labels"].astype(aux["score"].dtype)
        n_anom = jnp.maximum(jnp.sum(labels), 1.0)
        n_norm = jnp.maximum(jnp.sum(1.0 - labels), 1.0)
        metrics = {
            "loss": loss,
            "loss_score": aux["loss_score"],
            "loss_s_i": aux["loss_s_i"],
            "score_normal": jnp.sum(aux["score"] * (1.0 - labels)) / n_norm,
            "score_anomalous": jnp.sum(aux["score"] * labels) / n_anom,
            "grad_norm": optax.global_norm(grads),
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        return new_state, metrics

    return step


def make_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D data-parallel mesh (axis ``"data"``) over the first ``num_devices`` devices (-1: all).

    In a multi-host run (after ``jax.distributed.initialize()``) ``jax.devices()`` lists the
    devices of every host, so -1 spans the whole slice.
    """
    devices = jax.devices()
    if num_devices == -1:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"config.mesh.num_devices={num_devices} but {len(devices)} devices are visible; use -1 for all"
        )
    return Mesh(np.asarray(devices[:num_devices]), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """``(replicated, batch)``: state everywhere, batch split along its leading axis."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def jit_train_step(step_fn, mesh: Mesh, state: TrainState):
    """Jits ``step_fn`` with explicit shardings: state replicated, batch sharded over ``"data"``."""
    replicated, batch_sharding = shardings(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    batch_shardings = dict.fromkeys(BATCH_KEYS, batch_sharding)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_shardings),
        out_shardings=(state_sharding, replicated),
    )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along the leading axis.

    Single process: the full global batch is split over the local devices. Multi-process: every
    process holds the same global batch (the sampler is a pure function of seed and step) and
    contributes the rows of its own devices via ``jax.make_array_from_process_local_data``.
    """
    _, batch_sharding = shardings(mesh)
    size = next(iter(batch.values())).shape[0]
    if size % mesh.devices.size:
        raise ValueError(
            f"the global batch of {size} queries does not split over {mesh.devices.size} devices: make "
            "config.train.batch_size a multiple of the device count (or set config.mesh.num_devices)"
        )
    if jax.process_count() == 1:
        # may_alias: on CPU an aligned host buffer is used in place; callers hand over fresh buffers.
        return {k: jax.device_put(v, batch_sharding, may_alias=True) for k, v in batch.items()}
    per_process = size // jax.process_count()
    lo = jax.process_index() * per_process
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, v[lo : lo + per_process], v.shape)
        for k, v in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    replicated, _ = shardings(mesh)
    return jax.device_put(tree, replicated)
