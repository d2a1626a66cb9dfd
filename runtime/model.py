"""The transformer: binds a blob file's weights to the decoder block, which is written once (in
csrc/forward.c) and varied only by the ModelConfig.

Weights are bound once, as kernel Matrix objects over the reader's zero-copy views; every layer
kind (sliding or global attention, soft-capping, q/k norms, biases, sandwich norms) is a field of
the config, handed to the C block here, never a per-family copy of the block. The whole
per-token layer loop runs in C: Python is entered once per token (or per prompt chunk).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig, RopeParams
from ..errors import MissingTensor
from ..format import DType
from . import kernels
from .kv_cache import KVCache

PREFILL_CHUNK = 256   # prompt tokens per prefill pass: bounds activation memory, keeps matmul tiles full
MATRIX_DTYPES = tuple(d for d in DType if d.spec.matmul)   # what the kernels multiply
VECTOR_PARTS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm",
                "q_bias", "k_bias", "v_bias", "o_bias")


@dataclass
class Layer:
    """One block's weights. Optional parts are None when the config does not use them."""

    q: kernels.Matrix
    k: kernels.Matrix
    v: kernels.Matrix
    o: kernels.Matrix
    gate: kernels.Matrix
    up: kernels.Matrix
    down: kernels.Matrix
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    inv_freq: np.ndarray       # rotary inverse frequencies of this layer (local and global layers differ)
    window: int                # attention window in tokens, 0 = unlimited
    rope_scale: float = 1.0    # multiplies cos and sin (LongRoPE's attention factor)
    inv_freq_long: np.ndarray | None = None  # LongRoPE: the frequencies of calls reaching past the original context
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None


class Transformer:
    """Binds a blob file's tensors to layers and runs tokens through them.

    >>> t = Transformer(reader, ModelConfig.from_dict(reader.metadata["model"]))   # doctest: +SKIP
    >>> logits = t.run([2, 651, 6037], cache, start=0, all_logits=True)          # doctest: +SKIP
    >>> rows = t.run_batch([[17], [4, 9, 12]], [cache, other_cache], [3, 0])         # doctest: +SKIP
    """

    def __init__(self, reader, config: ModelConfig):
        check_tensors(reader, config)
        self.config = config
        # one array per distinct rotary setting: layers that share it share its angles in the stack
        self._distinct_ropes = tuple(set(config.rope))   # a few: one per layer kind, not per layer
        frequencies = {rope: _frequencies(rope, config.head_dim) for rope in self._distinct_ropes}
        layers = [self._bind_layer(reader, i, frequencies[config.rope[i]]) for i in range(config.num_layers)]
        self.stack = kernels.DecoderStack(    # holds the bound weights from here on
            bound_matrix(reader, "embed"), bound_matrix(reader, "lm_head"), bound_vector(reader, "final_norm"), layers,
            n_heads=config.num_heads, n_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            ffn=config.intermediate_size,
            rms_eps=config.rms_norm_eps, norm_offset=config.norm_offset,
            embedding_scale=config.embedding_scale, attn_scale=config.attn_scale,
            attn_softcap=config.attn_logit_softcap or 0.0, final_softcap=config.final_logit_softcap or 0.0,
            activation=config.activation)
        self._lock = threading.Lock()  # one forward at a time: the stack's scratch memory is shared

    def _bind_layer(self, reader, i: int, rope: dict) -> Layer:
        name = f"layers.{i}.".__add__
        matrices = {part: bound_matrix(reader, name(part)) for part in ("q", "k", "v", "o", "gate", "up", "down")}
        vectors = {part: bound_vector(reader, name(part)) for part in VECTOR_PARTS if name(part) in reader}
        return Layer(**matrices, **vectors, **rope, window=self.config.sliding_window[i])

    # ---- running tokens ----

    def run(self, ids, cache: KVCache, start: int, all_logits: bool = False, images=()) -> np.ndarray:
        """Process `ids` at positions start.. (their keys and values go into `cache`).
        `images`: the ImageSpans among these positions (runtime/image_prompt.py), whose embeddings
        replace their tokens' and whose tokens attend to each other both ways; a prefill chunk
        never splits one.

        Returns float32 logits (len(ids), vocab) when `all_logits`, else (1, vocab) for the last token.
        A LongRoPE model picks its short or long factors once per call, from the call's last
        position, as transformers does per forward, for every prefill chunk of the call. A cache
        holds keys of one factor set: a call needing the other set recomputes the cached prefix
        (`cache.token_ids[:start]`) with it, as transformers' Phi-3 generate drops its cache when
        a sequence first outgrows the original context. Calls from several threads run one at a time.
        """
        with self._lock:  # sessions in other threads wait for their turn (runtime/session.py)
            return self._run(ids, cache, start, all_logits, list(images))

    def _run(self, ids, cache: KVCache, start: int, all_logits: bool, images: list) -> np.ndarray:
        cache.check_room(start + len(ids))
        long_rope = self.uses_long_factors(start + len(ids))
        if start and cache.long_rope != long_rope:
            if len(cache.token_ids) < start:
                raise ValueError(f"run: the cache lists {len(cache.token_ids)} token ids, not the {start} before "
                                 f"position {start} that must be recomputed with the other LongRoPE factors")
            if any(span.embeds is None for span in cache.images):
                raise ValueError("run: the cache holds pictures without their embeddings (a loaded session); "
                                 "they cannot be recomputed with the other LongRoPE factors")
            logits = self._run_chunks(cache.token_ids[:start] + list(ids), cache, 0, all_logits, long_rope,
                                      cache.images + images)
            return logits[start:] if all_logits else logits
        return self._run_chunks(ids, cache, start, all_logits, long_rope, images)

    def run_batch(self, runs, caches: list[KVCache], positions, images=None) -> np.ndarray:
        """One step of several sequences: runs[i], a list of token ids — a prompt chunk (see
        prefill_chunks), or the one token a decoding sequence feeds back — at positions
        positions[i].. of caches[i], which must hold exactly that many tokens (positions[i] ==
        caches[i].length) and have room for the run. `images`: None, or images[i] the ImageSpans
        inside run i. Returns float32 logits (len(runs), vocab), row i those of run i's last token.

        Each run's numbers are those of `run(runs[i], caches[i], start=positions[i],
        images=images[i])` alone, bit for bit (for a run of at most PREFILL_CHUNK tokens, which
        `run` takes in one pass): the rows of runs of up to 8 tokens go through the decode tiles,
        8 rows at a time, each token's sums as alone, the longer runs' rows through the prefill
        tiles, as alone (csrc/forward.c). Like `run`, it leaves the caches' id lists to the caller.

        A LongRoPE model's runs rotate with the factor set each one's lone `run` would use: a run
        whose cache must switch sets (its sequence just outgrew the original context) runs alone
        through `run`, which recomputes the cache; the others go in one step per factor set.
        Like `run`, calls from several threads run one at a time.
        """
        with self._lock:
            return self._run_batch([list(run) for run in runs], caches, positions,
                                   [[] for _ in runs] if images is None else [list(i) for i in images])

    def _run_batch(self, runs: list, caches: list[KVCache], positions, images: list) -> np.ndarray:
        n = len(runs)
        if len(caches) != n or len(positions) != n or len(images) != n:
            raise ValueError(f"run_batch: {n} runs need as many caches and positions (and image lists), "
                             f"found {len(caches)} and {len(positions)} (and {len(images)})")
        if len({id(cache) for cache in caches}) != n:
            raise ValueError("run_batch: one run per cache; a cache appears twice")
        for i, (run, cache, position) in enumerate(zip(runs, caches, positions)):
            if not run:
                raise ValueError(f"run_batch: run {i} is empty; a run holds at least one token")
            if position != cache.length:
                raise ValueError(f"run_batch: sequence {i} is at position {position}, but its cache holds "
                                 f"{cache.length} tokens")
            cache.check_room(position + len(run))
        wants_long = [self.uses_long_factors(p + len(run)) for p, run in zip(positions, runs)]
        alone = {i for i in range(n) if positions[i] and caches[i].long_rope != wants_long[i]}
        if not alone and len(set(wants_long)) == 1:
            # one call holds every row: its array is the step's logits, where a second (n, vocab)
            # array copied into would take fresh pages at every step (Gemma 3's 262144 logits,
            # 4 rows: 1.7 ms, a tenth of the step)
            return self._step_rows(runs, caches, positions, images, range(n), wants_long[0])
        logits = np.empty((n, self.stack.vocab), np.float32)
        for i in alone:
            logits[i] = self._run(runs[i], caches[i], start=positions[i], all_logits=False, images=images[i])[-1]
        for long_rope in (False, True):
            rows = [i for i in range(n) if wants_long[i] == long_rope and i not in alone]
            if rows:
                logits[rows] = self._step_rows(runs, caches, positions, images, rows, long_rope)
        return logits

    def _step_rows(self, runs, caches: list[KVCache], positions, images, rows, long_rope: bool) -> np.ndarray:
        """The logits of one batched step of sequences `rows` (indices into the other lists)."""
        spans = [[(span.begin, span.end, span.embeds) for span in images[i]] for i in rows]
        logits = self.stack.run_batch([runs[i] for i in rows], [caches[i].k for i in rows],
                                      [caches[i].v for i in rows], [positions[i] for i in rows], long_rope=long_rope,
                                      spans=spans if any(spans) else None)
        for i in rows:
            caches[i].long_rope = long_rope
        return logits

    def uses_long_factors(self, end: int) -> bool:
        """Whether a call reaching position `end` - 1 rotates with LongRoPE's long factors (never
        for models without LongRoPE): a call's positions all rotate as its last one does.

        >>> transformer.uses_long_factors(4097)                                  # doctest: +SKIP
        True
        """
        return any(rope.uses_long_factors(end) for rope in self._distinct_ropes)

    def _run_chunks(self, ids, cache: KVCache, start: int, all_logits: bool, long_rope: bool,
                    images: list) -> np.ndarray:
        outputs = []
        for begin, end, spans in prefill_chunks(len(ids), start, images):
            rows = end - begin if all_logits else int(end == len(ids))
            logits = self.stack.run(ids[begin:end], cache.k, cache.v, start + begin, logit_rows=rows,
                                    long_rope=long_rope, spans=[(s.begin, s.end, s.embeds) for s in spans])
            if rows:
                outputs.append(logits)
        cache.long_rope = long_rope
        return np.concatenate(outputs)


def prefill(transformer: Transformer, cache: KVCache, prompt_ids: list[int], images=()) -> np.ndarray:
    """The last prompt position's logits (vocab,), computing only the prompt tokens `cache` does
    not already hold; the cache then holds the whole prompt, and its ImageSpans `images`.

    >>> prefill(transformer, session.cache, [2, 651, 6037]).shape               # doctest: +SKIP
    (262144,)
    """
    reuse, new_images = keep_reusable_prefix(cache, prompt_ids, images)
    logits = transformer.run(prompt_ids[reuse:], cache, start=reuse, images=new_images)[-1]
    cache.token_ids.extend(prompt_ids[reuse:])
    cache.images.extend(new_images)
    return logits


def keep_reusable_prefix(cache: KVCache, prompt_ids: list[int], images=()) -> tuple[int, list]:
    """Cut `cache` back to the prefix it shares with the prompt (KVCache.reusable_prefix); returns
    that prefix's length and the prompt's ImageSpans after it, which are still to compute.

    >>> keep_reusable_prefix(session.cache, [2, 651, 6037])                     # doctest: +SKIP
    (2, [])
    """
    reuse = cache.reusable_prefix(prompt_ids, images)
    cache.truncate(reuse)
    return reuse, [span for span in images if span.begin >= reuse]


def prefill_chunks(n: int, start: int, images=()):
    """(begin, end, spans) of the prefill chunks of n tokens at positions start..: PREFILL_CHUNK
    tokens each, a chunk ending early before a picture that it would split (a picture longer than
    a chunk gets a chunk of its own): a picture's tokens see each other's keys, so they are
    computed in one call. `spans` are the ImageSpans of `images` in the chunk (absolute positions).

    >>> [(begin, end) for begin, end, _ in prefill_chunks(600, 0)]
    [(0, 256), (256, 512), (512, 600)]
    """
    begin = 0
    while begin < n:
        end = min(begin + PREFILL_CHUNK, n)
        for span in images:
            first, last = span.begin - start, span.end - start
            if first < end < last:
                end = first if first > begin else last
        yield begin, end, [span for span in images if span.begin < start + end and span.end > start + begin]
        begin = end


def _frequencies(rope: RopeParams, head_dim: int) -> dict:
    """A layer's rotary fields (see Layer) for these rope settings."""
    long = rope.inv_freq(head_dim, long_context=True) if rope.kind == "longrope" else None
    return {"inv_freq": rope.inv_freq(head_dim), "inv_freq_long": long, "rope_scale": rope.attention_factor}


def bound_matrix(reader, name: str) -> kernels.Matrix:
    """Tensor `name` of an open blob bound for the kernels, zero copy (the decoder's and the
    vision tower's weights alike).

    >>> bound_matrix(reader, "lm_head")           # doctest: +SKIP
    Matrix('lm_head', q8_0, rows=262144, cols=640)
    """
    info = reader.info(name)
    view = reader[name]
    return kernels.Matrix(view, dtype=None if info.dtype.is_quantized else info.dtype.label, name=name)


def bound_vector(reader, name: str) -> np.ndarray:
    """A norm weight or bias as float32: the mapped view itself when stored as f32 (the packer's
    default), else a float32 copy of these few values.

    >>> bound_vector(reader, "final_norm").dtype   # doctest: +SKIP
    dtype('float32')
    """
    if reader.info(name).dtype is DType.F32:
        return reader[name]
    return reader.float32(name)


def _labels(dtypes) -> str:
    return " ".join(d.label for d in dtypes)


def check_tensors(reader, config: ModelConfig):
    """Raise one MissingTensor listing every tensor the config needs that is absent, misshapen,
    or of a dtype the kernels cannot read — before any forward pass can trip over it."""
    problems = []
    for name, shape in config.expected_tensors().items():
        if name not in reader:
            problems.append(f"  {name}: missing (expected shape {list(shape)})")
            continue
        info = reader.info(name)
        if info.shape != tuple(shape):
            problems.append(f"  {name}: shape {list(info.shape)}, expected {list(shape)}")
        if info.dtype not in MATRIX_DTYPES:
            problems.append(f"  {name}: dtype {info.dtype.label}, expected one of {_labels(MATRIX_DTYPES)}")
        elif len(shape) == 1 and info.dtype.is_quantized:
            problems.append(f"  {name}: a vector stored as {info.dtype.label}; norms and biases must be one of "
                            f"{_labels(d for d in MATRIX_DTYPES if not d.is_quantized)}")
    if problems:
        raise MissingTensor(f"{reader.path}: the file cannot run as {config.arch} "
                            f"({len(problems)} problem(s)):\n" + "\n".join(problems))
