"""Writing a store from Python: :func:`create` and :class:`Writer`.

The store crate does the work (the Rust extension's ``_Writer``): every sample
goes through the same per-sample sink as ``gradshard collect`` (NaN/inf check,
head slices and MLP row groups, Σ g²/T statistics and Welford ``stats/``, the
``full | factored | auto`` choice, the bounded writer pipeline, crash safety and
resume). This module only turns numpy arrays and torch tensors (on any device)
into float32 host arrays, once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np

from ._native import _Writer

__all__ = ["create", "Writer", "PARAMS"]

#: The parameter sets a store can hold.
PARAMS = ("attn", "attn,mlp")

_FLOAT_TORCH = ("torch.float32", "torch.bfloat16", "torch.float16", "torch.float64")


def _config_text(config: Union[Mapping[str, Any], str, "os.PathLike[str]"]) -> str:
    if isinstance(config, Mapping):
        return json.dumps(dict(config), default=str)
    p = Path(os.fspath(config))
    if p.is_dir():
        p = p / "config.json"
    try:
        return p.read_text()
    except OSError as e:
        raise ValueError(f"config: cannot read {p}: {e}") from e


def _params(params: str) -> str:
    parts = sorted(x.strip() for x in str(params).split(","))
    if parts == ["attn"]:
        return "attn"
    if parts == ["attn", "mlp"]:
        return "attn,mlp"
    raise ValueError(f"params {params!r}: use \"attn\" or \"attn,mlp\"")


def _host(x: Any, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array: a torch tensor (any device, any
    floating dtype) is converted on its device and copied to the host once."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.float32:
            return np.ascontiguousarray(x)
        if x.dtype in (np.float64, np.float16):
            return np.ascontiguousarray(x, dtype=np.float32)
        raise ValueError(f"{what}: dtype {x.dtype} is not a floating-point dtype")
    mod = type(x).__module__
    if mod.startswith("torch"):
        if str(x.dtype) not in _FLOAT_TORCH:
            raise ValueError(f"{what}: dtype {x.dtype} is not a floating-point dtype")
        import torch

        t = x.detach()
        if t.dtype != torch.float32:
            t = t.float()
        return t.contiguous().cpu().numpy()
    raise ValueError(
        f"{what}: expected a numpy array or a torch tensor, got {type(x).__name__}"
    )


class Writer:
    """An open store writer; see :func:`create`. Use it as a context manager (or
    call :meth:`close`): closing waits for every sample to commit, seals the shards
    and rebuilds ``stats/``.

    Attributes: ``path``, ``dtype``, ``representation``, ``tensors`` (every tensor
    a sample must give: ``(name, [rows, cols], "linear" | "conv1d", is_attention)``).
    Calls are thread-safe and release the GIL while the store works, so a thread may
    feed the writer while another computes the next batch.
    """

    def __init__(self, native: _Writer):
        self._w = native
        self.report: Optional[Dict[str, Any]] = None

    @property
    def path(self) -> Path:
        return Path(self._w.path)

    @property
    def dtype(self) -> str:
        return self._w.dtype

    @property
    def representation(self) -> str:
        return self._w.representation

    @property
    def tensors(self):
        return self._w.tensors

    @property
    def closed(self) -> bool:
        return self._w.closed

    def add(self, task: str, sample_id, grads: Mapping[str, Any], tokens: int, loss_sum: float) -> bool:
        """Stores one sample from its gradients ``{hf_name: array}``, each in the
        checkpoint's own shape and orientation (the gradient of the token-summed
        loss; ``tokens`` = T, the predicted positions; ``loss_sum`` in nats).
        Returns False only when the sample was left out (``nan_policy="skip"``).
        Raises ValueError naming the task, sample and tensor for a wrong name,
        shape or dtype, a missing tensor, NaN/inf, ``tokens < 1`` or a duplicate id;
        nothing of that sample is stored."""
        if not isinstance(grads, Mapping):
            raise ValueError(f"task `{task}` sample {sample_id}: grads must be a dict name -> array")
        host = {
            k: _host(v, f"task `{task}` sample {sample_id}: tensor `{k}`") for k, v in grads.items()
        }
        return self._w.add(task, sample_id, host, int(tokens), float(loss_sum))

    def add_factors(
        self,
        task: str,
        sample_id,
        factors: Mapping[str, Tuple[Any, Any]],
        tokens: int,
        loss_sum: float,
    ) -> bool:
        """Stores one sample from per-tensor factors ``{hf_name: (backprop,
        activation)}``: backprop ``[n, out]`` (the gradient of the token-summed loss
        with respect to the layer's output) and activation ``[n, in]`` (its input),
        over the sample's n positions. The gradient is backpropᵀ @ activation for an
        ``nn.Linear`` weight ``[out, in]`` and activationᵀ @ backprop for GPT-2's
        ``Conv1D`` ``[in, out]``. The store cuts them into per-head and shared
        factors (or, with ``representation="full"``, or ``"auto"`` where that is
        smaller, multiplies them out). Errors as :meth:`add`."""
        if not isinstance(factors, Mapping):
            raise ValueError(
                f"task `{task}` sample {sample_id}: factors must be a dict name -> (backprop, activation)"
            )
        host = {}
        for k, v in factors.items():
            at = f"task `{task}` sample {sample_id}: tensor `{k}`"
            if not isinstance(v, (tuple, list)) or len(v) != 2:
                raise ValueError(f"{at}: expected a (backprop, activation) pair")
            host[k] = (_host(v[0], at + " backprop"), _host(v[1], at + " activation"))
        return self._w.add_factors(task, sample_id, host, int(tokens), float(loss_sum))

    def committed(self, task: str) -> list:
        """Ids of ``task`` already in the store (or handed to this writer): what a
        resumed run skips."""
        return self._w.committed(task)

    def is_committed(self, task: str, sample_id) -> bool:
        return self._w.is_committed(task, sample_id)

    def close(self) -> Dict[str, Any]:
        """Commits everything handed over, seals the shards, rebuilds ``stats/`` and
        returns the writer's report (also kept as ``self.report``)."""
        self.report = self._w.close()
        return self.report

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._w.closed:
            return False
        if exc is None:
            self.close()
            return False
        # Samples handed over in full still commit; the body's error is what the
        # caller sees, with the writer's own failure (if any) attached.
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - reported on the body's error
            if hasattr(exc, "add_note"):
                exc.add_note(f"closing the store writer also failed: {e}")
        return False


def create(
    path: Union[str, "os.PathLike[str]"],
    config: Union[Mapping[str, Any], str, "os.PathLike[str]"],
    dtype: str = "bf16",
    representation: str = "auto",
    params: str = "attn",
    mlp: Optional[Mapping[str, Iterable[int]]] = None,
    names: Optional[Iterable[str]] = None,
    nan_policy: str = "error",
    memory_budget: Optional[int] = None,
    source: Optional[Mapping[str, Any]] = None,
) -> Writer:
    """Opens the store at ``path`` for writing, creating it if needed.

    ``config``: the model's Hugging Face config (``model.config.to_dict()``), or the
    path of its ``config.json`` (or of the folder holding it). ``dtype``: ``"bf16"``
    or ``"f32"`` values on disk. ``representation``: ``"auto"`` (per sample, the
    smaller of full slices and factors), ``"full"`` or ``"factored"``. ``params``:
    ``"attn"`` (the attention projections) or ``"attn,mlp"``; with ``"attn,mlp"``,
    ``mlp`` names the MLP weights and their checkpoint shapes
    (``gradshard.torch.mlp_tensors(model)`` gives them). ``names``: the model's
    parameter names, to find the layers' name prefix when the config alone does not
    say it. An existing store must match (geometry, dtype, tensors); its committed
    samples stay, and :meth:`Writer.committed` lists them for a resumed run.

    Only one writer may have a store open (a ``LOCK`` file): a second raises
    :class:`gradshard.StoreError`.
    """
    p = _params(params)
    others = None
    if p == "attn,mlp":
        if not mlp:
            raise ValueError(
                'params="attn,mlp" needs mlp={name: shape} of the MLP weights '
                "(gradshard.torch.mlp_tensors(model) lists them)"
            )
        others = [(str(k), [int(x) for x in v]) for k, v in mlp.items()]
    elif mlp:
        raise ValueError('mlp= is given but params="attn": use params="attn,mlp"')
    w = _Writer(
        os.fspath(path),
        _config_text(config),
        dtype=dtype,
        representation=representation,
        names=list(names) if names is not None else None,
        others=others,
        nan_policy=nan_policy,
        memory_budget=memory_budget,
        source_json=json.dumps(dict(source)) if source is not None else None,
    )
    return Writer(w)
