"""Read-only objects of the unpickler and inert stand-ins for the classes a pickle names.

A pickle names classes and functions by ``module.name``; the readers never import
them. Everything outside their whitelist becomes an `InertObject` subclass (one per
global, cached) that only records what the pickle does with it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Frozen", "InertObject", "inert_class", "short_repr"]


# --------------------------------------------------------------------------- read-only helpers
class Frozen:
    """No attribute can be set or deleted after construction (pickle's BUILD opcode
    sets attributes on whatever object is on its stack; these objects refuse)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} objects are read-only")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} objects are read-only")


class _InertMeta(type):
    """Stand-in classes are cached per global and shared between loads: read-only."""

    def __setattr__(cls, name, value):
        raise AttributeError("inert stand-in classes are read-only")

    def __delattr__(cls, name):
        raise AttributeError("inert stand-in classes are read-only")


# --------------------------------------------------------------------------- inert stand-ins
class InertObject(metaclass=_InertMeta):
    """Stand-in for an object of a class that the pickle names but that is never imported.

    Each pickled global ``module.name`` outside the whitelist becomes a subclass of
    `InertObject` (see `inert_class`). Using it the way a pickle uses a class only
    records data:

    * calling the class (REDUCE, NEWOBJ, INST/OBJ) returns an instance that keeps the
      arguments (`pickle_args`, `pickle_kwargs`);
    * ``__setstate__`` (BUILD) keeps the state (`pickle_state`);
    * ``append``/``extend``/``__setitem__`` (APPENDS/SETITEMS of list or dict
      subclasses) keep the items (`pickle_items`, `pickle_dict_items`);
    * calling an instance returns another inert instance (class ``<call>.result``).

    Attribute access falls back to the recorded fields (`pickle_fields`), so a pickled
    config reads naturally: ``ckpt["hyper_parameters"].backbone``.
    """

    _pickle_module: str = "<unknown>"
    _pickle_name: str = "<unknown>"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        d = self.__dict__
        d["_pickle_args"] = args
        d["_pickle_kwargs"] = kwargs
        d["_pickle_state"] = None
        d["_pickle_items"] = []
        d["_pickle_dict_items"] = {}
        return self

    def __init__(self, *args, **kwargs):  # the arguments were recorded by __new__
        pass

    # -- what the unpickler calls
    def __setstate__(self, state):
        self.__dict__["_pickle_state"] = state

    def append(self, item):
        self.__dict__["_pickle_items"].append(item)

    def extend(self, items):
        self.__dict__["_pickle_items"].extend(list(items))

    def __setitem__(self, key, value):
        self.__dict__["_pickle_dict_items"][key] = value

    def __call__(self, *args, **kwargs):
        return inert_class("<call>", "result")(self, *args, **kwargs)

    # -- inspection
    @property
    def pickle_global(self) -> str:
        """``"module.name"`` of the global this object stands in for."""
        return f"{type(self)._pickle_module}.{type(self)._pickle_name}"

    @property
    def pickle_args(self) -> tuple:
        return self.__dict__["_pickle_args"]

    @property
    def pickle_kwargs(self) -> dict:
        return self.__dict__["_pickle_kwargs"]

    @property
    def pickle_state(self) -> Any:
        return self.__dict__["_pickle_state"]

    @property
    def pickle_items(self) -> list:
        return self.__dict__["_pickle_items"]

    @property
    def pickle_dict_items(self) -> dict:
        return self.__dict__["_pickle_dict_items"]

    @property
    def pickle_fields(self) -> dict:
        """The object's attributes as pickled: its state dict, with pydantic's
        ``{"__dict__": ...}`` wrapping and ``(dict, slots)`` state tuples unpacked."""
        state = self.__dict__.get("_pickle_state")
        if isinstance(state, tuple) and len(state) == 2 and all(
            s is None or isinstance(s, dict) for s in state
        ):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            return {}
        inner = state.get("__dict__")
        if isinstance(inner, dict):
            return inner
        return state

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        fields = self.pickle_fields
        if name in fields:
            return fields[name]
        raise AttributeError(f"inert stand-in for {self.pickle_global} has no recorded field {name!r}")

    def __getitem__(self, key):
        return self.__dict__["_pickle_dict_items"][key]

    def __reduce__(self):
        d = self.__dict__
        return (
            _restore_inert,
            (
                type(self)._pickle_module,
                type(self)._pickle_name,
                d["_pickle_args"],
                d["_pickle_kwargs"],
                d["_pickle_state"],
                d["_pickle_items"],
                d["_pickle_dict_items"],
            ),
        )

    def __repr__(self):
        parts = []
        if self.pickle_args:
            parts.append("args=" + short_repr(self.pickle_args))
        if self.pickle_kwargs:
            parts.append("kwargs=" + short_repr(self.pickle_kwargs))
        if self.pickle_state is not None:
            parts.append("state=" + short_repr(self.pickle_state))
        if self.pickle_items:
            parts.append(f"items=<{len(self.pickle_items)}>")
        if self.pickle_dict_items:
            parts.append(f"dict_items=<{len(self.pickle_dict_items)}>")
        return f"<inert {self.pickle_global}({', '.join(parts)})>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}


def inert_class(module: str, name: str) -> type:
    """The (cached) `InertObject` subclass standing in for the global ``module.name``."""
    key = (str(module), str(name))
    cls = _INERT_CLASSES.get(key)
    if cls is None:
        clsname = "".join(c if c.isalnum() or c == "_" else "_" for c in key[1]) or "_"
        cls = _InertMeta(
            clsname,
            (InertObject,),
            {
                "_pickle_module": key[0],
                "_pickle_name": key[1],
                "__module__": __name__,
                "__qualname__": clsname,
            },
        )
        _INERT_CLASSES[key] = cls
    return cls


def _restore_inert(module, name, args, kwargs, state, items, dict_items):
    obj = inert_class(module, name).__new__(inert_class(module, name), *args, **kwargs)
    obj.__dict__.update(
        _pickle_state=state, _pickle_items=list(items), _pickle_dict_items=dict(dict_items)
    )
    return obj


def short_repr(obj, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."
