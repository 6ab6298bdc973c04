"""Image features computed once per DPO batch (`vlm_recipes.training.image_features`), on tiny models in process: TRL's
DPO loss, the policy's and the reference's per-token log-probabilities and the LoRA gradients are those of the
`pixel_values` batch, with one vision-tower pass per batch instead of two (each image encoded once instead of four
times); and the settings where reuse would not be exact are named."""

import pytest
import torch
from conftest import REPO_ROOT

from vlm_recipes.dpo import DPORecipe, build_trainer
from vlm_recipes.modeling.families import get_family
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.training.image_features import image_feature_reuse_blocker, unwrap_model, with_image_features


LORA_RECIPE = REPO_ROOT / "recipes" / "demo" / "dpo_lora.yaml"
PAIRS = 2  # preference pairs per batch: 4 rows (chosen; rejected)


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    from vlm_recipes.data.synthetic import save_generated_dataset

    return save_generated_dataset(tmp_path_factory.mktemp("prefs"), "rlaif_v", train_rows=4, test_rows=2, seed=0)


def dpo_trainer(model_dir, data_dir, output_dir, *extra):
    """The trainer `vlm_recipes.dpo` builds from the demo recipe (a new LoRA adapter), fp32 on CPU."""
    argv = [
        LORA_RECIPE, "--model_name_or_path", model_dir, "--dataset_name", data_dir, "--output_dir", output_dir,
        "--overwrite_output_dir", "true", "--dtype", "float32", "--bf16", "false", "--use_cpu", "true",
        "--dataset_test_split", "none", "--max_train_samples", PAIRS, *extra,
    ]  # fmt: skip
    return build_trainer(parse_recipe(DPORecipe, [str(value) for value in argv]))


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])


def move_trained_weights(model):
    """What training does to a new adapter: it leaves the identity, so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


class ModelCalls:
    """While open: the per-token log-probabilities of each forward through the trainer's model (policy, then
    reference), and the rows (patches or images) each vision-tower pass encoded."""

    def __init__(self, trainer):
        self.log_probs, self.vision_rows = [], []
        vision_tower = dict(unwrap_model(trainer.model).named_modules())[trainer.family.vision_tower]
        self.hooks = [
            trainer.model.register_forward_hook(lambda _, args, output: self.log_probs.append(output.log_probs)),
            vision_tower.register_forward_hook(self._vision_pass, with_kwargs=True),
        ]

    def _vision_pass(self, _, args, kwargs, output):
        pixels = args[0] if args else next(iter(kwargs.values()))
        self.vision_rows.append(len(pixels))

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for hook in self.hooks:
            hook.remove()


def dpo_step(trainer, batch, reuse_in_trainer=False):
    """TRL's DPO loss on `batch`, the LoRA gradients it gives, and what the forwards computed. The trainer's own reuse
    (`reuse_image_features`, on by default) is off unless asked for, so `batch` reaches TRL's forwards as it is."""
    trainer.model.zero_grad()
    default, trainer.speed.reuse_image_features = trainer.speed.reuse_image_features, reuse_in_trainer
    try:
        with ModelCalls(trainer) as calls:
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
    finally:
        trainer.speed.reuse_image_features = default
    gradients = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), gradients, calls


def reuse(trainer, batch):
    """The batch with its image features, and the rows each vision-tower pass computing them encoded."""
    with ModelCalls(trainer) as calls:
        reused = with_image_features(trainer.model, trainer.family, batch)
    return reused, calls.vision_rows


def assert_same_step(trainer, batch, reused_batch):
    loss, gradients, calls = dpo_step(trainer, batch)
    reused_loss, reused_gradients, reused_calls = dpo_step(trainer, reused_batch)
    assert len(calls.log_probs) == len(reused_calls.log_probs) == 2  # the policy, then the reference
    assert len(calls.vision_rows) == 2 and reused_calls.vision_rows == []  # the features came with the batch
    for log_probs, reused_log_probs in zip(calls.log_probs, reused_calls.log_probs):
        torch.testing.assert_close(reused_log_probs, log_probs, rtol=1e-5, atol=1e-5)
    assert not torch.equal(calls.log_probs[0], calls.log_probs[1])  # the policy has moved off the reference
    torch.testing.assert_close(reused_loss, loss, rtol=1e-5, atol=1e-6)
    assert gradients.keys() == reused_gradients.keys() and any(g.abs().sum() > 0 for g in gradients.values())
    for name, gradient in gradients.items():
        torch.testing.assert_close(reused_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    return calls, reused_calls


@pytest.fixture(scope="module")
def trainers(tiny_models, preference_dir, tmp_path_factory):
    """family -> (trainer with a moved LoRA adapter, its first batch), built on first use."""
    built = {}

    def get(family):
        if family not in built:
            output_dir = tmp_path_factory.mktemp("dpo") / family
            trainer = dpo_trainer(tiny_models(family), preference_dir, output_dir)
            move_trained_weights(trainer.model)
            built[family] = (trainer, first_batch(trainer))
        return built[family]

    return get


# ---------------------------------------------------------------------------------------------------------------------
# The same DPO step, with fewer vision passes


def test_qwen2_5_vl_encodes_each_image_once_with_the_same_loss_and_gradients(trainers):
    trainer, batch = trainers("qwen2_5_vl")
    assert image_feature_reuse_blocker(trainer.model, trainer.family) is None
    reused, vision_rows = reuse(trainer, batch)
    assert "pixel_values" not in reused and "pixel_values" in batch  # the collated batch itself is left as it was
    calls, _ = assert_same_step(trainer, batch, reused)

    patches_per_copy = len(batch["pixel_values"]) // 2  # the collator repeats the images for the rejected rows
    assert calls.vision_rows == [2 * patches_per_copy] * 2  # policy and reference: every image twice in each
    assert vision_rows == [patches_per_copy]  # one pass, each image once

    # The trainer does it itself, by default: one vision pass, the loss of TRL's four.
    trainer_loss, _, trainer_calls = dpo_step(trainer, batch, reuse_in_trainer=True)
    assert trainer_calls.vision_rows == [patches_per_copy]
    torch.testing.assert_close(trainer_loss, dpo_step(trainer, batch)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "smolvlm", "gemma3"])
def test_deepstack_tiled_and_fixed_size_families_give_the_same_loss_and_gradients(trainers, family):
    trainer, batch = trainers(family)
    assert image_feature_reuse_blocker(trainer.model, trainer.family) is None
    reused, vision_rows = reuse(trainer, batch)
    calls, _ = assert_same_step(trainer, batch, reused)
    expected = [calls.vision_rows[0] // 2] if family == "qwen3_vl" else calls.vision_rows[:1]
    assert vision_rows == expected  # Qwen: each image once; the others: the batch's images once (policy + reference)


def test_qwen_images_that_are_not_repeated_are_all_encoded(trainers):
    """A batch whose second half of images differs (not TRL's layout) is encoded whole, and still exact."""
    trainer, batch = trainers("qwen2_5_vl")
    half = len(batch["pixel_values"]) // 2
    changed = {**batch, "pixel_values": batch["pixel_values"].clone()}
    changed["pixel_values"][half:] += 0.25
    reused, vision_rows = reuse(trainer, changed)
    assert vision_rows == [2 * half]
    assert_same_step(trainer, changed, reused)


def test_a_batch_without_images_is_left_alone(trainers):
    trainer, batch = trainers("qwen2_5_vl")
    text_only = {key: value for key, value in batch.items() if key not in ("pixel_values", "image_grid_thw")}
    assert with_image_features(trainer.model, trainer.family, text_only) is text_only


# ---------------------------------------------------------------------------------------------------------------------
# Settings where the features would differ between passes


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--vision_lora_r", "4"], "carries an adapter (default) at model.visual.blocks.0.attn.qkv"),
        (["--train_projector", "true"], "carries an adapter (default) at model.visual.merger"),
        (["--tuning_strategy", "lora_llm_full_vit"], "carries an adapter (default) at model.visual"),
        (["--tuning_strategy", "projector_only"], "parameters of the vision tower or projector train"),
    ],
)
def test_a_trained_or_adapted_vision_path_blocks_reuse(tiny_qwen, preference_dir, tmp_path, extra, fragment):
    trainer = dpo_trainer(tiny_qwen, preference_dir, tmp_path / "out", *extra)
    blocker = image_feature_reuse_blocker(trainer.model, trainer.family)
    assert blocker is not None and fragment in blocker


def test_a_frozen_reference_adapter_on_the_vision_tower_blocks_reuse(tiny_qwen):
    """TRL's "ref" adapter is frozen, but with LoRA on the vision tower the reference sees other image features."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
    family = get_family(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=family.lora_target_regex()))
    assert image_feature_reuse_blocker(model, family) is None
    model.add_adapter("ref", LoraConfig(r=4, target_modules=[r"model.visual.blocks.0.attn.qkv"]))
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".ref." in name)
    blocker = image_feature_reuse_blocker(model, family)
    assert blocker is not None and "ref" in blocker and "model.visual.blocks.0.attn.qkv" in blocker


def test_vision_dropout_blocks_reuse(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
    model.requires_grad_(False)
    family = get_family(model)
    assert image_feature_reuse_blocker(model, family) is None
    model.model.visual.blocks[0].attn.attention_dropout = 0.1
    assert "dropout" in image_feature_reuse_blocker(model, family)


def test_a_ddp_wrapped_model_is_unwrapped(tiny_qwen, preference_dir, tmp_path):
    """Under DDP, compute_loss gets the wrapper: its parameter names start with `module.` and it has no
    `get_image_features`; the features still come from the model inside, and the loss is the same."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this session")
    trainer = dpo_trainer(tiny_qwen, preference_dir, tmp_path / "out")  # its own: DDP leaves hooks on the parameters
    move_trained_weights(trainer.model)
    batch, family = first_batch(trainer), trainer.family
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(trainer.model)
        assert image_feature_reuse_blocker(wrapped, family) is None
        reused = with_image_features(wrapped, family, batch)
        trainer.speed.reuse_image_features = False  # `batch` goes through TRL's forwards as collated
        with torch.no_grad():
            torch.testing.assert_close(
                trainer.compute_loss(wrapped, reused), trainer.compute_loss(wrapped, batch), rtol=1e-5, atol=1e-6
            )
        vision = [p for name, p in trainer.model.named_parameters() if family.part_of(name) == "vision_tower"]
        vision[0].requires_grad_(True)  # found under the wrapper's `module.` names too
        assert "parameters of the vision tower or projector train" in image_feature_reuse_blocker(wrapped, family)
    finally:
        dist.destroy_process_group()
