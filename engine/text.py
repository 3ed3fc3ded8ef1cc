"""Text queries: CLIP token ids from the checkpoint's own tokenizer, and runtimes that embed them.

An export of a full CLIP checkpoint holds, beside the image tower, the text tower as ONNX
(token ids (N, L) int64 in, L2-normalised float32 (N, D) out, in the image embeddings' space)
and the checkpoint's tokenizer as the `tokenizers` library saves it (``tokenizer.json``, written
from transformers' CLIPTokenizerFast at export, where its ids were checked against the
checkpoint's tokenisation). Queries are tokenised here with the `tokenizers` library alone: a
search never imports transformers or reads the checkpoint.

A query longer than the model's context length (77 tokens for OpenAI CLIP) is cut to it, as CLIP
was trained; `Tokens.ignored` says which words the model did not read, so front ends can tell
the user. Empty queries and queries over `MAX_QUERY_CHARS` are refused (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from fastret.engine.cuda_torch import split_rows
from fastret.engine.encoders import artefact_size, default_threads, ort_providers, ort_session

MAX_QUERY_CHARS = 1000
"""Longest query text accepted: far past what a 77-token model reads, and it bounds a request's work."""


def check_query_text(text: str) -> str:
    """The query text as it will be tokenised; ValueError when it is empty or too long."""
    if not isinstance(text, str):
        raise ValueError(f"a text query must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty text query: type a few words describing the images to find")
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(
            f"text query of {len(text):,} characters is too long: at most {MAX_QUERY_CHARS:,} "
            "(the model reads only its first 77 tokens, about 50 words)"
        )
    return text


@dataclass(frozen=True)
class Tokens:
    """A tokenised batch of queries."""

    ids: np.ndarray  # (N, L) int64, each row start token, words, end token, then padding to the longest
    lengths: tuple[int, ...]  # tokens of each row before padding (at most the context length)
    ignored: tuple[str, ...]  # the end of each text the model does not read ('' when it reads it all)


class TextTokenizer:
    """The export's tokenizer.json, cut to the model's context length, padded with `pad_id`."""

    def __init__(self, path: Path, context_length: int, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.context_length)

    def __call__(self, texts: Sequence[str]) -> Tokens:
        texts = [check_query_text(text) for text in texts]
        if not texts:
            raise ValueError("no text to tokenise")
        encodings = self.tokenizer.encode_batch(texts)
        lengths = tuple(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(texts), max(lengths)), self.pad_id, dtype=np.int64)
        for row, encoding in zip(ids, encodings):
            row[: len(encoding.ids)] = encoding.ids
        ignored = tuple(_unread_tail(text, encoding) for text, encoding in zip(texts, encodings))
        return Tokens(ids=ids, lengths=lengths, ignored=ignored)


def _unread_tail(text: str, encoding) -> str:
    """The part of `text` past its last token the model reads ('' when it was not cut)."""
    if not encoding.overflowing:
        return ""
    read_up_to = max((end for start, end in encoding.offsets if end > start), default=0)
    return text[read_up_to:].strip()


class TextEncoder(Protocol):
    """Token ids -> unit embeddings in the image tower's space."""

    model_id: str
    dim: int
    backend: str
    precision: str
    artefact: Path
    tokenizer: TextTokenizer

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """(N, L) int64 token ids -> (N, D) float32, rows of unit length."""
        ...


def describe_text_encoder(encoder: TextEncoder) -> str:
    """'backend (precision) on ARTEFACT' for logs."""
    return f"{encoder.backend} ({encoder.precision}) on {encoder.artefact}"


def encode_texts(encoder: TextEncoder, texts: Sequence[str]) -> tuple[np.ndarray, Tokens]:
    """Tokenise and embed a batch of query texts; the tokens say what each query's model read."""
    tokens = encoder.tokenizer(texts)
    return encoder.encode_ids(tokens.ids), tokens


@dataclass
class OnnxTextEncoder:
    """The exported text tower on ONNX Runtime (CPU, or CUDA where onnxruntime-gpu is)."""

    artefact: Path
    tokenizer: TextTokenizer
    model_id: str
    dim: int
    precision: str = "fp32"
    providers: list | None = None
    threads: int = field(default_factory=default_threads)
    backend: str = field(default="onnxruntime", init=False)

    def __post_init__(self) -> None:
        self.artefact_bytes = artefact_size(self.artefact)
        self.session = ort_session(self.artefact, self.providers or ort_providers(), self.threads)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(ids, dtype=np.int64)})[0]
        return out.astype(np.float32, copy=False)


def _numpy_dtype(trt_dtype):
    import tensorrt as trt

    return {trt.DataType.INT64: np.int64, trt.DataType.INT32: np.int32, trt.DataType.FLOAT: np.float32}.get(trt_dtype)


@dataclass
class TensorRTTextEncoder:
    """A text-tower plan (TensorRT 10 API, built by export-engine --fp16): ids in, float32 out, on the GPU.

    Queries are few and short, so each call runs synchronously on the current torch CUDA stream
    with torch-allocated device buffers; rows past the plan's largest batch run in chunks.
    """

    artefact: Path
    tokenizer: TextTokenizer
    model_id: str
    dim: int
    backend: str = field(default="tensorrt", init=False)
    precision: str = field(default="fp16", init=False)

    def __post_init__(self) -> None:
        from fastret.engine.tensorrt_runtime import load_plan

        self.runtime, self.engine, self.context, self.input_name, self.output_name = load_plan(self.artefact)
        self.id_dtype = _numpy_dtype(self.engine.get_tensor_dtype(self.input_name))
        if self.id_dtype not in (np.int64, np.int32) or _numpy_dtype(self.engine.get_tensor_dtype(self.output_name)) is not np.float32:
            raise RuntimeError(f"{self.artefact}: expected integer token ids in and float32 out")
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = int(max_shape[0])

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        import torch

        stream = torch.cuda.current_stream()
        parts = []
        for chunk in split_rows(np.ascontiguousarray(ids, dtype=self.id_dtype), self.max_batch):
            device_in = torch.from_numpy(chunk).to("cuda")
            device_out = torch.empty((len(chunk), self.dim), dtype=torch.float32, device="cuda")
            if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
                raise RuntimeError(f"{self.artefact}: TensorRT refused token ids of shape {tuple(chunk.shape)}")
            self.context.set_tensor_address(self.input_name, device_in.data_ptr())
            self.context.set_tensor_address(self.output_name, device_out.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.artefact}: TensorRT execution failed for {len(chunk)} queries")
            stream.synchronize()
            parts.append(device_out.cpu().numpy())
        return np.concatenate(parts)
