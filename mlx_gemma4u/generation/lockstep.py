"""One engine across processes (a model split by mx.distributed): rank 0 decides, the others follow.

Every forward pass of a split model is a collective, so every process must step the same rows on
the same inputs. Rank 0 (the one that serves HTTP) decides what joins and leaves the batch; before
each step it sends the others a Plan of those changes, and they make them to their own
BatchGenerator and step it too:

    rank 0     requests -> engine.add / cancel -> share(plan) -> engine.step() -> tokens to clients
    rank r     share() -> the same add / cancel -> engine.step() (its tokens are rank 0's; dropped)

Everything else the engines do follows from their inputs (the same logits reach every rank), so
they stay in step. A request's prompt cache is named by the request that filled it: rank 0 says
which finished request's cache a new one continues and which caches it let go. A plan travels as
JSON plus the prompt's raw arrays (never a pickle), in two all_sums: its length, then its bytes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_gemma4u.generation.constraints import Constraint
from mlx_gemma4u.generation.engine import BatchGenerator
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache


@dataclass
class Add:
    """A prompt joining the batch: prepare_inputs' arrays, its settings (a seed always set, so that
    every rank draws the same tokens), and the finished request whose cache it continues (None: a
    new cache)."""

    inputs: dict[str, np.ndarray]
    params: SamplingParams
    continues: int | None = None


@dataclass
class Plan:
    """The changes to make before the next step, in this order: cancel, forget, add."""

    cancel: list[int] = field(default_factory=list)  # requests that leave the batch
    forget: list[int] = field(default_factory=list)  # finished requests whose caches rank 0 let go
    add: list[Add] = field(default_factory=list)
    stop: bool = False

    @property
    def empty(self) -> bool:
        return not (self.cancel or self.forget or self.add or self.stop)


def share(plan: Plan | None, group) -> Plan:
    """Rank 0's `plan` -> the same Plan on every rank of `group` (the others pass None). An empty
    plan costs one all_sum of a number."""
    first = group.rank() == 0
    data = _encode(plan) if first and not plan.empty else b""
    size = mx.distributed.all_sum(mx.array(len(data), dtype=mx.int64), group=group).item()
    if size == 0:
        return plan if first else Plan()
    mine = np.frombuffer(data, np.uint8) if first else np.zeros(size, np.uint8)
    heard = mx.distributed.all_sum(mx.array(mine), group=group)
    mx.eval(heard)  # on every process: a collective runs only where all of them evaluate it
    return plan if first else _decode(np.array(heard).tobytes())


def follow(model, processor, group, max_batch: int, draft_model=None) -> None:
    """Ranks > 0: step an engine as rank 0's plans say, until one says stop."""
    engine = BatchGenerator(model, processor, max_batch=max_batch, draft_model=draft_model)
    caches: dict[int, PromptCache] = {}  # every request's, until rank 0 lets it go
    while True:
        plan = share(None, group)
        if plan.stop:
            return
        for uid in plan.cancel:
            engine.cancel(uid)
        for uid in plan.forget:
            caches.pop(uid, None)
        for add in plan.add:
            cache = caches.pop(add.continues) if add.continues is not None else PromptCache(model, add.params.kv_bits)
            uid = engine.add({k: mx.array(v) for k, v in add.inputs.items()}, add.params, cache)
            caches[uid] = cache
        engine.step()


def _encode(plan: Plan) -> bytes:
    arrays, adds = [], []
    for add in plan.add:
        names = sorted(add.inputs)
        arrays += [np.ascontiguousarray(add.inputs[k]) for k in names]
        shapes = [[k, add.inputs[k].dtype.str, list(add.inputs[k].shape)] for k in names]
        adds.append({"params": dataclasses.asdict(add.params), "continues": add.continues, "arrays": shapes})
    head = json.dumps({"cancel": plan.cancel, "forget": plan.forget, "stop": plan.stop, "add": adds}).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(a.tobytes() for a in arrays)


def _decode(data: bytes) -> Plan:
    n = int.from_bytes(data[:8], "little")
    head, offset = json.loads(data[8 : 8 + n]), 8 + n
    adds = []
    for add in head["add"]:
        inputs = {}
        for name, dtype, shape in add["arrays"]:
            count = int(np.prod(shape))
            inputs[name] = np.frombuffer(data, np.dtype(dtype), count, offset).reshape(shape)
            offset += count * np.dtype(dtype).itemsize
        adds.append(Add(inputs, _params_from(add["params"]), add["continues"]))
    return Plan(head["cancel"], head["forget"], adds, head["stop"])


def _params_from(fields: dict) -> SamplingParams:
    shape = fields.get("response_format")
    return SamplingParams(**{**fields, "response_format": Constraint(**shape) if shape else None})
