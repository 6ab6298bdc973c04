"""An ESTIMATE of peak GPU memory per device for a recipe, from the model's config alone (no weights are loaded).

Parameters are counted exactly: the model is built on the meta device from its config (no memory, no weights) and the
recipe's tuning strategy is applied to it (`modeling.strategies.apply_strategy`), so LoRA targets, trained parts and
modules kept in 16 bit are the ones a real run gets. Bytes per parameter follow the precision each one trains at:
4-bit NF4 for the language model's frozen linear weights under QLoRA (0.5 byte plus one quantization constant per 64
weights), the load dtype for the rest, float32 for LoRA weights (peft upcasts them), and for every trained parameter its
gradient and the optimizer's states (AdamW: two per parameter).

Activations are the estimate's soft part. Bytes kept for the backward pass per token and per decoder layer were
measured with `torch.autograd.graph.saved_tensors_hooks` on transformers 5.23's Qwen2.5-VL decoder layer (bf16, sdpa;
no attention matrix is stored) at several widths, and fitted as `a*hidden + b*intermediate + c*kv_width`:

    LoRA, no dropout      36.6 h + 10 i + 4 kv      LoRA with dropout   54.6 h + 14 i + 4 kv
    trained in full       23.2 h +  8 i + 4 kv      gradient checkpointing: 4 h (5 h in full) per layer, plus one
                                                     layer recomputed at a time

Logits add about 12 bytes per token per vocabulary entry at their peak (bf16 logits, their float32 upcast and
log-softmax for the loss). The vision tower stores activations only when it trains (its patches are 4 per image token
for Qwen-VL), checkpointed or not by `vision_gradient_checkpointing` (default: as `gradient_checkpointing`); encoding
also holds one block's working activations for the patches encoded at once (a batch's images, or
`vision_chunk_images` of them). The peak is taken at the configured batch size with every row padded to the longest
row, or at `max_tokens_per_batch` tokens in one packed sequence, under DDP (ZeRO-3 and FSDP shard weights and optimizer
states over the devices; this does not).

Methods that generate or keep a reference (`method_load`): GRPO generates `num_generations` completions per prompt for
its whole generation batch (per device: `per_device_train_batch_size` x `steps_per_generation` sequences of prompt +
`max_completion_length` tokens) without a graph, holding the KV cache (2 x layers x kv width per token) and each
sequence's last-position logits; that pass and the training pass (which stores activations) do not run at once, so the
peak takes the larger. A reference that is not the policy with its adapter disabled costs its weights: a full
fine-tune's frozen copy of the model, or `reference: sft_adapter`'s frozen copy of the adapter. KTO's KL batch (each
row with its neighbour's completion) runs without a graph before the policy's pass: it adds no stored activations.

Memory levers: `activation_offloading` keeps the stored activations in CPU memory, so the GPU holds about two layers'
worth at a time (the rest is named in a note, as host memory); Liger's layer kernels store somewhat less per layer,
which is not counted (the estimate stays an upper bound for them).
"""

from dataclasses import dataclass, field
from typing import Any

import torch


GIB = 1024**3
NF4_BLOCK = 64  # weights per quantization constant
LOGIT_BYTES = 12  # per token per vocabulary entry, at the loss
OVERHEAD_BYTES = 1 * GIB  # CUDA context and allocator slack, roughly
# Bytes kept per token per layer, as multiples of (hidden, intermediate, kv width) for 2-byte activations.
ACTIVATION_COEFFICIENTS = {
    "lora": (36.6, 10.0, 4.0),
    "lora_dropout": (54.6, 14.0, 4.0),
    "full": (23.2, 8.0, 4.0),
}
CHECKPOINTED_COEFFICIENT = {"lora": 4.0, "lora_dropout": 4.0, "full": 5.0}
# Optimizer states per trained parameter, in bytes per byte of the parameter's dtype (AdamW: exp_avg, exp_avg_sq).
OPTIMIZER_STATE_FACTORS = {"adamw": 2.0, "adam": 2.0, "sgd": 0.0, "adafactor": 0.05, "lion": 1.0, "rmsprop": 1.0}


@dataclass(frozen=True)
class LayerShape:
    layers: int
    hidden: int
    intermediate: int
    kv_width: int


@dataclass
class MemoryEstimate:
    """Bytes per device. `lines()` is the labelled text the preflight prints."""

    weights: int
    weights_by_precision: dict[str, int]
    trainable_parameters: int
    training_states: int  # trained weights' gradients and optimizer states (their weights are in `weights`)
    activations_checkpointed: int
    activations_full: int
    logits: int
    tokens: int  # batch x longest row, or the packing budget
    gradient_checkpointing: bool
    vision_encoding: int = 0  # one vision block's working activations for the patches encoded at once
    generation: int = 0  # GRPO: the generation batch's KV cache and last-position logits (no graph)
    generation_sequences: int = 0
    reference_weights: int = 0  # a reference that is not the policy with its adapter disabled
    notes: list[str] = field(default_factory=list)

    def peak(self, gradient_checkpointing: bool) -> int:
        activations = self.activations_checkpointed if gradient_checkpointing else self.activations_full
        training_pass = activations + self.logits + self.vision_encoding
        return (
            self.weights
            + self.reference_weights
            + self.training_states
            + max(training_pass, self.generation)  # generation holds no graph and runs before the training pass
            + OVERHEAD_BYTES
        )

    def lines(self) -> list[str]:
        configured = "on" if self.gradient_checkpointing else "off"
        precision = ", ".join(f"{gib(size)} {kind}" for kind, size in self.weights_by_precision.items() if size)
        return [
            "Peak GPU memory per device: an ESTIMATE from the model config (no weights loaded), not a measurement",
            f"  weights                      {gib(self.weights):>10}   ({precision})",
            f"  gradients + optimizer        {gib(self.training_states):>10}   "
            f"({self.trainable_parameters:,} trained parameters)",
            f"  activations, checkpointing   {gib(self.activations_checkpointed):>10}   "
            f"({self.tokens:,} tokens per micro-batch)",
            f"  activations, no checkpoint.  {gib(self.activations_full):>10}",
            f"  logits and loss              {gib(self.logits):>10}",
            f"  vision encoding (transient)  {gib(self.vision_encoding):>10}",
            *(
                [
                    f"  generation: KV cache, logits {gib(self.generation):>10}   ({self.generation_sequences:,} "
                    "sequences at once, no graph; the peak takes the larger of this and the training pass)"
                ]
                if self.generation_sequences
                else []
            ),
            *([f"  reference weights            {gib(self.reference_weights):>10}"] if self.reference_weights else []),
            f"  CUDA context, allocator      {gib(OVERHEAD_BYTES):>10}",
            f"  total with gradient checkpointing {gib(self.peak(True))}, without {gib(self.peak(False))} "
            f"(configured: {configured})",
            *(f"  note: {note}" for note in self.notes),
        ]


def gib(size: float) -> str:
    """Bytes as GiB, or MiB below one GiB (tiny models)."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 1024**2:.1f} MiB"


def _dtype(name: str | None) -> torch.dtype:
    return getattr(torch, name) if name not in (None, "auto") else torch.bfloat16


def _meta_model(config: Any, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _optimizer_factor(optim: str) -> tuple[float, str]:
    optim = str(getattr(optim, "value", optim)).lower()
    if "8bit" in optim:
        return 1.0, optim  # two 1-byte states against 2-byte weights
    for key, factor in OPTIMIZER_STATE_FACTORS.items():
        if optim.startswith(key) or key in optim:
            return factor, optim
    return 2.0, optim


def trained_weight_bytes(model: Any) -> int:
    """Bytes of the trained weights themselves (an adapter's, for a frozen copy of it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _linear_weight_names(model: Any) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _under_any(name: str, prefixes: list[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _text_shape(config: Any) -> LayerShape:
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return LayerShape(text.num_hidden_layers, text.hidden_size, text.intermediate_size, kv_heads * head_dim)


def _vision_shape(config: Any) -> tuple[LayerShape, int] | None:
    """The vision tower's blocks and patches per image token, where the config says."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    layers = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None)
    width = getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", None)
    if not layers or not width:
        return None
    intermediate = getattr(vision, "intermediate_size", None) or int(width * getattr(vision, "mlp_ratio", 4))
    patches_per_token = getattr(vision, "spatial_merge_size", 1) ** 2
    return LayerShape(layers, width, intermediate, width), patches_per_token


def _layer_bytes(shape: LayerShape, kind: str, tokens: int, element_bytes: int) -> tuple[float, float]:
    """(stored by one layer without checkpointing, kept per checkpointed layer) for `tokens` tokens."""
    a, b, c = ACTIVATION_COEFFICIENTS[kind]
    scale = element_bytes / 2  # the coefficients were measured with 2-byte activations
    per_layer = (a * shape.hidden + b * shape.intermediate + c * shape.kv_width) * scale * tokens
    return per_layer, CHECKPOINTED_COEFFICIENT[kind] * shape.hidden * scale * tokens


def _activation_bytes(
    shape: LayerShape, kind: str, tokens: int, element_bytes: int, offloaded: bool = False
) -> tuple[int, int]:
    """(stored with gradient checkpointing, stored without) on the device for `tokens` tokens through every layer;
    offloaded, about two layers' worth stays on the device (one being computed, one in transfer)."""
    per_layer, checkpoint_input = _layer_bytes(shape, kind, tokens, element_bytes)
    layers_on_device = min(2, shape.layers) if offloaded else shape.layers
    return int(checkpoint_input * layers_on_device + per_layer), int(per_layer * layers_on_device)


@dataclass(frozen=True)
class MethodLoad:
    """What a preference or reward method adds to a training pass (`method_load` builds it from a recipe)."""

    generation_sequences: int = 0  # GRPO: sequences generated at once per device
    generation_tokens: int = 0  # prompt + max_completion_length
    reference: str | None = None  # "model": a frozen copy of the model; "adapter": a frozen copy of the adapter
    notes: tuple[str, ...] = ()


def method_load(training_args: Any, plan: Any, policy: Any = None, longest_prompt_tokens: int = 0) -> MethodLoad:
    """GRPO's generation batch and the reference a DPO, GRPO or KTO recipe keeps (`training_args`: its TRL config;
    `policy`: its `PolicyArguments`). SFT: nothing."""
    notes = []
    generations = getattr(training_args, "num_generations", None)
    sequences = tokens = 0
    if generations:
        steps = training_args.steps_per_generation or training_args.gradient_accumulation_steps
        sequences = training_args.per_device_train_batch_size * steps
        tokens = longest_prompt_tokens + (training_args.max_completion_length or 0)
        notes.append(
            f"GRPO: {sequences // generations} prompt(s) x {generations} generations per generation batch, "
            f"{longest_prompt_tokens:,} + {training_args.max_completion_length} tokens each"
        )
    if getattr(training_args, "beta", None) is None:  # SFT: no reference
        return MethodLoad(sequences, tokens, None, tuple(notes))
    if hasattr(training_args, "desirable_weight"):
        notes.append("KTO: the KL batch runs without a graph before the policy's pass (no stored activations)")
    reference = None
    if generations and not training_args.beta:
        notes.append("no reference: beta is 0 (no KL term)")
    elif not plan.strategy.uses_lora:
        reference = "model"
    elif policy is not None and policy.sft_adapter_path is not None and policy.reference in (None, "sft_adapter"):
        reference = "adapter"
    else:
        notes.append("reference: the policy with its adapter disabled, no extra weights")
    return MethodLoad(sequences, tokens, reference, tuple(notes))


def estimate_peak_memory(
    setup: Any,
    training_args: Any,
    longest_row_tokens: int,
    longest_row_image_tokens: int = 0,
    sequences_per_row: int = 1,
    speed: Any = None,
    method: MethodLoad | None = None,
) -> MemoryEstimate:
    """The estimate for a run's `ModelSetup` (config, family, tuning plan) at the recipe's batch size.

    `sequences_per_row`: 2 for preference pairs, whose chosen and rejected sequences run in one forward pass (the
    reference pass runs without a graph and adds no stored activations). `speed`: the recipe's `SpeedArguments`
    (token-budget packing, the vision tower's checkpointing, chunked image encoding). `method`: GRPO's generation
    batch and a reference that costs weights (`method_load`)."""
    from vlm_recipes.modeling.strategies import apply_strategy

    config, family, plan, model_args = setup.config, setup.family, setup.plan, setup.model_args
    dtype = _dtype(model_args.dtype)
    model = apply_strategy(_meta_model(config, dtype, training_args.trust_remote_code), plan, model_args, family)
    linear_weights = _linear_weight_names(model)
    skip = family.quantization_skip_modules()
    state_factor, optim = _optimizer_factor(training_args.optim)

    by_precision = {"4-bit": 0, "16-bit": 0, "32-bit": 0}
    trainable = states = 0
    for name, parameter in model.named_parameters():
        canonical = family.canonical_name(name)
        element = parameter.element_size()
        quantized = (
            model_args.load_in_4bit
            and not parameter.requires_grad
            and name in linear_weights
            and not _under_any(canonical, skip)
        )
        if quantized:
            constant = 1 if model_args.use_bnb_nested_quant else 4
            by_precision["4-bit"] += int(parameter.numel() * (0.5 + constant / NF4_BLOCK))
        else:
            by_precision["32-bit" if element >= 4 else "16-bit"] += parameter.numel() * element
        if parameter.requires_grad:
            trainable += parameter.numel()
            states += int(parameter.numel() * element * (1 + state_factor))

    budget = getattr(speed, "max_tokens_per_batch", None)
    batch = training_args.per_device_train_batch_size * sequences_per_row
    tokens = budget if budget is not None else batch * longest_row_tokens
    # a packed sequence holds at most as many rows' images as rows fit in it
    image_rows = max(1, budget // max(1, longest_row_tokens)) if budget is not None else batch
    element = 4 if dtype == torch.float32 else 2
    lora_kind = "lora_dropout" if model_args.lora_dropout else "lora"
    language_kind = lora_kind if plan.modes["language_model"] == "lora" else "full"
    offloaded = bool(getattr(training_args, "activation_offloading", False))
    checkpointed, full = _activation_bytes(_text_shape(config), language_kind, tokens, element, offloaded)
    notes = []
    if budget is not None:
        notes.append(f"token-budget packing: one sequence of up to {budget:,} tokens per micro-batch, no padding")
    if offloaded:
        stored, _ = _activation_bytes(_text_shape(config), language_kind, tokens, element)
        notes.append(f"activation offloading: about {gib(stored)} of stored activations in CPU memory instead")
    if getattr(training_args, "use_liger_kernel", False):
        notes.append("Liger kernels: their smaller stored activations are not counted (an upper bound)")
    vision = _vision_shape(config)
    vision_trains = plan.modes["vision_tower"] != "frozen" or plan.vision_lora_r is not None
    vision_encoding = 0
    if vision is not None and longest_row_image_tokens:
        shape, patches_per_token = vision
        vision_kind = lora_kind if plan.modes["vision_tower"] == "frozen" else "full"
        patches = image_rows * longest_row_image_tokens * patches_per_token
        chunk = getattr(speed, "vision_chunk_images", None)
        at_once = min(patches, chunk * longest_row_image_tokens * patches_per_token) if chunk else patches
        vision_encoding = int(_layer_bytes(shape, vision_kind, at_once, element)[0])
        if chunk:
            notes.append(f"images encoded {chunk} at a time: at most {at_once:,} patches in the vision tower at once")
        if vision_trains:
            vision_checkpointing = getattr(speed, "vision_gradient_checkpointing", None)
            vision_checkpointed, vision_full = _activation_bytes(shape, vision_kind, patches, element, offloaded)
            if vision_checkpointing is None:  # as the language model
                checkpointed += vision_checkpointed
                full += vision_full
            else:
                stored = vision_checkpointed if vision_checkpointing else vision_full
                checkpointed, full = checkpointed + stored, full + stored
            how = {None: "", True: ", checkpointed", False: ", not checkpointed"}[vision_checkpointing]
            notes.append(f"the vision tower trains: {patches:,} patches of activations included{how}")
    vocab = config.get_text_config().vocab_size
    if "8bit" not in optim and state_factor != 2.0:
        notes.append(f"optimizer '{optim}': states counted as {state_factor:g}x the trained weights")
    method = method or MethodLoad()
    notes.extend(method.notes)
    generation = 0
    if method.generation_sequences:
        kv_cache = 2 * _text_shape(config).layers * _text_shape(config).kv_width * element
        # the cache for every sequence's tokens, and each sequence's last-position logits (16-bit and a float32 copy)
        generation = method.generation_sequences * (method.generation_tokens * kv_cache + vocab * 6)
    reference_weights = {None: 0, "model": sum(by_precision.values()), "adapter": trained_weight_bytes(model)}[
        method.reference
    ]
    return MemoryEstimate(
        weights=sum(by_precision.values()),
        weights_by_precision=by_precision,
        trainable_parameters=trainable,
        training_states=states,
        activations_checkpointed=checkpointed,
        activations_full=full,
        logits=tokens * vocab * LOGIT_BYTES,
        tokens=tokens,
        vision_encoding=vision_encoding,
        generation=generation,
        generation_sequences=method.generation_sequences,
        reference_weights=reference_weights,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        notes=notes,
    )
