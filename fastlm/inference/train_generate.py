"""`model.generate` during training on the engine, with the weights being trained (TRL's GRPO generation step).

TRL's `GRPOTrainer` without vLLM generates its completions with
`unwrapped_model.generate(input_ids=, attention_mask=, generation_config=)` on the model it trains, while that model
is in train mode: left-padded prompts, `do_sample=True` with the trainer's temperature / top_p / top_k / min_p /
repetition_penalty, `max_new_tokens=max_completion_length`, every EOS id of the model and tokenizer. It then cuts
each row after its first EOS (tokens after it are masked out of the loss and the reward).

`install_training_generate(model)` puts a `generate` on this model instance (and on the transformers model under a
PEFT wrapper) that serves such calls with the fastlm engine (`engine_generate`: transformers' contract, the same
`[batch, prompt + completion]` tensor, finished rows padded with `pad_token_id`). fastlm installs it on every model
it loads (`attach_inference_methods`); nothing in TRL or transformers is patched.

- When: only while the model is in train mode (a trainer's generation step). In eval mode, and for anything the
  engine does not serve (beam search, logits processors, multimodal inputs, a family without an ArchSpec,
  weights sharded by DeepSpeed ZeRO-3 or FSDP, ...), the call goes to the generate that was there before, with a
  one-line notice naming the reason.
- Weights: one engine per model, kept between steps. LoRA adapters are copied into the engine's fused buffers
  before every call (`refresh_adapters`). When base weights train (full fine-tuning) the engine reads them from the
  live modules (no fused copies; CUDA graphs replay on the parameters' own storage, which optimizers update in
  place). A parameter whose storage was replaced (`param.data = ...`, a dtype cast) rebuilds the engine.
- Mode: the engine runs with dropout off (as vLLM generates in TRL); every module's training flag, gradient
  checkpointing and `use_cache` are as they were afterwards.

`remove_training_generate(model)` restores exactly what was there and frees the engine.
"""
from __future__ import annotations

import logging
import types
from contextlib import contextmanager

from ..state import base_model_of
from .engine import Engine, UnsupportedModelError, adapter_state_key
from .generate import engine_generate

logger = logging.getLogger(__name__)

_SAVED = "_fastlm_training_generate"  # per target: (had an own generate, that generate, our wrapper)
_STATE = "_fastlm_training_engine"  # on the transformers model: the TrainingEngine shared by its targets
GENERATE_POSITIONAL = ("generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                       "synced_gpus", "assistant_model", "streamer")


def positional_to_kwargs(args: tuple, kwargs: dict) -> dict:
    """transformers' generate(inputs, generation_config, logits_processor, ...) positional arguments as keywords."""
    if len(args) > len(GENERATE_POSITIONAL):
        raise TypeError(f"generate() takes at most {len(GENERATE_POSITIONAL) + 1} positional arguments")
    return dict(zip(GENERATE_POSITIONAL, args), **kwargs)


def trains_base_weights(model) -> bool:
    """True when a decoder-layer weight other than a LoRA adapter trains (full fine-tuning): the engine must not
    serve it from fused copies."""
    return any(p.requires_grad and ".layers." in n and "lora_" not in n
               for n, p in base_model_of(model).named_parameters())


class TrainingEngine:
    """The engine used by the training-time generate of one model, current with its weights at every call.

    fuse: None = fused q/k/v and gate/up copies where they stay exact (on CUDA, when only adapters train; base
    weights that train are read from the modules), False = never, True = always (when base weights train the engine
    is rebuilt before every call: exact but slow, a check of the fused path)."""

    def __init__(self, fuse: bool | None = None):
        if fuse not in (None, True, False):
            raise ValueError(f"fuse={fuse!r}: use None (automatic), True or False")
        self.fuse = fuse
        self.engine: Engine | None = None
        self.key = None
        self.announced = False
        self.busy = False  # inside a call: a nested generate (a PEFT wrapper calling its model) passes through

    def __deepcopy__(self, memo):  # a copied model builds its own engine (CUDA graphs cannot be copied)
        return TrainingEngine(self.fuse)

    def __getstate__(self):
        return {**self.__dict__, "engine": None, "key": None, "busy": False}

    def __call__(self, model, slots: int, max_len: int) -> Engine:
        base = base_model_of(model)
        sharded = _sharded_weights(base)
        if sharded:
            raise UnsupportedModelError(f"the weights are sharded by {sharded}; the engine reads whole weights")
        full = trains_base_weights(model)
        fuse = (False if full else None) if self.fuse is None else self.fuse
        key = (adapter_state_key(model), fuse, tuple(p.data_ptr() for p in base.parameters()))
        old = self.engine
        if (old is None or old.max_slots < slots or old.max_len < max_len or key != self.key
                or (fuse and full)):
            want_slots = max(1 << max(0, slots - 1).bit_length(), old.max_slots if old is not None else 0)
            want_len = max(-(-max_len // 256) * 256, old.max_len if old is not None else 0)
            limit = int(getattr(base.config, "max_position_embeddings", 0) or 0)
            if limit:
                want_len = max(min(want_len, limit), max_len)
            self.engine = old = None  # free the old cache before allocating the new one
            try:
                self.engine = Engine(model, max_slots=want_slots, max_len=want_len, fuse=fuse)
            except UnsupportedModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - a layout the engine does not read: transformers serves it
                raise UnsupportedModelError(f"the engine could not be built for this model "
                                            f"({type(exc).__name__}: {str(exc)[:200]})") from exc
            self.key = key
        else:
            self.engine.view.refresh_adapters()
        if not self.announced:
            self.announced = True
            how = ("base weights rebuilt into fused copies every call" if full and fuse else
                   "base weights read live" if full else "LoRA adapters refreshed every call")
            logger.warning("fastlm: generation during training runs on the fastlm engine (%s); "
                           "fastlm.inference.train_generate.remove_training_generate(model) turns it off", how)
        return self.engine


def _sharded_weights(model) -> str | None:
    """Who shards the parameters (DeepSpeed ZeRO-3, FSDP's DTensors), or None: the engine keeps references to
    whole weights between calls, which sharded ones are not outside their gather."""
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return "FSDP (DTensor parameters)"
    return None


@contextmanager
def _eval_mode(model):
    """Dropout off for the engine's generation; `restore()` inside gives the caller's flags back (for a fallback
    to transformers' generate, which then runs as it would have without the hook)."""
    flags = [(m, m.training) for m in model.modules()]

    def put(values):
        for (m, _), t in zip(flags, values):
            m.training = t

    model.eval()
    try:
        yield lambda: put([t for _, t in flags]), lambda: put([False] * len(flags))
    finally:
        put([t for _, t in flags])


def generate_targets(model):
    """The instances whose generate fastlm replaces: the model and, under a PEFT wrapper, its transformers model."""
    base = base_model_of(model)
    return [model] if base is model else [model, base]


def install_training_generate(model, fuse: bool | None = None):
    """Serve `model.generate` calls made in train mode with the engine (see the module docstring). Idempotent; call
    it with the PEFT wrapper to cover both the wrapper and its transformers model. Returns the model."""
    base = base_model_of(model)
    state = base.__dict__.get(_STATE)
    if state is None or (fuse is not None and state.fuse != fuse):
        state = TrainingEngine(fuse)
        base.__dict__[_STATE] = state
    for target in generate_targets(model):
        saved = target.__dict__.get(_SAVED)
        if saved is not None and target.__dict__.get("generate") is saved[2]:
            continue  # ours is in place
        had = "generate" in target.__dict__
        own = target.__dict__.get("generate")
        wrapper = types.MethodType(training_generate, target)
        target.__dict__[_SAVED] = (had, own, wrapper)
        object.__setattr__(target, "generate", wrapper)
    return model


def _previous_generate(target):
    """The generate `target` had before the hook, bound to `target` (looked up at call time, so that a deep copy of
    the model calls its own, not the original's)."""
    had, own, _ = target.__dict__[_SAVED]
    return own if had else types.MethodType(type(target).generate, target)


def training_generate(self, inputs=None, *args, **kwargs):
    """transformers' generate; in train mode served by the fastlm engine (fastlm.inference.train_generate)."""
    original = _previous_generate(self)
    state = base_model_of(self).__dict__.get(_STATE)
    if state is None or state.busy or not self.training:
        return original(inputs, *args, **kwargs)
    kwargs = positional_to_kwargs(args, kwargs)
    state.busy = True
    try:
        with _eval_mode(self) as (restore, evaluate):
            def fallback(*a, **k):
                restore()
                try:
                    return original(*a, **k)
                finally:
                    evaluate()

            return engine_generate(self, fallback, inputs, engine_for=state, **kwargs)
    finally:
        state.busy = False


training_generate._fastlm_training_generate = True


def is_training_generate(method) -> bool:
    """Whether a (bound) generate is the training-time one."""
    return bool(getattr(getattr(method, "__func__", method), "_fastlm_training_generate", False))


def remove_training_generate(model):
    """Give back the generate each target had before `install_training_generate` and free the engine."""
    for target in generate_targets(model):
        saved = target.__dict__.pop(_SAVED, None)
        if saved is None:
            continue
        had, own, wrapper = saved
        if target.__dict__.get("generate") is wrapper:  # else someone replaced ours since: leave theirs
            put_back_generate(target, had, own)
    base_model_of(model).__dict__.pop(_STATE, None)
    return model


def put_back_generate(target, had: bool, own) -> None:
    """Restore an instance's generate: its own attribute when it had one, else the class method."""
    if had:
        object.__setattr__(target, "generate", own)
    else:
        target.__dict__.pop("generate", None)


def release_training_engine(model) -> None:
    """Free the training-time engine (its KV cache and fused copies); the next train-mode generate builds a new one."""
    state = base_model_of(model).__dict__.get(_STATE)
    if state is not None:
        state.engine, state.key = None, None


def training_generate_installed(model) -> bool:
    saved = model.__dict__.get(_SAVED)
    return saved is not None and model.__dict__.get("generate") is saved[2]


def training_engine(model) -> TrainingEngine | None:
    """The model's TrainingEngine (its current `engine`), or None when the hook is not installed."""
    return base_model_of(model).__dict__.get(_STATE)
