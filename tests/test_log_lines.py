"""The console line of each log (`training/log_lines.py`): a method's headline keys in a fixed order, evaluations on
their own line, and something sensible for a method or a log the table does not know. Each method's line from a real
run's logs is checked in that method's end-to-end test (test_sft_e2e, test_dpo, test_grpo, test_kto)."""

from types import SimpleNamespace

from conftest import shown_keys

from vlm_recipes.training.log_lines import log_line


STATE = SimpleNamespace(global_step=20, max_steps=80)
# An SFT log of a 2-source mixture, as TRL 1.16 and the package log it (keys and value kinds of a real run's log)
SFT_LOG = {
    "loss": 1.23456, "grad_norm": 0.5123, "learning_rate": 5e-05, "entropy": 2.1, "num_tokens": 1234.0,
    "mean_token_accuracy": 0.6123, "loss/docvqa": 1.5, "loss/chartqa": 1.1, "epoch": 0.5,
}  # fmt: skip
EVAL_LOG = {
    "eval_loss": 1.2, "eval_runtime": 3.0, "eval_samples_per_second": 2.0, "eval_steps_per_second": 1.0,
    "eval_entropy": 1.0, "eval_num_tokens": 900.0, "eval_mean_token_accuracy": 0.5, "epoch": 1.0,
}  # fmt: skip


def test_sft_line_keeps_the_headline_keys_in_the_tables_order_with_each_sources_loss():
    line = log_line(STATE, SFT_LOG, "sft")
    assert line == (
        "step 20/80  loss 1.235  loss/chartqa 1.1  loss/docvqa 1.5  mean_token_accuracy 0.6123  grad_norm 0.5123  "
        "learning_rate 5e-05"
    )


def test_an_evaluation_gets_its_own_line_without_prefix_or_timings():
    assert log_line(STATE, EVAL_LOG, "sft") == "eval step 20/80  loss 1.2  mean_token_accuracy 0.5"
    # The answer-level scores (a log of their own, none of the headline keys): each of them is shown
    scores = {"eval_chartqa/relaxed_accuracy": 0.25, "eval_chartqa/exact_match": 0.125}
    assert (
        log_line(STATE, scores, "sft") == "eval step 20/80  chartqa/relaxed_accuracy 0.25  chartqa/exact_match 0.125"
    )


def test_an_unknown_method_shows_what_every_trainer_logs():
    assert shown_keys(log_line(STATE, SFT_LOG, None)) == ["loss", "grad_norm", "learning_rate"]
    assert shown_keys(log_line(STATE, SFT_LOG, "orpo")) == ["loss", "grad_norm", "learning_rate"]


def test_a_log_with_none_of_the_headline_keys_shows_its_numbers():
    logs = {"vision_unfrozen_layers": 2, "note": "text", "epoch": 0.25, "flag": True}
    assert log_line(STATE, logs, "dpo") == "step 20/80  vision_unfrozen_layers 2"


def test_nothing_for_the_end_of_training_dict_or_a_log_without_numbers():
    assert log_line(STATE, {"train_runtime": 12.0, "train_loss": 1.0, "epoch": 1.0}, "sft") is None
    assert log_line(STATE, {"epoch": 1.0, "note": "text"}, "sft") is None


def test_dpo_line_shows_each_sources_loss_after_the_loss():
    logs = {"loss": 0.6, "loss/pairs_csv": 0.5, "rewards/accuracies/pairs_csv": 1.0, "rewards/margins": 0.2,
            "rewards/accuracies": 0.75, "learning_rate": 5e-06, "logps/chosen": -30.0}  # fmt: skip
    assert shown_keys(log_line(STATE, logs, "dpo")) == [
        "loss", "loss/pairs_csv", "rewards/margins", "rewards/accuracies", "learning_rate"
    ]  # fmt: skip
