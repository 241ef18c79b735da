"""Read a gradshard store from Python.

>>> import gradshard
>>> s = gradshard.open("gradshard-demo/store")
>>> s.tasks, s.geometry["layers"]
>>> g = s.slice("math", 3, layer=1, block="Q", head=2)        # numpy float32 (d, D)
>>> t = s.tile("math", layer=1, block="O", head=0)             # (n, d, D), parallel decode
>>> w = s.tensor("math", 3, "model.layers.1.self_attn.k_proj.weight")   # HF shape
>>> s.slice("math", 3, 1, "Q", 2, dtype="bf16")                # torch.bfloat16 via DLPack

Every read verifies the frame checksums; a damaged or missing file raises
:class:`StoreError` with the message the ``gradshard`` CLI prints. See
docs/python.md in the repository for the guide.
"""

from __future__ import annotations

import os
from typing import Union

from ._native import Bf16Array, StoreError, _Store, __version__, bf16_dlpack
from ._writer import Writer, create

__all__ = [
    "open",
    "create",
    "Writer",
    "Store",
    "StoreError",
    "Bf16Array",
    "bf16_dlpack",
    "INDEX_FIELDS",
    "index_schema",
    "__version__",
]

#: The fields of :meth:`Store.index` (schemas/store/index.arrow.json): name, Arrow type, nullable.
INDEX_FIELDS = [
    ("task", "string", False),
    ("sample_id", "string", False),
    ("sample_id_kind", "string", False),
    ("tokens", "int64", False),
    ("frame", "int32", False),
    ("kind", "string", False),
    ("layer", "int32", True),
    ("block", "string", True),
    ("head", "int32", True),
    ("tensor", "string", True),
    ("row_start", "int32", True),
    ("row_end", "int32", True),
    ("shard", "int32", False),
    ("offset", "int64", False),
    ("length", "int64", False),
    ("raw_length", "int64", False),
    ("checksum", "string", False),
    ("frame_kind", "string", False),
    ("shared_factor", "int32", True),
]


def index_schema():
    """The pyarrow schema of :meth:`Store.index`."""
    import pyarrow as pa

    return pa.schema(
        [pa.field(n, getattr(pa, t)(), nullable=null) for n, t, null in INDEX_FIELDS]
    )


class Store(_Store):
    """An open store (read-only); see :func:`open`.

    Attributes: ``path``, ``tasks`` (sorted names), ``geometry`` (dict: model_type,
    layers, heads, kv_heads, head_dim, hidden, layout, root), ``dtype`` ("bf16" or
    "f32", as stored), ``blocks``, ``tensors`` (the Hugging Face names ``tensor()``
    rebuilds), ``format_version``.

    Methods: ``samples(task)``, ``slice(task, id, layer, block, head)``,
    ``tile(task, layer, block, head, ids=None)``, ``tensor(task, id, name)``,
    ``factors(task, id, layer, block, head)``, ``representation(task, id)``,
    ``index()``, ``refresh()``, ``verify()`` (the checks of ``gradshard verify``,
    ``stats/`` included, as a dict with ``ok``, ``problems`` and ``warnings``). Array methods take ``dtype="f32"`` (numpy float32,
    the default) or ``dtype="bf16"`` (a torch.bfloat16 tensor through DLPack, rounded
    to nearest even; needs torch).

    A store stays usable from several threads; reads release the GIL.
    """

    def index(self):
        """The index as a ``pyarrow.Table``: one row per frame of every committed
        sample, shared factors of factored samples included (``frame_kind``: "full",
        "factor" or "shared"; ``length`` sums to the frame bytes on disk), with the schema of ``schemas/store/index.arrow.json`` (the table
        ``gradshard inspect --index-parquet`` writes)."""
        import pyarrow as pa

        cols = self._index_columns()
        arrays = []
        for name, t, _ in INDEX_FIELDS:
            c = cols[name]
            if isinstance(c, tuple):
                values, mask = c
                arrays.append(pa.array(values, type=getattr(pa, t)(), mask=mask))
            else:
                arrays.append(pa.array(c, type=pa.string()))
        return pa.Table.from_arrays(arrays, schema=index_schema())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def open(path: Union[str, "os.PathLike[str]"]) -> Store:  # noqa: A001 - the module's verb
    """Opens the store at ``path`` read-only.

    Any number of readers may open a store, also while a writer (``collect``,
    ``ingest``, ``synth``) is adding samples: a reader sees the samples committed when
    it opened; ``Store.refresh()`` picks up later ones. Raises :class:`StoreError`
    when the directory is not a readable store.
    """
    return Store(os.fspath(path))
