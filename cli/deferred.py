"""Modules that importing grpc and the protos loads and a blocking CLI command never reads: run on first use.

`import grpc` costs a quick command (cli/quick.py: `dstack ps`, `logs`, `show`, `agents`) most of its CPU, and
a good part of that is modules it imports only to bind a name: grpc's `__init__` ends with `from grpc import
aio` (the asyncio API), its Cython core imports asyncio, inspect, socket and pkgutil, and protobuf's pure-Python
message code (unused under its C implementation, upb) imports text_format and pickle. None of them is read while a
blocking channel is made and called (tests/unit/test_cli_deferred.py checks a real `dstack ps`). Deferring them
takes ~40 ms of CPU off a `dstack ps` of ~130 (bench/ps_deep_queue.py).

defer() puts a stand-in module under each name before grpc is imported. An import statement binds the
stand-in and runs nothing (it reads only `__spec__`, which the stand-in holds). The first read of any other
attribute (`asyncio.get_event_loop`, `aio.insecure_channel`, a submodule import asking for `__path__`) runs the
module's code in the stand-in itself, which so becomes the real module: every holder sees the same object,
before and after. So code that does use one of them (a tunnel, a test) works as usual, only without the saving.

This is what importlib.util.LazyLoader does, except that its module loads on any attribute read, `__spec__`
included, and the import statement itself reads that: a LazyLoader module loads at once.
"""

from __future__ import annotations

import sys
import threading
import types
from importlib.machinery import ModuleSpec, PathFinder

# Imported by grpc (and its Cython core) and protobuf at import time, read by none of them on a blocking call.
UNUSED_BY_BLOCKING_GRPC = (
    "asyncio",
    "grpc.aio",
    "inspect",
    "socket",
    "pkgutil",
    "pickle",
    "google.protobuf.text_format",
    # protobuf's pure-Python message classes (with their codecs and well-known-type mixins): imported by its
    # descriptor pool and builder for the python implementation, unused under upb.
    "google.protobuf.internal.python_message",
    # logging's, for formatting an exception: a blocking call logs none.
    "traceback",
)

_locks: dict[str, threading.RLock] = {}
_loading: set[str] = set()


class DeferredModule(types.ModuleType):
    """A module whose code runs, in place, on the first read of an attribute it does not hold yet."""

    def __getattr__(self, attr: str) -> object:
        name = self.__name__
        # Another thread waits here for the load to end, as it would at an import of the module.
        with _locks[name]:
            if type(self) is DeferredModule and name not in _loading:
                _load(self)
        if type(self) is DeferredModule:
            # Read while its code runs, by that code (`from . import events` in a submodule): what is
            # defined so far, as in any import.
            raise AttributeError(f"partially initialized module {name!r} has no attribute {attr!r}")
        return getattr(self, attr)


def _load(module: types.ModuleType) -> None:
    spec = module.__spec__
    assert spec is not None and spec.loader is not None
    if spec.submodule_search_locations is not None:
        module.__path__ = spec.submodule_search_locations
    before = dict(module.__dict__)
    _loading.add(spec.name)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        # What a failed import leaves: no module under the name. The stand-in forgets what the code defined
        # before it failed, so the next read runs it again rather than find half a module.
        sys.modules.pop(spec.name, None)
        module.__dict__.clear()
        module.__dict__.update(before)
        raise
    finally:
        _loading.discard(spec.name)
    module.__class__ = types.ModuleType  # a plain module from now on: no more lookups through __getattr__


def _find_spec(name: str) -> ModuleSpec | None:
    """`name`'s spec from the path, without importing it or (for a submodule) running its package's code."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        return PathFinder.find_spec(name)
    parent_spec = _find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    return PathFinder.find_spec(name, parent_spec.submodule_search_locations)


def defer(names: tuple[str, ...] = UNUSED_BY_BLOCKING_GRPC) -> list[str]:
    """A stand-in under each of `names` not imported yet (nor its package); returns the names deferred.

    A name whose module or package is already imported is left alone (it costs nothing more), and so is one
    the path finder does not find (a frozen or zipped install, say): it is imported as usual."""
    deferred = []
    for name in names:
        parent = name.rpartition(".")[0]
        if name in sys.modules or (parent and parent in sys.modules):
            continue
        spec = _find_spec(name)
        if spec is None or spec.loader is None:
            continue
        # The attributes importlib.util.module_from_spec sets (importing importlib.util costs ~1.5 ms that
        # nothing else on a quick command's path pays) but __path__: without it, importing a submodule reads it
        # through __getattr__, so that the package's own code runs first, as it would have.
        module = DeferredModule(name)
        module.__dict__.update(__spec__=spec, __loader__=spec.loader, __package__=spec.parent)
        if spec.has_location:
            module.__dict__.update(__file__=spec.origin, __cached__=spec.cached)
        _locks[name] = threading.RLock()
        sys.modules[name] = module
        deferred.append(name)
    return deferred
