"""Every private torch symbol hyperfunc uses, in one place: one line per symbol, with what it is
used for and the public alternative where one exists.

A torch release that moves or removes one of them breaks this file only. A symbol that cannot be
found is bound to a stand-in that raises, when used, an ``ImportError`` naming the symbol and
what needs it, so that everything else in hyperfunc keeps working; ``tests/test__torch.py``
fails on such a stand-in with the same message. A private symbol is used only where no public
API serves (checked on torch 2.13: no public ``torch.utils.pytree`` module exists there, and
``torch.func`` exposes neither vmap levels nor fake-tensor tracing).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CompileWrapper",
    "DataDependentError",
    "FakeTensorMode",
    "InductorWrapper",
    "OpOverload",
    "ShapeEnv",
    "TorchDispatchMode",
    "TracingContext",
    "TransformType",
    "add_batch_dim",
    "allocates",
    "coerce_cinterpreter",
    "compiler_wrapper",
    "functorch_interpreters",
    "get_proxy_mode",
    "is_mutable_op",
    "is_wrapped",
    "keystr",
    "make_fx",
    "missing",
    "peek_interpreter_stack",
    "tracing",
    "tree_children",
    "tree_flatten",
    "tree_flatten_with_path",
    "tree_leaves",
    "tree_map",
    "tree_structure",
    "tree_unflatten",
    "under_vmap",
    "unwrap_batched",
    "vmap_sizes",
]


class _Missing:
    """What a symbol this torch lacks is bound to: every use raises an ``ImportError`` naming it."""

    def __init__(self, path: str, use: str, error: Exception):
        self.path, self.use, self.error = path, use, error

    def message(self) -> str:
        import torch

        return (
            f"hyperfunc needs {self.path} ({self.use}), which torch {torch.__version__} does not have "
            f"({self.error}); install a torch version that hyperfunc declares (pyproject.toml)"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(self.message())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(self.message())


#: ``{name in this module: _Missing}`` for every symbol this torch lacks (empty when all resolve).
missing: dict = {}


def _symbol(path: str, use: str) -> Any:
    """The object at ``path`` (``"module:attribute"``), or a :class:`_Missing` naming it and ``use``."""
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as err:
        return _Missing(path, use, err)


# -- pytrees: TensorDict registers its node type here; public torch.utils.pytree is absent in torch 2.13
tree_flatten = _symbol("torch.utils._pytree:tree_flatten", "flattening TensorDicts and batches")
tree_unflatten = _symbol("torch.utils._pytree:tree_unflatten", "rebuilding TensorDicts and batches")
tree_map = _symbol("torch.utils._pytree:tree_map", "mapping over TensorDicts and batches")
tree_leaves = _symbol("torch.utils._pytree:tree_leaves", "the tensors of a pytree")
tree_structure = _symbol("torch.utils._pytree:tree_structure", "one task's result structure (distributed)")
tree_flatten_with_path = _symbol("torch.utils._pytree:tree_flatten_with_path", "checkpoint keys (saving)")
keystr = _symbol("torch.utils._pytree:keystr", "checkpoint keys (saving)")
# -- traced graphs: public alternative none (torch.ops.aten.*.default are its instances)
OpOverload = _symbol("torch._ops:OpOverload", "recognising aten operators in traced graphs (hf.compile)")
# -- functorch levels: public alternative none (torch.func hides them); used by hf.compile, hf.vmap and batch norm
is_wrapped = _symbol("torch._C._functorch:is_functorch_wrapped_tensor", "telling a vmapped tensor from a plain one")
peek_interpreter_stack = _symbol("torch._C._functorch:peek_interpreter_stack", "the innermost torch.func transform")
TransformType = _symbol("torch._C._functorch:TransformType", "which transform that is (vmap, functionalize)")
unwrap_batched = _symbol("torch._C._functorch:_unwrap_batched", "a vmapped tensor's physical tensor (hf.vmap)")
add_batch_dim = _symbol("torch._C._functorch:_add_batch_dim", "wrapping a kernel's outputs back into vmap")
coerce_cinterpreter = _symbol("torch._functorch.pyfunctorch:coerce_cinterpreter", "a vmap level's batch size")
functorch_interpreters = _symbol(
    "torch._functorch.pyfunctorch:retrieve_all_functorch_interpreters", "whether a vmap is active (batch norm)"
)
# -- tracing and compiling kernels (hf.compile); make_fx is torch.fx's documented-experimental tracer
make_fx = _symbol("torch.fx.experimental.proxy_tensor:make_fx", "tracing a kernel into aten operations")
get_proxy_mode = _symbol("torch.fx.experimental.proxy_tensor:get_proxy_mode", "whether a program is being traced")
ShapeEnv = _symbol("torch.fx.experimental.symbolic_shapes:ShapeEnv", "fake inputs as dynamo hands them over")
DataDependentError = _symbol(
    "torch.fx.experimental.symbolic_shapes:GuardOnDataDependentSymNode",
    "naming a schedule that reads the step's value in a compiled kernel (optim)",
)
FakeTensorMode = _symbol("torch._subclasses.fake_tensor:FakeTensorMode", "fake inputs for the compiler backend")
tracing = _symbol("torch._guards:tracing", "the tracing context inductor reads its fake mode from")
TracingContext = _symbol("torch._guards:TracingContext", "the tracing context inductor reads its fake mode from")
# -- dispatch modes: public alternative none (torch.overrides has the torch-function level only)
TorchDispatchMode = _symbol(
    "torch.utils._python_dispatch:TorchDispatchMode", "counting the bytes one inner step allocates (unroll)"
)
# -- torch.compile's backends, as torch.compile(**options) builds them; public: torch.compile itself
InductorWrapper = _symbol("torch:_TorchCompileInductorWrapper", "inductor with mode= / options= (hf.compile)")
CompileWrapper = _symbol("torch:_TorchCompileWrapper", "a named or callable backend (hf.compile)")


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` level is active, at any depth of the transform stack."""
    return bool(vmap_sizes())


def vmap_sizes() -> tuple:
    """The batch size of every active ``torch.func.vmap`` level, outermost first (``()`` outside any)."""
    return tuple(level.batch_size() for level in functorch_interpreters() if level.key() == TransformType.Vmap)


def tree_children(spec: Any) -> list:
    """The child specs of a pytree spec: ``children()`` (torch >= 2.9), ``children_specs`` before."""
    children = getattr(spec, "children", None)
    return list(children() if callable(children) else spec.children_specs)


def is_mutable_op(target: Any) -> bool:
    """Whether an aten operator mutates an argument (its private ``_schema``; public alternative none)."""
    return isinstance(target, OpOverload) and target._schema.is_mutable


def allocates(op: Any) -> bool:
    """Whether an operator's outputs are new storage, none a view of an input (its private ``_schema``;
    public alternative none)."""
    return all(r.alias_info is None for r in op._schema.returns)


def compiler_wrapper(backend: Any, mode: Any, settings: Any, dynamic: Any) -> Any:
    """The callable ``torch.compile(backend=, mode=, options=, dynamic=)`` hands its graphs to."""
    if backend == "inductor":
        return InductorWrapper(mode, dict(settings or {}), dynamic)
    return CompileWrapper(backend, mode, settings, dynamic)


missing.update({name: obj for name, obj in globals().items() if isinstance(obj, _Missing)})
