"""GGUF language and embedding models on llama.cpp (llama-cpp-python). Settings:
`appliance.config.GgufConfig`.

A file is never handed to llama.cpp before `gguf_file.read_gguf` has checked its header, and the
engine loads each file (by sha256) in a child process first (appliance/isolation/probe.py), so a
parser crash on a hostile file kills that child, not the server. A llama context is not
thread-safe: each of the configured `instances` is used by one request at a time, handed out
through a pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import GgufConfig
from ..device import Placement, settle, want_accelerator
from ..errors import InferenceFailed, InvalidInput, ModelError
from ..llm import Cancelled, EmbeddingResult, Emit, Generation, GenerationResult
from ..manifest import Manifest
from ..structured.tools import Tool, prompt_messages, structured_grammar, template_knows_tools
from ..tensors import Signature, TensorSpec
from .base import Backend, LoadContext
from .gguf_file import GgufInfo, read_model

log = logging.getLogger("appliance.backends.gguf")

#: Architectures llama.cpp serves as embedding models (pooled sentence vectors).
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert", "neo-bert"}
)

CHAT_SIGNATURE = Signature(
    (TensorSpec("text_input", "BYTES", (1,)),), (TensorSpec("text_output", "BYTES", (1,)),)
)


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError(
            f"llama-cpp-python is not installed ({exc}): pip install 'appliance[gguf]' "
            "(see packaging/BUILD-GGUF.md for CUDA and ARM build flags)"
        ) from None
    global _log_callback
    if _log_callback is None:
        _log_callback = _route_logs(llama_cpp)
    return llama_cpp


_log_callback: Any = None
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}


def _route_logs(llama_cpp: Any) -> Any:
    """llama.cpp's own messages go to our (JSON) log instead of raw lines on stderr; its chatty
    info lines only at debug level."""
    import ctypes

    native = logging.getLogger("appliance.llama_cpp")
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        py_level = last[0] if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
        last[0] = py_level
        message = text.decode("utf-8", errors="replace").strip()
        if message and native.isEnabledFor(py_level):
            native.log(py_level, "%s", message)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


def runtime_info() -> str:
    """For `appliance --version`: the llama.cpp binding's version and the devices it can use."""
    llama_cpp = _llama()
    devices = "cuda, cpu" if llama_cpp.llama_supports_gpu_offload() else "cpu"
    return f"llama-cpp-python {llama_cpp.__version__}, devices: {devices}"


def model_mode(info: GgufInfo, configured: str) -> Literal["chat", "embedding"]:
    if configured in ("chat", "embedding"):
        return configured  # type: ignore[return-value]
    if info.architecture in EMBEDDING_ARCHITECTURES or info.get("pooling_type") is not None:
        return "embedding"
    return "chat"


WHY_NO_GPU = "this llama-cpp-python was built without GPU offload"


def llama_kwargs(path: Path, cfg: GgufConfig, info: GgufInfo, use_gpu: bool) -> dict[str, Any]:
    """The `llama_cpp.Llama` arguments for a file under these settings (`appliance bench`
    loads its raw baseline with exactly these too)."""
    trained = info.get("context_length")
    n_ctx = cfg.n_ctx
    if isinstance(trained, int) and trained > 0:  # no window beyond what the model learned
        n_ctx = trained if n_ctx == 0 else min(n_ctx, trained)
    return {
        "model_path": str(path),
        "n_ctx": n_ctx,
        "n_threads": cfg.n_threads or (os.cpu_count() or 1),
        "n_batch": cfg.n_batch,
        "n_gpu_layers": cfg.gpu_layers if use_gpu else 0,
        "embedding": model_mode(info, cfg.mode) == "embedding",
        "use_mmap": cfg.use_mmap,
        "verbose": False,
    }


class GgufBackend(Backend):
    name = "gguf"
    platform = "llama_cpp_gguf"

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        info = read_model(path)
        mode = model_mode(info, "auto")
        params: dict[str, Any] = {"mode": mode, "architecture": info.architecture}
        for key in ("general.name", "general.file_type"):
            if key in info.metadata:
                params[key.split(".", 1)[1]] = info.metadata[key]
        if info.get("context_length") is not None:
            params["context_length"] = info.get("context_length")
        if "tokenizer.chat_template" in info.metadata:
            params["has_chat_template"] = True
        return _signature(mode, int(info.get("embedding_length", 0) or 0)), params

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        llama_cpp = _llama()
        cfg: GgufConfig = context.config.gguf
        what = f"model {manifest.name!r} version {manifest.version}"
        info = read_model(path)
        self.mode: Literal["chat", "embedding"] = model_mode(info, cfg.mode)
        embedding = self.mode == "embedding"
        self._cfg = cfg
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        why_not = WHY_NO_GPU
        use_gpu = want_accelerator(context.config.device, gpu, why_not, what)
        kwargs = llama_kwargs(path, cfg, info, use_gpu)
        threads = kwargs["n_threads"]
        self.parallelism = cfg.instances
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._all: list[Any] = []
        try:
            for _ in range(cfg.instances):
                llm = llama_cpp.Llama(**kwargs)
                self._all.append(llm)
                if cfg.chat_template and not embedding:
                    llm.chat_handler = _template_handler(llm, cfg.chat_template)
                self._pool.put(llm)
        except Exception as exc:
            self.unload()
            raise ModelError(f"{what}: llama.cpp cannot load {path.name}: {exc}") from None
        first = self._all[0]
        self.n_ctx = int(first.n_ctx())
        self.dim = int(first.n_embd())
        detail = f"llama.cpp, {kwargs['n_gpu_layers']} GPU layers, {threads} threads"
        self.placement: Placement = settle(context.config.device, use_gpu, detail, why_not, what)
        self.signature = _signature(self.mode, self.dim)
        self.has_chat_template = bool(
            cfg.chat_template or "tokenizer.chat_template" in info.metadata
        )
        template = cfg.chat_template or info.metadata.get("tokenizer.chat_template")
        self._knows_tools = template_knows_tools(template if isinstance(template, str) else None)

    # -- text ------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in this model's vocabulary (the guards' max_tokens). The vocabulary
        is read-only, so this is safe beside a generation running in a worker thread."""
        return len(self._all[0].tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _take(self) -> Any:
        return self._pool.get()

    def _kwargs(self, request: Generation) -> dict[str, Any]:
        s = request.sampling
        out: dict[str, Any] = {"max_tokens": s.max_tokens or self._cfg.default_max_tokens}
        for key in ("temperature", "top_p", "top_k", "seed", "repeat_penalty",
                    "presence_penalty", "frequency_penalty"):  # fmt: skip
            value = getattr(s, key)
            if value is not None:
                out[key] = value
        if s.stop:
            out["stop"] = s.stop
        return out

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        if self.mode != "chat":
            raise InvalidInput("this is an embedding model: it cannot generate text")
        llm = self._take()
        try:
            return self._generate(llm, request, emit, cancelled)
        except (InvalidInput, InferenceFailed):
            raise
        except ValueError as exc:  # llama_cpp reports prompts over the context this way
            raise InvalidInput(str(exc)) from None
        except Exception as exc:
            raise InferenceFailed(f"llama.cpp failed: {exc}") from None
        finally:
            self._pool.put(llm)

    def _generate(
        self, llm: Any, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        kwargs = self._kwargs(request)
        chat = request.kind == "chat"
        if chat:
            messages, tools = request.messages, None
            if request.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
                listed = [] if request.tool_choice == "none" else [Tool(**t) for t in request.tools]
                messages, tools = prompt_messages(messages, listed, self._knows_tools)
            grammar = _grammar(llm, request)
            stream = llm.create_chat_completion(
                messages=messages, tools=tools, grammar=grammar, stream=True, **kwargs
            )
        else:
            stream = llm.create_completion(prompt=request.prompt, stream=True, **kwargs)
        pieces: list[str] = []
        finish = "stop"
        tokens = 0
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    tokens += 1
                    pieces.append(text)
                    if emit is not None:
                        emit(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if cancelled():
                    finish = "cancelled"
                    break
        finally:
            stream.close()
        prompt_tokens = max(int(llm.n_tokens) - tokens, 0)
        return GenerationResult("".join(pieces), finish, prompt_tokens, tokens)

    def embed(self, texts: list[str]) -> EmbeddingResult:
        if self.mode != "embedding":
            raise InvalidInput("this is a language model: use an embedding model for embeddings")
        llm = self._take()
        try:
            vectors, tokens = [], 0
            for text in texts:
                ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
                if len(ids) > self.n_ctx:
                    raise InvalidInput(
                        f"input of {len(ids)} tokens is longer than the context of {self.n_ctx}"
                    )
                tokens += len(ids)
                vectors.append(llm.embed(text, normalize=False, truncate=False))
        except InvalidInput:
            raise
        except Exception as exc:
            raise InferenceFailed(f"llama.cpp failed: {exc}") from None
        finally:
            self._pool.put(llm)
        out = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        if self._cfg.normalize_embeddings:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = (out / np.where(norms == 0, 1, norms)).astype(np.float32)
        return EmbeddingResult(out, tokens)

    # -- tensors (KServe v2 and MQTT): text in, text or vectors out ------------------------
    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        if self.mode == "embedding":
            texts = [_text(x) for x in inputs["text"].reshape(-1)]
            return {"embedding": self.embed(texts).vectors}
        prompt = _text(inputs["text_input"].reshape(-1)[0])
        result = self.generate(Generation("completion", prompt=prompt), None, lambda: False)
        return {"text_output": np.array([result.text.encode("utf-8")], dtype=object)}

    def unload(self) -> None:
        for llm in self._all:
            with contextlib.suppress(Exception):  # best effort at shutdown
                llm.close()
        self._all = []


def _grammar(llm: Any, request: Generation) -> Any:
    """The llama.cpp grammar holding a chat to its response_format and tools (None: free).

    llama.cpp answers a grammar it cannot parse with a null sampler, and llama-cpp-python adds
    it to the chain regardless (a crash at the first token): the text is parsed once here
    first, and refused as the client's 400 if it does not parse."""
    tools = [Tool(**t) for t in request.tools]
    text = structured_grammar(
        request.schema, tools, request.tool_choice, request.tool_name, request.parallel_tool_calls
    )
    if text is None:
        return None
    llama_cpp = _llama()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidInput(
            "llama.cpp cannot parse the grammar made from this schema (a pattern it cannot "
            "express?)"
        )
    llama_cpp.llama_sampler_free(sampler)
    return llama_cpp.LlamaGrammar.from_string(text, verbose=False)


def _signature(mode: str, dim: int) -> Signature:
    if mode == "embedding":
        return Signature(
            (TensorSpec("text", "BYTES", (-1,)),),
            (TensorSpec("embedding", "FP32", (-1, dim or -1)),),
        )
    return CHAT_SIGNATURE


def _text(item: Any) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("text inputs must be UTF-8") from None
    return str(item)


def _template_handler(llm: Any, template: str) -> Any:
    """A chat handler from a configured Jinja template, with the model's own BOS/EOS text."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token: int) -> str:
        return bytes(llm.detokenize([token], special=True)).decode("utf-8", errors="ignore")

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llm.token_eos()),
        bos_token=token_text(llm.token_bos()),
    ).to_chat_handler()
