"""One walker over the decoder blocks: calibration activations flow block by block.

    >>> walker = BlockWalker(model, blocks, batches, device="cuda")       # model may sit on CPU
    >>> for visit in walker.visits(last=len(blocks) - 1):
    ...     visit.run(groups, collect, on_group)   # one forward of every batch, paused per group

:class:`BlockWalker` serves every pass of this package that needs the inputs of each decoder
block in turn — EoRA's sequential compensation and the spectrum pass of rank allocation — and
owns what is common to them:

* **placement** — the block computes where it lives (one device, or several devices of a model
  dispatched by accelerate, each block's inputs moved to that block's execution device), or,
  with ``device=`` set while the model lives on the CPU, the block is moved to that device for
  its visit and back afterwards (offload: one block, its covariances and the activations on
  the GPU at a time); blocks dispatched with accelerate's CPU/disk offload hooks keep their hooks;
* **one forward per block** — :meth:`BlockVisit.run` runs every calibration batch through the
  block once. Each batch runs in its own worker thread, one at a time in batch order; a hook at
  the first module of each input group collects its input and parks the thread. When every
  batch is parked at a group, ``on_group`` computes and installs that group's factors and the
  batches resume, so later groups see the compensated ones (what a forward per group used to
  cost) and the batch outputs become the next block's inputs. The same operations run in the
  same order as one forward per group would, so results are identical;
* **timing** — per phase (:class:`PhaseTimes`), for the scale benchmark;
* **resume** — with a :class:`~peft_eora.checkpoint.Checkpoint`, the next block's inputs are
  saved after every finished block, and a restarted walk starts after the last saved block.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .calibration import Batch

logger = logging.getLogger(__name__)

Inputs = list[tuple[torch.Tensor, dict[str, Any]]]


#: Parked activations above this (estimate of :meth:`BlockVisit.parked_bytes`) re-run the block
#: per group instead (CPU). 4 GiB covers the 135M demo's 16k tokens many times over.
PARK_LIMIT_BYTES = 4 * 2**30


class StopForward(Exception):
    """Raised by a hook to cut a forward pass short once the needed inputs were seen."""


class _Abort(BaseException):
    """Unwinds a parked worker when the walk stops early (never escapes the worker)."""


# --------------------------------------------------------------------------------------------
# devices


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate execution device if dispatched, else its first tensor's."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def has_offload_hooks(module: nn.Module) -> bool:
    """True if accelerate hooks move ``module``'s weights in and out (CPU/disk offload)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (tensors, tuples, lists, dicts of them) with ``fn`` applied to every tensor; other
    values unchanged."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (tensors, tuples, lists, dicts of them) on ``device``; other values unchanged."""
    return map_tensors(obj, lambda t: t if t.device == device else t.to(device))


# --------------------------------------------------------------------------------------------
# timing


@dataclass
class PhaseTimes:
    """Seconds per phase of a walk (GPU work is synchronised at phase edges when ``sync``)."""

    sync: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: the phases open now, outermost first (e.g. ``["block_forward", "covariance"]``)
    active: list[str] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str, device: Optional[torch.device] = None) -> Iterator[None]:
        if self.sync and device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        self.active.append(name)
        try:
            yield
        finally:
            self.active.pop()
            if self.sync and device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.counts[name] += 1

    def summary(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in sorted(self.seconds.items())}


NO_TIMES = PhaseTimes()


# --------------------------------------------------------------------------------------------
# one forward per block, paused per group


class PausingRunner:
    """Run ``fn(i)`` for every batch ``i`` in its own thread, one thread at a time, in order.

    A worker calls :meth:`pause` (from a forward hook) to park; :meth:`step` lets every
    unfinished worker run, in index order, until it parks again or finishes, so the main
    thread sees all batches stopped at the same point between steps. Grad mode is per thread:
    workers run under ``torch.no_grad()``.
    """

    def __init__(self, n: int, fn: Callable[[int], Any]) -> None:
        self.n = n
        self._fn = fn
        self._go = [threading.Semaphore(0) for _ in range(n)]
        self._yielded = threading.Semaphore(0)
        self._local = threading.local()
        self._done = [False] * n
        self._results: list[Any] = [None] * n
        self._error: Optional[BaseException] = None
        self._abort = False
        self._threads: list[threading.Thread] = []

    @property
    def index(self) -> int:
        """The batch index of the calling worker."""
        return self._local.index

    def _worker(self, i: int) -> None:
        self._local.index = i
        self._go[i].acquire()
        try:
            if self._abort:
                raise _Abort
            with torch.no_grad():
                self._results[i] = self._fn(i)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the main thread
            self._error = exc
        finally:
            self._done[i] = True
            self._yielded.release()

    def pause(self) -> None:
        """Park the calling worker until the next :meth:`step` (called from a worker only)."""
        i = self._local.index
        self._yielded.release()
        self._go[i].acquire()
        if self._abort:
            raise _Abort

    def step(self) -> bool:
        """Run every unfinished worker to its next pause; True while any worker is parked."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.n)]
            for t in self._threads:
                t.start()
        for i in range(self.n):
            if self._done[i]:
                continue
            self._go[i].release()
            self._yielded.acquire()
            if self._error is not None:
                err = self._error
                self.close()
                raise err
        return not all(self._done)

    def results(self) -> list[Any]:
        while self.step():
            pass
        return self._results

    def close(self) -> None:
        """Unwind parked workers (after an error or an early stop) and join every thread."""
        self._abort = True
        for i in range(self.n):
            if not self._done[i] and self._threads:
                self._go[i].release()
        for t in self._threads:
            t.join(timeout=60)
        self._threads = []


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockVisit:
    """One decoder block and its calibration inputs, on the device the block computes on."""

    index: int
    block: nn.Module
    inputs: Inputs
    device: torch.device
    times: PhaseTimes = field(default_factory=lambda: NO_TIMES)
    outputs: Optional[Inputs] = None
    autocast: Optional[torch.dtype] = None

    def _precision(self) -> Any:
        """Autocast to :attr:`autocast` for the block's forwards (a no-op when None). Thread-local:
        entered by whichever thread runs the forward."""
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def run(
        self,
        first_modules: list[nn.Module],
        collect: Callable[[int, torch.Tensor, int], None],
        on_group: Optional[Callable[[int], None]] = None,
        keep_outputs: bool = True,
        park: Optional[bool] = None,
        stages: Optional[list[list[int]]] = None,
    ) -> None:
        """Forward every batch through the block with a hook at each of ``first_modules``.

        ``collect(group, x, batch)`` receives the input ``x`` of group ``group`` for batch
        ``batch``. With ``on_group``, ``on_group(group)`` runs once every batch's input of that
        group was collected (e.g. installs that group's factors), before any batch goes on.
        With ``keep_outputs`` the block outputs become :attr:`outputs`.

        ``park`` chooses how groups see the compensated groups before them: ``True`` (default on
        CPU): one forward per batch, parked at each group (all batches' activations stay alive
        meanwhile); ``False`` (default on GPUs, where memory is scarce and forwards cheap, and on
        CPU when the parked activations would exceed :data:`PARK_LIMIT_BYTES`): one forward per
        group, cut short after the group's input, then one plain forward for the outputs. Both
        give the same numbers. ``stages`` (with ``park=False``) lists groups whose inputs one forward
        may collect together, none of them installed meanwhile (a MoE's experts, which do not feed each
        other): a stage of several groups runs whole forwards, a stage of one is cut short at its input.
        """
        if park is None:
            park = self.device.type == "cpu" and self.parked_bytes() <= PARK_LIMIT_BYTES
        if on_group is not None and not park:
            self._run_stages(first_modules, collect, on_group, keep_outputs,
                             stages if stages is not None else [[g] for g in range(len(first_modules))])
            return
        runner = PausingRunner(len(self.inputs), self._forward)
        pausing = on_group is not None

        seen: set[tuple[int, int]] = set()  # (group, batch): a layer called twice in one forward pauses once

        def make_hook(g: int) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple) -> None:
                if (g, runner.index) in seen:  # collect() keeps the first call's input only, as the cut-short walk
                    return
                seen.add((g, runner.index))
                collect(g, args[0].detach(), runner.index)
                if pausing:
                    runner.pause()

            return hook

        handles = [m.register_forward_pre_hook(make_hook(g)) for g, m in enumerate(first_modules)]
        try:
            with self.times.phase("block_forward", self.device):
                more = runner.step()
            group = 0
            while more:
                if pausing:
                    on_group(group)
                    group += 1
                with self.times.phase("block_forward", self.device):
                    more = runner.step()
            if pausing:  # groups never reached by a hook (none expected) still get their turn
                while group < len(first_modules):
                    on_group(group)
                    group += 1
            results = runner._results
        finally:
            runner.close()
            for h in handles:
                h.remove()
        if keep_outputs:
            self.outputs = [(block_output(out), kw) for out, (_, kw) in zip(results, self.inputs)]

    def _forward(self, i: int) -> Any:
        hidden, kwargs = self.inputs[i]
        with self._precision():
            return self.block(hidden, **kwargs)

    def parked_bytes(self) -> int:
        """A generous estimate of the activations all batches hold while parked (8× their inputs:
        the MLP's wide intermediate, attention, residual)."""
        return 8 * sum(h.numel() * h.element_size() for h, _ in self.inputs)

    def _run_stages(self, first_modules: list[nn.Module], collect: Callable[[int, torch.Tensor, int], None],
                    on_group: Callable[[int], None], keep_outputs: bool, stages: list[list[int]]) -> None:
        for stage in stages:
            batch = [0]
            cut = len(stage) == 1  # one group: the forward stops at its input

            def hook(_m: nn.Module, args: tuple, g: int) -> None:
                collect(g, args[0].detach(), batch[0])
                if cut:
                    raise StopForward

            handles = [first_modules[g].register_forward_pre_hook(lambda m, a, g=g: hook(m, a, g)) for g in stage]
            try:
                with self.times.phase("block_forward", self.device), torch.no_grad(), self._precision():
                    for i, (hidden, kwargs) in enumerate(self.inputs):
                        batch[0] = i
                        try:
                            self.block(hidden, **kwargs)
                        except StopForward:
                            pass
            finally:
                for handle in handles:
                    handle.remove()
            for g in stage:
                on_group(g)
        if keep_outputs:
            self.forward_all()

    def forward_all(self) -> Inputs:
        """Plain forward of every batch (no hooks); the outputs become :attr:`outputs`."""
        with self.times.phase("block_forward", self.device), torch.no_grad(), self._precision():
            self.outputs = [(block_output(self.block(h, **kw)), kw) for h, kw in self.inputs]
        return self.outputs


# --------------------------------------------------------------------------------------------
# the walker


class _BlockCall:
    """How a model calls a block class: positional arguments after the hidden states mapped to their
    parameter names (the block is replayed with keywords), ``use_cache=False`` where it is taken."""

    def __init__(self, block: nn.Module) -> None:
        self.kind = type(block).__name__
        self.names: Optional[list[str]] = None  # the forward's parameters that may be passed by name, in order
        try:  # the class's forward: accelerate's hooks wrap the instance's in (*args, **kwargs)
            params = list(inspect.signature(type(block).forward).parameters.values())[1:]  # without self
            self.takes_use_cache = any(p.name == "use_cache" or p.kind is p.VAR_KEYWORD for p in params)
            if not any(p.kind is p.POSITIONAL_ONLY for p in params):
                self.names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        except (TypeError, ValueError):  # no signature to read: as before
            self.takes_use_cache = True

    def split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(hidden_states, keyword arguments to replay the call with)``."""
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if len(args) > 1:
            if self.names is None or len(args) > len(self.names):
                raise ValueError(
                    f"{self.kind} is called with {len(args)} positional arguments that its forward's signature "
                    "does not name; EoRA replays each block with keyword arguments."
                )
            rest.update(zip(self.names[1:], args[1:]))
        rest.pop("past_key_values", None)
        rest.pop("past_key_value", None)
        if self.takes_use_cache:  # GPT-1's blocks take no use_cache
            rest["use_cache"] = False
        return hidden, rest


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[Batch]) -> Inputs:
    """Run the model up to ``first_block`` for each batch; return (hidden_states, kwargs) per batch.

    Arguments the model passes its blocks by position after the hidden states (``block_states``,
    older code's ``attention_mask``) are kept under their parameter names, so every later call of a
    block passes them as keywords. The keyword arguments are block 0's: :func:`capture_inputs` also
    reads every other block's (a sliding-window model's masks and rotary tables differ by layer)."""
    return capture_inputs(model, None, batches, first_block)[0]


#: Per block, per calibration batch: the keyword arguments the model calls the block with (where the
#: capture did not reach a block: those of the last block it reached, which a walk would hand on too).
BlockKwargs = list[list[Optional[dict[str, Any]]]]


def capture_inputs(model: nn.Module, blocks: Optional[nn.ModuleList], batches: list[Batch],
                   first_block: Optional[nn.Module] = None) -> tuple[Inputs, BlockKwargs]:
    """Block 0's inputs per batch, and the keyword arguments of every block per batch.

    Models with layers of several kinds pass each its own arguments (Gemma 2/3 and gpt-oss: a
    sliding-window or a full causal mask, Gemma 3 a local or a global rotary table, Gemma 3n a
    per-layer input), computed before the loop over the blocks. To read them without computing
    the blocks, each block is stood in for by a recorder that hands its hidden states straight on, and
    the last one stops the forward. Arguments that depend on earlier blocks' outputs cannot be read
    this way (where a model's loop fails on what the recorders hand on, the blocks not reached take
    the arguments of the last block reached, whether the walk starts at block 0 or resumes later);
    tensors equal to the block before's are shared, not copied.
    """
    blocks_ = list(blocks) if blocks is not None else [first_block]
    calls = {id(b): _BlockCall(b) for b in blocks_}
    inputs: Inputs = []
    kwargs_of: BlockKwargs = [[None] * len(batches) for _ in blocks_]
    batch_now = [0]

    def recorder(i: int, block: nn.Module) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden, rest = calls[id(block)].split(args, kwargs)
            b = batch_now[0]
            if i == 0:
                inputs.append((hidden.detach(), rest))
            kwargs_of[i][b] = _shared(rest, kwargs_of[i - 1][b] if i else None)
            if i == len(blocks_) - 1:
                raise StopForward
            return hidden  # the next block's hidden states do not matter here, only its arguments

        return forward

    saved = [b.__dict__.get("forward") for b in blocks_]  # accelerate's hooks put a forward on the instance
    device = device_of(model)
    try:
        for i, block in enumerate(blocks_):
            block.forward = recorder(i, block)
        with torch.no_grad():
            for b, batch in enumerate(batches):
                batch_now[0] = b
                try:
                    model(**to_device(batch, device), use_cache=False)
                except StopForward:
                    pass
                except Exception:
                    if len(inputs) != b + 1:  # before block 0: the model's own failure
                        raise
                    # past block 0, a loop that wants another output than the hidden states handed on (a
                    # tuple): the blocks not reached keep the arguments the walk has (block 0's)
                    logger.debug("block arguments read up to a failure in batch %d", b, exc_info=True)
                if len(inputs) != b + 1:
                    raise RuntimeError("The first decoder block was never called; is this a decoder model?")
    finally:
        for block, forward in zip(blocks_, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    for i in range(1, len(blocks_)):  # blocks not reached: the last reached block's arguments
        kwargs_of[i] = [kw if kw is not None else before for kw, before in zip(kwargs_of[i], kwargs_of[i - 1])]
    return inputs, kwargs_of


def with_block_kwargs(inputs: Inputs, own: Optional[list[Optional[dict[str, Any]]]]) -> Inputs:
    """``inputs`` with each batch's keyword arguments replaced by the block's own (one row of
    :func:`capture_inputs`' :data:`BlockKwargs`) where they were read; the others kept."""
    if own is None:
        return inputs
    return [(h, kw if mine is None else mine) for (h, kw), mine in zip(inputs, own)]


def _shared(kwargs: dict[str, Any], before: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``kwargs`` with every tensor equal to the same argument of ``before`` replaced by that one (the
    same mask or rotary table recomputed per block is then held once)."""
    if before is None:
        return kwargs
    return {k: before[k] if k in before and _same(v, before[k]) else v for k, v in kwargs.items()}


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


class BlockWalker:
    """Visit decoder blocks in order with their calibration inputs (see the module doc).

    ``device``: where blocks compute. ``None`` keeps every block where it is (the model's own
    placement, accelerate dispatch included). A device while the model sits on the CPU moves
    each block there for its visit and back afterwards (offload); the activations stay on it.
    ``checkpoint``: save the next block's inputs after each block (see :meth:`visits`).
    ``autocast``: a half-precision dtype the block forwards run in (:func:`torch.autocast`; the
    consumers accumulate covariances in float32 regardless), or None for the model's own dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: list[Batch],
        device: Union[str, torch.device, None] = None,
        times: PhaseTimes = NO_TIMES,
        checkpoint: Any = None,
        autocast: Optional[torch.dtype] = None,
    ) -> None:
        self.model = model
        self.autocast = autocast
        self.blocks = blocks
        self.batches = batches
        self.device = torch.device(device) if device is not None else None
        self.times = times
        self.checkpoint = checkpoint
        self.block_kwargs: Optional[BlockKwargs] = None  # every block's own arguments, from first_inputs()
        self.current: Optional[int] = None  # the block being placed or visited (error messages)

    def offloading(self, block: nn.Module) -> bool:
        """Whether ``block`` is moved to :attr:`device` for its visit."""
        if self.device is None or has_offload_hooks(block):
            return False
        return device_of(block) != self.device

    @contextmanager
    def _placed(self, block: nn.Module) -> Iterator[torch.device]:
        if not self.offloading(block):
            yield device_of(block)
            return
        home = device_of(block)
        try:  # a move that fails half-way (out of memory) is undone too
            with self.times.phase("offload_moves", self.device):
                block.to(self.device)
            yield self.device
        finally:
            with self.times.phase("offload_moves", self.device):
                block.to(home)

    def first_inputs(self) -> Inputs:
        """Block 0's inputs per batch; every block's own keyword arguments are kept for the walk."""
        with self.times.phase("capture_inputs", self.device):
            inputs, self.block_kwargs = capture_inputs(self.model, self.blocks, self.batches)
        return inputs


    def visits(self, last: int, start: int = 0, inputs: Optional[Inputs] = None) -> Iterator[BlockVisit]:
        """Yield a :class:`BlockVisit` for blocks ``start..last``; between visits, the visit's
        :attr:`~BlockVisit.outputs` (computed by the consumer, or here by a plain forward) feed
        the next block. ``inputs`` are block ``start``'s inputs (captured when None)."""
        if inputs is None:
            if start != 0:
                raise ValueError("inputs are needed to start a walk after block 0")
            inputs = self.first_inputs()
        for idx in range(start, last + 1):
            self.current = idx
            block = self.blocks[idx]
            with self._placed(block) as device:
                with self.times.phase("activation_moves", device):
                    own = self.block_kwargs[idx] if self.block_kwargs is not None else None
                    moved = [(to_device(h, device), to_device(kw, device)) for h, kw in with_block_kwargs(inputs, own)]
                visit = BlockVisit(idx, block, moved, device, self.times, autocast=self.autocast)
                yield visit
                if idx < last:
                    outputs = visit.outputs if visit.outputs is not None else visit.forward_all()
                    inputs = outputs
                    if self.checkpoint is not None:
                        with self.times.phase("checkpoint", device):
                            self.checkpoint.save_inputs(idx + 1, [h for h, _ in inputs])
                if self.checkpoint is not None:  # the block's factors (saved by the consumer) and next inputs are in place
                    self.checkpoint.commit(idx)
                del visit, moved
