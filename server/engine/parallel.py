"""Tensor parallelism inside one pod: one process per GPU, the scheduler on rank 0.

``--tensor-parallel-size N`` (``resources.gpus: N``) shards the model over N
processes. Rank 0 is the server process: front ends, scheduler, sampling. It
starts ranks 1..N-1 as child processes (``python -m autoglm_server.engine.parallel``)
and all of them join one ``torch.distributed`` process group (NCCL on CUDA,
gloo on CPU, which is what CI tests).

Sharding (:func:`shard_model`, Megatron-style, in place on the Hugging Face
model):

- attention by heads: ``q_proj``/``k_proj``/``v_proj`` keep their rank's
  output rows (column parallel), ``o_proj`` its input columns (row parallel);
  with fewer KV heads than ranks (GLM-4's 2 KV heads above TP=2) each rank
  keeps the one KV head its query heads read, so KV heads are replicated;
- the MLP the same way: ``gate_proj``/``up_proj`` (or GLM's fused
  ``gate_up_proj``, gate and up halves sharded separately) column parallel,
  ``down_proj`` row parallel;
- an all-reduce (sum) after every row-parallel layer (``o_proj``, ``down_proj``),
  as an opaque custom op (``autoglm::tp_all_reduce``) so torch.compile and
  CUDA graphs keep it as one call; a row-parallel bias is added on rank 0 only;
- embeddings and the LM head are replicated (every rank computes the same
  logits; only rank 0's are used);
- the config's head counts become the rank's, so the runner sizes the paged
  KV cache by the rank's KV heads: the cache is sharded too.

Lockstep: rank 0 runs the scheduler; before each step it sends the step's
:class:`SchedulerOutput` down a pipe to every other rank (``stdin``, pickled,
length-prefixed), then runs the step itself. Every rank runs the same runner
code on the same step, so the collectives inside the forward pass line up.
The KV cache's block count is the minimum over the ranks.

Failure: any rank's failure ends the whole server with a non-zero exit, so
Kubernetes restarts the pod:

- rank 0 watches each child process; one that exits ends the engine
  (``EngineFatalError``, exit 1), and a timer hard-exits the process if the
  drain does not finish (a collective that waits on a dead peer);
- a failed step on rank 0 is fatal in TP (the ranks may be out of step);
- the children watch rank 0: the pipe's end-of-file or a changed parent pid
  ends them;
- collectives time out after ``AUTOGLM_TP_TIMEOUT_S`` (600 s), the bound for a
  rank that hangs without dying.

Why not DTensor / transformers' ``tp_plan``: the packed, paged attention needs
plain local tensors; GLM-4's KV heads need replication above TP=2, which the
plans don't do; and a plain all-reduce op is what CUDA graphs capture.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

import torch
import torch.distributed as dist

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "AUTOGLM_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
HARD_EXIT_S = 10.0  # after a rank died: how long the drain may take before os._exit(1)
_HEADER = struct.Struct("<Q")


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or a collective failed."""


# -- sharding (pure shapes, then in-place on the model) -------------------------------------------


def check_shardable(hf_config: Any, tp: int) -> None:
    """Refuse (ModelLoadError naming the setting) a model that N ranks can't split."""
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    inter = int(hf_config.intermediate_size)
    if heads % tp:
        raise ModelLoadError(
            f"tensor_parallel_size: {tp} does not divide num_attention_heads {heads}"
        )
    if kv_heads % tp and tp % kv_heads:
        raise ModelLoadError(
            f"tensor_parallel_size: {tp} and num_key_value_heads {kv_heads} must divide one another"
        )
    if inter % tp:
        raise ModelLoadError(
            f"tensor_parallel_size: {tp} does not divide intermediate_size {inter}"
        )


def kv_head_range(rank: int, tp: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(first KV head, count) that ``rank`` keeps. Pure.

    With at least as many KV heads as ranks, each rank keeps its own slice;
    with fewer, the one KV head its query heads belong to (replicated).
    """
    if kv_heads >= tp:
        per = kv_heads // tp
        return rank * per, per
    q_per_rank = heads // tp
    group = heads // kv_heads
    return (rank * q_per_rank) // group, 1


def _rows(linear: torch.nn.Linear, start: int, count: int) -> None:
    """Keep output rows [start, start + count) (column parallel)."""
    w = linear.weight
    linear.weight = torch.nn.Parameter(w.data[start : start + count].clone(), requires_grad=False)
    if linear.bias is not None:
        b = linear.bias.data[start : start + count].clone()
        linear.bias = torch.nn.Parameter(b, requires_grad=False)
    linear.out_features = count


def _cols(linear: torch.nn.Linear, start: int, count: int, rank: int) -> None:
    """Keep input columns [start, start + count) (row parallel; the bias on rank 0 only)."""
    w = linear.weight
    linear.weight = torch.nn.Parameter(
        w.data[:, start : start + count].clone(), requires_grad=False
    )
    if linear.bias is not None and rank != 0:
        linear.bias = torch.nn.Parameter(torch.zeros_like(linear.bias.data), requires_grad=False)
    linear.in_features = count
    linear.register_forward_hook(_reduce_hook)


def _reduce_hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    reduced: torch.Tensor = tp_all_reduce(output)
    return reduced


@torch.library.custom_op("autoglm::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel ranks (the default process group)."""
    out = x.contiguous().clone()
    dist.all_reduce(out)
    return out


@tp_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def shard_model(model: torch.nn.Module, tp: int, rank: int | None = None) -> None:
    """Shard ``model``'s decoder layers in place for ``rank`` of ``tp`` (see the module doc).

    ``rank`` defaults to this process's rank in the default process group.
    Works on any device, the meta device included.
    """
    if rank is None:
        rank = dist.get_rank()
    config: Any = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    inter = int(config.intermediate_size)
    check_shardable(config, tp)
    q_local = heads // tp
    kv_start, kv_local = kv_head_range(rank, tp, heads, kv_heads)
    i_local = inter // tp
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    for layer in decoder.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), torch.nn.Linear):
                raise ModelLoadError(
                    f"tensor_parallel_size: {type(model).__name__} has no {name} Linear to shard"
                )
        _rows(attn.q_proj, rank * q_local * head_dim, q_local * head_dim)
        _rows(attn.k_proj, kv_start * head_dim, kv_local * head_dim)
        _rows(attn.v_proj, kv_start * head_dim, kv_local * head_dim)
        _cols(attn.o_proj, rank * q_local * head_dim, q_local * head_dim, rank)
        mlp = layer.mlp
        if isinstance(getattr(mlp, "gate_up_proj", None), torch.nn.Linear):
            fused = mlp.gate_up_proj
            w = fused.weight.data
            gate = w[rank * i_local : (rank + 1) * i_local]
            up = w[inter + rank * i_local : inter + (rank + 1) * i_local]
            fused.weight = torch.nn.Parameter(torch.cat([gate, up]), requires_grad=False)
            if fused.bias is not None:
                b = fused.bias.data
                fused.bias = torch.nn.Parameter(
                    torch.cat(
                        [
                            b[rank * i_local : (rank + 1) * i_local],
                            b[inter + rank * i_local :][:i_local],
                        ]
                    ),
                    requires_grad=False,
                )
            fused.out_features = 2 * i_local
        elif isinstance(getattr(mlp, "gate_proj", None), torch.nn.Linear):
            _rows(mlp.gate_proj, rank * i_local, i_local)
            _rows(mlp.up_proj, rank * i_local, i_local)
        else:
            raise ModelLoadError(
                f"tensor_parallel_size: {type(model).__name__}'s MLP is not gate/up/down"
            )
        _cols(mlp.down_proj, rank * i_local, i_local, rank)
    # The runner sizes the KV cache and reshapes heads from the config: make it the rank's.
    config.head_dim = head_dim
    config.num_attention_heads = q_local
    config.num_key_value_heads = kv_local
    config.intermediate_size = i_local
    logger.info(
        "rank %d/%d: %d query heads, KV heads %d..%d, %d MLP columns per layer",
        rank,
        tp,
        q_local,
        kv_start,
        kv_start + kv_local - 1,
        i_local,
    )


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:<rank>`` on CUDA (one GPU per process), else unchanged."""
    if device.type != "cuda":
        return device
    index = dist.get_rank() if dist.is_initialized() else 0
    return torch.device("cuda", index)


def collective_timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    seconds = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    return datetime.timedelta(seconds=seconds)


def _backend(cfg: Any) -> str:
    from .loader import resolve_device

    return "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"


# -- the control pipe ------------------------------------------------------------------------------


def _send(pipe: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_HEADER.pack(len(data)) + data)
    pipe.flush()


def _recv(pipe: IO[bytes]) -> Any:
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # rank 0 is gone
    (size,) = _HEADER.unpack(header)
    data = pipe.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def _for_workers(sched: Any) -> Any:
    """The step without what only rank 0 uses (compiled grammars don't pickle)."""
    seqs = [
        replace(s, params=replace(s.params, grammar=None)) if s.params.grammar is not None else s
        for s in sched.seqs
    ]
    return replace(sched, seqs=seqs)


def _agree_num_blocks(runner: Any) -> int:
    """The minimum KV block count over the ranks (each sized its own cache)."""
    t = torch.tensor([runner.num_blocks], dtype=torch.int64, device=runner.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _loader_ref(loader: Callable[[Any], Any] | None) -> tuple[str, str, str | None]:
    """How the other ranks find the engine's loader: (module, name, file of a script)."""
    if loader is None:
        return ("autoglm_server.engine.loader", "load_model", None)
    module = loader.__module__
    file = getattr(sys.modules.get(module), "__file__", None)
    # A script's function (a benchmark's loader) is found by its file: the other
    # ranks start with only the package on their path.
    ours = module.startswith("autoglm_server.")
    return (module, loader.__qualname__, None if ours else file)


def _resolve_loader(ref: tuple[str, str, str | None]) -> Callable[[Any], Any]:
    """The loader named by :func:`_loader_ref` (a benchmark script's own, say)."""
    import importlib
    import importlib.util

    module_name, name, file = ref
    if file is None:
        module = importlib.import_module(module_name)
    else:
        spec = importlib.util.spec_from_file_location("autoglm_tp_loader", file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["autoglm_tp_loader"] = module
        spec.loader.exec_module(module)
    loader: Callable[[Any], Any] = getattr(module, name)
    return loader


# -- rank 0 ----------------------------------------------------------------------------------------


class TensorParallelGroup:
    """Rank 0's side: starts the other ranks, watches them, sends them each step."""

    def __init__(
        self,
        cfg: Any,
        on_failure: Callable[[BaseException], None],
        loader: Callable[[Any], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.loader = _loader_ref(loader)
        self.world = int(cfg.tensor_parallel_size)
        self.on_failure = on_failure
        self.backend = _backend(cfg)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._failed = False
        self._store: Any = None
        self._send_lock = threading.Lock()
        self._hard_exit: threading.Timer | None = None

    def spawn(self) -> None:
        """Start ranks 1..N-1. Call from a long-lived thread (the event loop's)."""
        timeout = collective_timeout()
        self._store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, self.world, is_master=True, timeout=timeout, wait_for_workers=False
        )
        env = dict(os.environ, PYTHONSAFEPATH="1")
        for rank in range(1, self.world):
            argv = [
                sys.executable,
                "-m",
                "autoglm_server.engine.parallel",
                str(rank),
                str(self.world),
                str(self._store.port),
                str(os.getpid()),
            ]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env)
            self.procs.append(proc)
            assert proc.stdin is not None
            _send(proc.stdin, ("init", self.cfg, self.backend, self.loader))
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"tp-watch-{rank}", daemon=True
            ).start()
        logger.info(
            "tensor parallel: started %d ranks (%s, store port %d)",
            self.world - 1,
            self.backend,
            self._store.port,
        )

    def connect(self) -> None:
        """Join the process group as rank 0 (blocks until every rank has joined)."""
        dist.init_process_group(
            self.backend,
            store=self._store,
            rank=0,
            world_size=self.world,
            timeout=collective_timeout(),
        )
        if self.backend == "nccl":
            torch.cuda.set_device(0)

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._stopping:
            return
        self.fail(RankFailure(f"tensor-parallel rank {rank} exited with code {code}"))

    def fail(self, exc: BaseException) -> None:
        """A rank is gone: end the engine, and the process if the drain hangs."""
        if self._failed:
            return
        self._failed = True
        logger.critical("%s; the server exits so the pod restarts", exc)
        self._hard_exit = threading.Timer(HARD_EXIT_S, _hard_exit)
        self._hard_exit.daemon = True
        self._hard_exit.start()
        self.on_failure(exc)

    def send(self, message: Any) -> None:
        with self._send_lock:
            for proc in self.procs:
                assert proc.stdin is not None
                _send(proc.stdin, message)

    def wrap(self, runner: Any) -> TensorParallelRunner:
        return TensorParallelRunner(runner, self)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Tell the ranks to exit; kill the ones that don't. Ends the hard-exit timer."""
        self._stopping = True
        with contextlib.suppress(OSError, ValueError):  # a rank that is gone closed its pipe
            self.send(("stop",))
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("tensor parallel: a rank did not stop; killing it")
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._hard_exit is not None:
            self._hard_exit.cancel()


def _hard_exit() -> None:
    logger.critical("tensor parallel: the drain did not finish; exiting now")
    logging.shutdown()
    os._exit(1)


# Runner methods that start or finish a step without going through execute():
# launch/collect pipeline a step with the next one, feeding decode inputs from the
# device (each rank's own sampled tokens); in TP every step is sent and run whole.
_UNSENT_STEP_METHODS = frozenset({"launch", "collect"})


class TensorParallelRunner:
    """Rank 0's runner: sends each step to the other ranks, then runs it here.

    Any failure is fatal (``EngineFatalError``): after a failed collective the
    ranks may be out of step, and only a restart puts them back together.
    """

    def __init__(self, runner: Any, group: TensorParallelGroup) -> None:
        self._runner = runner
        self._group = group
        self.num_blocks = _agree_num_blocks(runner)

    def __getattr__(self, name: str) -> Any:
        if name in _UNSENT_STEP_METHODS:
            # Not offered: the engine then runs every step through execute(), which
            # reaches the other ranks first.
            raise AttributeError(name)
        return getattr(self._runner, name)

    def _fatal(self, exc: Exception) -> Exception:
        from .engine import EngineFatalError

        error = EngineFatalError(f"tensor-parallel step failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    def execute(self, sched: Any) -> Any:
        try:
            self._group.send(("step", _for_workers(sched)))
            return self._runner.execute(sched)
        except Exception as exc:
            raise self._fatal(exc) from exc

    def warmup(self) -> None:
        self._group.send(("warmup",))
        self._runner.warmup()


# -- ranks 1..N-1 ----------------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    """End this rank when rank 0 is gone (it may be blocked in a collective)."""
    while True:
        if os.getppid() != parent_pid:
            logger.critical("tensor parallel: rank 0 is gone; exiting")
            os._exit(1)
        time.sleep(0.2)


def worker_main(argv: list[str]) -> int:
    rank, world, port, parent = (int(a) for a in argv[:4])
    # Rank 0 decides when the ranks stop (a terminal's Ctrl-C reaches the whole
    # process group; a drain must not lose its ranks mid-way).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    pipe = sys.stdin.buffer
    message = _recv(pipe)
    if message is None or message[0] != "init":
        return 1
    _, cfg, backend, loader_ref = message
    timeout = collective_timeout()
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, world, is_master=False, timeout=timeout
    )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    from ..metrics import Metrics
    from .engine import LLMEngine

    loaded = _resolve_loader(loader_ref)(cfg)
    # The same runner construction as rank 0's engine.
    engine = LLMEngine(cfg, metrics=Metrics("rank", "local", enable_gpu=False))
    runner = engine._build_runner(loaded)
    _agree_num_blocks(runner)
    logger.info("rank %d ready", rank)
    while True:
        message = _recv(pipe)
        if message is None:
            logger.critical("rank 0 closed the pipe; exiting")
            return 1
        kind = message[0]
        if kind == "step":
            runner.execute(message[1])
        elif kind == "warmup":
            runner.warmup()
        elif kind == "stop":
            # No destroy_process_group here: it can wait on the other ranks, and
            # rank 0 tears the group down once every rank has exited.
            return 0


if __name__ == "__main__":
    try:
        sys.exit(worker_main(sys.argv[1:]))
    except Exception:
        logger.exception("tensor-parallel rank failed")
        sys.exit(1)
