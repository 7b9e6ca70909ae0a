"""Safe, torch-free decoding of pickled PyG `Data` objects (JMP/OCP LMDB values).

What ``pickle.dumps(torch_geometric.data.Data(...))`` contains (checked with
torch 2.13 / PyG 2.8 and the PyG-1.x layout):

* the `Data` object: ``torch_geometric.data.data.Data`` created with NEWOBJ and
  filled with BUILD. PyG 2.x state: ``{"_store": GlobalStorage(state={"_mapping":
  {field: value}, "_parent": <the Data>}), "_edge_attr_cls": ..., "_tensor_attr_cls":
  ...}``; PyG 1.x state: the fields themselves (``{"pos": ..., "x": None, ...}``).
* each tensor: ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  requires_grad, OrderedDict())``, where the storage is
  ``torch.storage._load_from_bytes(b)`` and ``b`` is a complete legacy ``torch.save``
  stream of that one storage (`jmp_jax.torchfile.legacy`).
* scalars (``y``, ``sid``, ``natoms``...) are plain Python objects.

Unpickling is `jmp_jax.torchfile.loads` (files: `jmp_jax.torchfile.load_torch_file`):
nothing in the data is imported or executed, and every PyG class becomes an inert
stand-in that only records its state. `pyg_fields` turns a decoded `Data` (either PyG
generation) or a plain dict into ``{field: value}`` with tensors as numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jmp_jax.torchfile import InertObject, PickleDecodeError, UnsupportedTensor

__all__ = ["describe", "pyg_fields"]


# --------------------------------------------------------------------------- PyG Data -> fields
_PYG_DATA_NAMES = {"Data"}


def pyg_fields(obj: Any) -> dict[str, Any]:
    """``{field: value}`` of a decoded PyG `Data` (2.x ``_store`` or 1.x ``__dict__``) or dict.

    PyG 1.x objects keep their non-None, non-underscore attributes (what JMP's
    ``pyg2_data_transform`` passes to a new `Data`). Raises `PickleDecodeError` for
    anything else (HeteroData, Batch, foreign classes).
    """
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, InertObject):
        module, _, name = obj.pickle_global.rpartition(".")
        if module.startswith("torch_geometric") and name in _PYG_DATA_NAMES:
            state = obj.pickle_fields
            store = state.get("_store")
            if store is not None:
                if not isinstance(store, InertObject):
                    raise PickleDecodeError(f"PyG Data with an unexpected _store {type(store).__name__}")
                mapping = store.pickle_fields.get("_mapping")
                if not isinstance(mapping, dict):
                    raise PickleDecodeError("PyG Data store without a _mapping dict")
                return dict(mapping)
            return {k: v for k, v in state.items() if v is not None and not str(k).startswith("_")}
        raise PickleDecodeError(f"expected a torch_geometric Data object, found {obj.pickle_global}")
    raise PickleDecodeError(f"expected a torch_geometric Data object, found {type(obj).__name__}")


def describe(value: Any) -> str:
    """Short description of a decoded value for error messages."""
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{list(value.shape)}"
    if isinstance(value, UnsupportedTensor):
        return repr(value)
    if isinstance(value, InertObject):
        return f"<{value.pickle_global}>"
    return type(value).__name__
