"""ONNX models on onnxruntime. Its settings class is `appliance.config.OnnxConfig`.

onnxruntime is imported on first use, so a device without the `onnx` extra still starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import OnnxConfig
from ..device import Placement, settle, want_accelerator
from ..errors import InferenceFailed, InvalidInput, ModelError
from ..manifest import Manifest
from ..tensors import Signature, TensorSpec
from .base import Backend, LoadContext

log = logging.getLogger("appliance.backends.onnx")

_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError(
            f"onnxruntime is not installed ({exc}): pip install 'appliance[onnx]' "
            "(on a Jetson: JetPack's onnxruntime-gpu wheel)"
        ) from None
    return onnxruntime


def runtime_info() -> str:
    """For `appliance --version`: the onnxruntime version and the devices it can use."""
    ort = _ort()
    providers = list(ort.get_available_providers())
    devices = ["cuda"] if any(p in providers for p in _GPU_PROVIDERS) else []
    devices.append("cpu")
    return (
        f"onnxruntime {ort.__version__}, devices: {', '.join(devices)} "
        f"(providers: {', '.join(providers)})"
    )


def _spec(arg: Any, what: str) -> TensorSpec:
    datatype = _TYPES.get(arg.type)
    if datatype is None:
        raise ModelError(f"{what} '{arg.name}' has type {arg.type}, which cannot be served")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def _signature(session: Any) -> Signature:
    return Signature(
        tuple(_spec(a, "input") for a in session.get_inputs()),
        tuple(_spec(a, "output") for a in session.get_outputs()),
    )


def _session_options(ort: Any, cfg: OnnxConfig) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.intra_op_threads
    so.inter_op_num_threads = cfg.inter_op_threads
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _OPT_LEVELS[cfg.graph_optimization]
    )
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if cfg.allow_spinning else "0"
    )
    so.add_session_config_entry(
        "session.inter_op.allow_spinning", "1" if cfg.allow_spinning else "0"
    )
    so.log_severity_level = 3
    return so


def providers_for(
    requested: str, available: list[str], cfg: OnnxConfig, cache_dir: Path, what: str
) -> list[Any]:
    """Execution providers to ask for, best first: TensorRT, CUDA, then the CPU."""
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    why_not = f"onnxruntime offers no GPU execution provider (it has {', '.join(available)})"
    if not want_accelerator(requested, bool(gpu), why_not, what):
        return ["CPUExecutionProvider"]
    chosen: list[Any] = []
    if "TensorrtExecutionProvider" in gpu:
        trt_cache = (
            Path(cfg.tensorrt_cache_dir) if cfg.tensorrt_cache_dir else cache_dir / "tensorrt"
        )
        chosen.append(
            (
                "TensorrtExecutionProvider",
                {
                    "device_id": cfg.cuda_device_id,
                    "trt_fp16_enable": cfg.tensorrt_fp16,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(trt_cache),
                },
            )
        )
    if "CUDAExecutionProvider" in gpu:
        chosen.append(("CUDAExecutionProvider", {"device_id": cfg.cuda_device_id}))
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxBackend(Backend):
    name = "onnx"
    platform = "onnxruntime_onnx"
    batchable = True

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        ort = _ort()
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{path}: onnxruntime cannot load this model: {exc}") from None
        meta = session.get_modelmeta()
        params: dict[str, Any] = {}
        if meta.producer_name:
            params["producer"] = meta.producer_name
        if meta.custom_metadata_map:
            params["metadata"] = dict(meta.custom_metadata_map)
        return _signature(session), params

    def __new__(cls, manifest: Manifest, path: Path, context: LoadContext) -> OnnxBackend:
        """A manifest with "text" preprocessing (or a "text" input step) gets the text-embedding
        flavour of this backend (backends/onnx_text.py); the store names both "onnx"."""
        if cls is OnnxBackend and any(d["type"] == "text" for _, d in manifest.declared("input")):
            from .onnx_text import OnnxTextBackend

            return super().__new__(OnnxTextBackend)
        return super().__new__(cls)

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        ort = _ort()
        cfg = context.config.onnx
        what = f"model {manifest.name!r} version {manifest.version}"
        self._has_strings = False
        available = list(ort.get_available_providers())
        providers = providers_for(context.config.device, available, cfg, context.cache_dir, what)
        for p in providers:
            if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider":
                # the directory providers_for chose (tensorrt_cache_dir when configured)
                Path(p[1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        try:
            #: The onnxruntime session itself (`appliance bench` times it raw, as the floor).
            self.session: Any = ort.InferenceSession(
                str(path), sess_options=_session_options(ort, cfg), providers=providers
            )
        except Exception as exc:
            raise ModelError(f"{what}: onnxruntime cannot load {path.name}: {exc}") from None
        actual = list(self.session.get_providers())
        accelerated = bool(actual) and actual[0] in _GPU_PROVIDERS
        why_not = (
            f"onnxruntime offers no GPU execution provider (it has {', '.join(available)})"
            if not any(p in available for p in _GPU_PROVIDERS)
            else f"the GPU providers failed to start (session runs on {', '.join(actual)})"
        )
        self.placement: Placement = settle(
            context.config.device, accelerated, ",".join(actual), why_not, what
        )
        self.signature = _signature(self.session)
        self._named_dims = _named_dims(self.session)
        self._has_strings = any(t.datatype == "BYTES" for t in self.signature.inputs)
        self._run_options = ort.RunOptions()
        self._errors = _error_types(ort)
        self._output_names = [t.name for t in self.signature.outputs]
        #: Whether `run` calls the session's C++ object itself (see there), which onnxruntime's
        #: Python InferenceSession has held as `_sess` in every release; its wrapper otherwise.
        self._direct = isinstance(
            getattr(self.session, "_sess", None), ort.capi._pybind_state.InferenceSession
        )
        self._ep_fail: type[Exception] = ort.capi.onnxruntime_pybind11_state.EPFail

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        _check_named_dims(self._named_dims, inputs)
        feed = inputs
        if self._has_strings:
            feed = {k: _strings(k, v) if v.dtype == object else v for k, v in inputs.items()}
        names = outputs or self._output_names
        session = self.session
        try:
            if self._direct:
                # The session's C++ run, without the Python wrapper's per-call checks (graph
                # capture, input names, OrtValue ownership): the request was validated against
                # the signature and feeds numpy arrays. A provider failure goes through the
                # wrapper's run, which falls back to another provider as it always did.
                try:
                    results = session._sess.run(names, feed, self._run_options)
                except self._ep_fail:
                    results = session.run(names, feed, self._run_options)
            else:
                results = session.run(names, feed, self._run_options)
        except self._errors[0] as exc:
            raise InvalidInput(f"the model rejected the input: {_short(exc)}") from None
        except self._errors[1] as exc:
            raise InferenceFailed(f"onnxruntime failed: {_short(exc)}") from None
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name, value in zip(names, results, strict=True):
            arr = np.asarray(value)
            if arr.dtype == object:
                arr = _to_bytes(arr)
            out[name] = arr
        return out

    def unload(self) -> None:
        self.session = None


def _named_dims(session: Any) -> dict[str, list[tuple[str, int]]]:
    """Named (symbolic) input dimensions that occur more than once: name -> [(input, axis)].

    ONNX gives one size to every dimension with the same name, so `x: [batch, 3]` and
    `y: [batch, 3]` need the same batch; the per-input checks cannot see that.
    """
    where: dict[str, list[tuple[str, int]]] = {}
    for arg in session.get_inputs():
        for axis, dim in enumerate(arg.shape or []):
            if isinstance(dim, str) and dim:
                where.setdefault(dim, []).append((arg.name, axis))
    return {dim: places for dim, places in where.items() if len(places) > 1}


def _check_named_dims(
    named: dict[str, list[tuple[str, int]]], inputs: dict[str, np.ndarray[Any, Any]]
) -> None:
    for dim, places in named.items():
        seen: tuple[str, int, int] | None = None
        for name, axis in places:
            array = inputs.get(name)
            if array is None or axis >= array.ndim:
                continue  # missing inputs and wrong ranks are reported elsewhere
            size = int(array.shape[axis])
            if seen is None:
                seen = (name, axis, size)
            elif size != seen[2]:
                raise InvalidInput(
                    f"input {name!r} has size {size} in dimension {axis} ('{dim}'), but input "
                    f"{seen[0]!r} has {seen[2]} in dimension {seen[1]}: the model names both "
                    f"'{dim}', so they must be equal"
                )


def _error_types(ort: Any) -> tuple[type[Exception], tuple[type[Exception], ...]]:
    state = ort.capi.onnxruntime_pybind11_state
    invalid: type[Exception] = state.InvalidArgument
    return invalid, (state.Fail, state.RuntimeException, RuntimeError)


def _short(exc: Exception) -> str:
    text = str(exc).strip()
    return text if len(text) <= 500 else text[:500] + "..."


def _strings(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        try:
            flat_out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{name}': element {i} is not UTF-8 text") from None
    return out


def _to_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        flat_out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out
