"""TFLite models on LiteRT (`ai-edge-litert`), or on `tflite_runtime` where a device has only
that. Its settings class is `appliance.config.TfliteConfig`.

The runtime is imported on first use. An interpreter is not thread-safe, so the backend keeps a
small pool: each run borrows one interpreter (made on demand, so at most one per concurrent
request) and gives it back. Quantized inputs and outputs are exposed as real values: the
backend applies the model's scale and zero point both ways (see `Backend.quantization`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TfliteConfig
from ..device import Placement, settle
from ..errors import InferenceFailed, InvalidInput, ModelError
from ..manifest import Manifest
from ..tensors import Signature, TensorSpec
from .base import Backend, LoadContext, Quantization

log = logging.getLogger("appliance.backends.tflite")

_TYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
_QUANTIZED = frozenset({"INT8", "UINT8", "INT16"})
_NO_GPU = "the TFLite backend runs on the CPU (no GPU delegate is used)"


@dataclass(frozen=True)
class Runtime:
    """The interpreter class in use and what to call it in reports."""

    name: str  # "litert" or "tflite_runtime"
    version: str
    interpreter: Any
    op_resolver: Any


def _version(dist: str, module: str) -> str:
    """The package version: its metadata, else the module's own (a frozen binary has no
    metadata)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))


def _litert() -> Runtime:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    version = _version("ai-edge-litert", "ai_edge_litert")
    return Runtime("litert", version, Interpreter, OpResolverType)


def _tflite_runtime() -> Runtime:
    from tflite_runtime.interpreter import Interpreter, OpResolverType

    version = _version("tflite-runtime", "tflite_runtime")
    return Runtime("tflite_runtime", version, Interpreter, OpResolverType)


def load_runtime(choice: str = "auto") -> Runtime:
    """LiteRT first, `tflite_runtime` as the fallback (or the one `choice` names)."""
    errors = []
    order = {"auto": [_litert, _tflite_runtime], "litert": [_litert]}.get(choice, [_tflite_runtime])
    for load in order:
        try:
            return load()
        except ImportError as exc:
            errors.append(str(exc))
    raise ModelError(
        f"no TFLite runtime is installed ({'; '.join(errors)}): pip install 'appliance[tflite]' "
        "(ai-edge-litert)"
    )


def runtime_info() -> str:
    """For `appliance --version`: the interpreter package and its version."""
    rt = load_runtime()
    return f"{rt.name} {rt.version}, devices: cpu (xnnpack)"


def _threads(cfg: TfliteConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


def create_interpreter(rt: Runtime, path: Path, cfg: TfliteConfig, what: str) -> Any:
    """One interpreter for `path`, with tensors allocated; ModelError says why not."""
    resolver = (
        rt.op_resolver.AUTO if cfg.xnnpack else rt.op_resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    try:
        interp = rt.interpreter(
            model_path=str(path),
            num_threads=_threads(cfg),
            experimental_op_resolver_type=resolver,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{what}: {rt.name} cannot load {path.name}: {_short(exc)}") from None
    except (ImportError, AttributeError, SystemError, TypeError) as exc:
        # tflite_runtime 2.14 imports under numpy 2 but fails here (`_ARRAY_API not found`).
        raise ModelError(
            f"{what}: {rt.name} {rt.version} cannot create an interpreter with numpy "
            f"{np.__version__} ({type(exc).__name__}: {_short(exc)}); tflite_runtime needs numpy "
            "1: install ai-edge-litert instead (pip install 'appliance[tflite]')"
        ) from None
    return interp


@dataclass(frozen=True)
class _Layout:
    """How a model's tensors are reached: by index on subgraph 0, or through a signature."""

    signature_key: str | None
    inputs: dict[str, int]  # exposed name -> tensor index
    outputs: dict[str, int]
    dtypes: dict[str, np.dtype[Any]]  # the model's own dtype of each input and output
    signature: Signature
    quantization: dict[str, Quantization]
    raw_quantization: dict[str, Quantization]


def _choose_signature(interp: Any, wanted: str, what: str) -> str | None:
    sigs = list(interp.get_signature_list())
    if wanted:
        if wanted not in sigs:
            raise ModelError(
                f"{what}: tflite.signature = {wanted!r}, but the model's signatures are "
                f"{', '.join(map(repr, sigs)) or 'none'}"
            )
        return wanted
    if not sigs:
        return None
    return "serving_default" if "serving_default" in sigs else sigs[0]


def _quant(detail: dict[str, Any], datatype: str) -> Quantization | None:
    params = detail.get("quantization_parameters") or {}
    scales = list(params.get("scales", []))
    zeros = list(params.get("zero_points", []))
    if datatype not in _QUANTIZED or len(scales) != 1 or not scales[0]:
        return None
    return Quantization(datatype, float(scales[0]), int(zeros[0]) if zeros else 0)


def _layout(interp: Any, cfg: TfliteConfig, what: str) -> _Layout:
    key = _choose_signature(interp, cfg.signature, what)
    if key is None:
        ins = {d["name"]: d for d in interp.get_input_details()}
        outs = {d["name"]: d for d in interp.get_output_details()}
    else:
        runner = interp.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
    dtypes: dict[str, np.dtype[Any]] = {}
    quant: dict[str, Quantization] = {}
    raw_quant: dict[str, Quantization] = {}

    def spec(name: str, detail: dict[str, Any], kind: str) -> TensorSpec:
        dtype = np.dtype(detail["dtype"])
        datatype = _TYPES.get(dtype)
        if datatype is None:
            raise ModelError(f"{what}: {kind} '{name}' has type {dtype}, which cannot be served")
        dtypes[name] = dtype
        sig = detail.get("shape_signature")
        dims = sig if sig is not None and len(sig) else detail["shape"]
        q = _quant(detail, datatype)
        if q is not None:
            raw_quant[name] = q
            if cfg.dequantize:
                quant[name] = q
                datatype = "FP32"
        return TensorSpec(name, datatype, tuple(int(d) for d in dims))

    signature = Signature(
        tuple(spec(n, d, "input") for n, d in ins.items()),
        tuple(spec(n, d, "output") for n, d in outs.items()),
    )
    return _Layout(
        key,
        {n: int(d["index"]) for n, d in ins.items()},
        {n: int(d["index"]) for n, d in outs.items()},
        dtypes,
        signature,
        quant,
        raw_quant,
    )


class _Instance:
    """One interpreter and the input shapes it is currently allocated for."""

    __slots__ = ("interp", "runner", "shapes")

    def __init__(self, interp: Any, signature_key: str | None) -> None:
        self.interp = interp
        self.runner = interp.get_signature_runner(signature_key) if signature_key else None
        self.shapes: dict[int, tuple[int, ...]] = {
            int(d["index"]): tuple(int(x) for x in d["shape"]) for d in interp.get_input_details()
        }


class TfliteBackend(Backend):
    name = "tflite"
    platform = "tensorflow_lite"
    #: Requests can share a run along a dynamic first dimension (the engine's batching uses
    #: this where it exists; each run resizes its interpreter to the merged batch).
    batchable = True

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        rt = load_runtime()
        cfg = TfliteConfig()
        interp = create_interpreter(rt, path, cfg, str(path))
        layout = _layout(interp, cfg, str(path))
        params: dict[str, Any] = {}
        sigs = list(interp.get_signature_list())
        if sigs:
            params["signatures"] = sigs
        if layout.raw_quantization:
            params["quantization"] = {n: q.to_json() for n, q in layout.raw_quantization.items()}
        return layout.signature, params

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        cfg = context.config.tflite
        self._what = what = f"model {manifest.name!r} version {manifest.version}"
        self._rt = rt = load_runtime(cfg.runtime)
        self._path, self._cfg = path, cfg
        first = create_interpreter(rt, path, cfg, what)
        self._layout = layout = _layout(first, cfg, what)
        self.signature = layout.signature
        self.quantization = dict(layout.quantization)
        self._free = [_Instance(first, layout.signature_key)]
        self._lock = threading.Lock()
        self.instances = 1
        detail = (
            f"{rt.name} {rt.version}, {'xnnpack' if cfg.xnnpack else 'builtin kernels'}, "
            f"{_threads(cfg)} threads"
        )
        self.placement: Placement = settle(context.config.device, False, detail, _NO_GPU, what)

    def _take(self) -> _Instance:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.instances += 1
        try:
            interp = create_interpreter(self._rt, self._path, self._cfg, self._what)
            return _Instance(interp, self._layout.signature_key)
        except BaseException:
            with self._lock:
                self.instances -= 1
            raise

    def _give(self, inst: _Instance) -> None:
        with self._lock:
            self._free.append(inst)

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        layout = self._layout
        feed = {}
        for spec in layout.signature.inputs:
            value = inputs[spec.name]
            q = layout.quantization.get(spec.name)
            dtype = layout.dtypes[spec.name]
            feed[spec.name] = np.ascontiguousarray(
                q.quantize(value) if q is not None else value, dtype=dtype
            )
        inst = self._take()
        try:
            raw = self._invoke(inst, feed)
        finally:
            self._give(inst)
        names = outputs or [t.name for t in layout.signature.outputs]
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name in names:
            q = layout.quantization.get(name)
            out[name] = q.dequantize(raw[name]) if q is not None else raw[name]
        return out

    def _invoke(
        self, inst: _Instance, feed: dict[str, np.ndarray[Any, Any]]
    ) -> dict[str, np.ndarray[Any, Any]]:
        layout = self._layout
        try:
            if inst.runner is not None:
                # The signature runner resizes and allocates itself; its arrays are copied so
                # none refers to the interpreter's memory across the next invoke.
                result = inst.runner(**feed)
                return {k: np.array(v, copy=True) for k, v in result.items()}
            interp = inst.interp
            resized = False
            for name, value in feed.items():
                index = layout.inputs[name]
                if inst.shapes.get(index) != value.shape:
                    inst.shapes.pop(index, None)
                    try:
                        interp.resize_tensor_input(index, list(value.shape), strict=True)
                    except RuntimeError as exc:  # a dimension the model fixes
                        raise ValueError(str(exc)) from None
                    inst.shapes[index] = value.shape
                    resized = True
            if resized:
                interp.allocate_tensors()
            for name, value in feed.items():
                interp.set_tensor(layout.inputs[name], value)
            interp.invoke()
            return {n: np.array(interp.get_tensor(i), copy=True) for n, i in layout.outputs.items()}
        except ValueError as exc:
            inst.shapes.clear()  # resize or allocation may have stopped half way
            raise InvalidInput(f"the model rejected the input: {_short(exc)}") from None
        except RuntimeError as exc:
            inst.shapes.clear()
            raise InferenceFailed(f"{self._rt.name} failed: {_short(exc)}") from None

    def bare_call(
        self, inputs: dict[str, np.ndarray[Any, Any]]
    ) -> tuple[Callable[[], list[np.ndarray[Any, Any]]], list[str]]:
        """For `appliance bench`: LiteRT driven directly on an interpreter of its own, sized
        once for `inputs` (set_tensor, invoke, get_tensor: what a hand-written client does),
        and the names of the outputs it returns."""
        layout = self._layout
        interp = create_interpreter(self._rt, self._path, self._cfg, self._what)
        feed = {
            n: np.ascontiguousarray(
                q.quantize(v) if (q := layout.quantization.get(n)) else v, layout.dtypes[n]
            )
            for n, v in inputs.items()
        }
        names = [t.name for t in layout.signature.outputs]
        quant = [layout.quantization.get(n) for n in names]
        if layout.signature_key is not None:
            runner = interp.get_signature_runner(layout.signature_key)

            def signature_call() -> list[np.ndarray[Any, Any]]:
                out = runner(**feed)
                pairs = zip(names, quant, strict=True)
                return [q.dequantize(out[n]) if q else np.array(out[n]) for n, q in pairs]

            return signature_call, names
        for n, v in feed.items():
            interp.resize_tensor_input(layout.inputs[n], list(v.shape), strict=True)
        interp.allocate_tensors()
        ins = [(layout.inputs[n], v) for n, v in feed.items()]
        outs = [(layout.outputs[n], q) for n, q in zip(names, quant, strict=True)]

        def call() -> list[np.ndarray[Any, Any]]:
            for index, value in ins:
                interp.set_tensor(index, value)
            interp.invoke()
            got = [(interp.get_tensor(i), q) for i, q in outs]
            return [q.dequantize(value) if q else value for value, q in got]

        return call, names

    def unload(self) -> None:
        with self._lock:
            self._free.clear()


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 500 else text[:500] + "..."
