"""`make bench`'s real-width composition (benchmarks/real_width.py): the counting and composing are pure functions of
measured unit costs and exact batch counts, so they are checked here on hand-made numbers (tests never assert times).
The published shapes the benchmarks build are checked against the Hub's config.json values."""

import sys

import pytest
from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import qwen_shapes  # noqa: E402
import real_width  # noqa: E402
from real_width import SETUPS, Setup  # noqa: E402


PADDED = Setup("padded", "vlm", layout="padded", head="labelled")
PACKED = Setup("packed", "vlm", layout="packed", head="labelled")
ALL_POSITIONS = Setup("all", "trl", layout="padded", head="all")


def test_sequence_counts_padded_and_packed():
    assert real_width.sequence_counts([3, 5], "padded") == {"positions": 10, "score_elements": 50}
    # packed rows attend one row at a time (modeling.segment_attention): 3^2 + 5^2 score elements, not 8^2
    assert real_width.sequence_counts([3, 5], "packed") == {"positions": 8, "score_elements": 34}


def test_epoch_steps_count_each_batch_of_the_order():
    lengths, image_tokens = [10, 20, 30, 40, 50], [1, 2, 3, 4, 5]
    batches = real_width.fixed_batches([4, 0, 1, 3, 2], 2)
    assert batches == [[4, 0], [1, 3], [2]]
    steps = real_width.epoch_steps(batches, lengths, image_tokens, ALL_POSITIONS, labelled_per_row=3)
    assert [step["rows"] for step in steps] == [2, 2, 1]  # the last batch is short, as the dataloader's
    assert steps[0] == {
        "rows": 2, "real": 60, "positions": 100, "score_elements": 5000, "scored": 98, "patches": 4 * 6,
    }  # fmt: skip
    labelled = real_width.epoch_steps([[4, 0]], lengths, image_tokens, PACKED, labelled_per_row=3)
    assert (
        labelled[0]["scored"] == 6
        and labelled[0]["positions"] == 60
        and labelled[0]["score_elements"] == 50**2 + 10**2
    )


def test_head_line_through_two_points_and_proportional_when_noise_inverts_it():
    fixed, slope = real_width.head_line([[128, 14.0], [32, 5.0]])
    assert slope == pytest.approx(9 / 96) and fixed == pytest.approx(5.0 - 32 * 9 / 96)
    assert real_width.head_line([[32, 6.0], [128, 5.0]]) == (0.0, 5.0 / 128)


def _units(layer_seconds=10.0, data=1.0, head=((32, 2.0), (128, 8.0))):
    return {
        "data": {setup.name: data for setup in SETUPS},
        "layer": {"seconds": layer_seconds, "core_seconds": 0.5, "positions": 512},
        "attention": {setup.name: {"seconds": 1.0, "elements": 1_000_000} for setup in SETUPS},
        "head": {"points": [list(point) for point in head]},
        "vision": {"full_depth_seconds": 20.0, "patches": 2000},  # the package: forward only
        "vision_trl": {"full_depth_seconds": 80.0, "patches": 2000},  # plain TRL: back-propagates the frozen tower
        "optimizer": {"seconds": 0.5},
    }


def test_compose_step_adds_the_parts_scaled_by_the_counts():
    rates = real_width.unit_rates(_units())
    step = {"rows": 4, "real": 2000, "positions": 2400, "score_elements": 1_440_000, "scored": 30, "patches": 4000}
    parts = real_width.compose_step(rates, SETUPS[1], step, layers=28)
    per_position = (10.0 - 0.5) / 512
    assert parts["decoder layers"] == pytest.approx(28 * (per_position * 2400 + 1e-6 * 1_440_000))
    assert parts["vision tower"] == pytest.approx(20.0 / 2000 * 4000)
    assert real_width.compose_step(rates, SETUPS[0], step, layers=28)["vision tower"] == pytest.approx(
        80 / 2000 * 4000
    )
    assert parts["LM head and loss"] == pytest.approx(0.0 + 2.0 / 32 * 30)  # fixed 0 on this line
    assert parts["data loading and collation"] == 1.0 and parts["optimizer step"] == 0.5


def test_padding_makes_the_baseline_slower_and_the_ratio_follows_the_parts():
    rates = real_width.median_rates([_units(), _units(layer_seconds=12.0), _units(layer_seconds=11.0)])
    assert rates["layer_per_position"] == pytest.approx((11.0 - 0.5) / 512)  # the median round's
    padded_rows = [{"rows": 4, "real": 2000, "positions": 4000, "score_elements": 4_000_000, "scored": 3996,
                    "patches": 4000}]  # fmt: skip
    grouped_rows = [{"rows": 4, "real": 2000, "positions": 2040, "score_elements": 1_040_400, "scored": 30,
                     "patches": 4000}]  # fmt: skip
    epochs = {setup.name: grouped_rows for setup in SETUPS} | {"plain TRL": padded_rows}
    composed = real_width.compose_all(rates, epochs, layers=28)
    assert composed["plain TRL"]["padding_share"] == pytest.approx(0.5)
    ratio = real_width.ratios(composed)
    expected = composed["plain TRL"]["step_seconds"] / composed["package defaults"]["step_seconds"]
    assert ratio["package defaults: tokens/s"] == pytest.approx(expected) and expected > 1.5
    # the same images; plain TRL's tower back-propagates, the package's frozen one runs forward only
    assert ratio["package defaults: vision tower"] == pytest.approx(20.0 / 80.0)


def test_stability_needs_enough_rounds_and_a_small_last_move():
    history = [{"x": 1.0}, {"x": 1.2}, {"x": 1.21}]
    assert not real_width.stable(history[:2], tolerance=0.03, min_rounds=2)
    assert real_width.stable(history, tolerance=0.03, min_rounds=3)
    assert not real_width.stable(history, tolerance=0.03, min_rounds=4)
    assert real_width.spread([1.0, 1.1, 1.2])["relative"] == pytest.approx(0.2 / 1.1)


@pytest.mark.parametrize(
    "size, hidden, intermediate, layers, heads, kv_heads, vocab, tied, parameters",
    [
        ("3B", 2048, 11008, 36, 16, 2, 151936, True, 3.75e9),
        ("7B", 3584, 18944, 28, 28, 4, 152064, False, 8.29e9),
    ],
)
def test_published_shapes(size, hidden, intermediate, layers, heads, kv_heads, vocab, tied, parameters):
    from transformers import Qwen2_5_VLConfig

    config = qwen_shapes.real_width_config(Qwen2_5_VLConfig(), size)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (hidden, intermediate, layers)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (heads, kv_heads, vocab)
    assert config.tie_word_embeddings is tied and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31] and vision.out_hidden_size == hidden
    assert sum(qwen_shapes.parameter_counts(size).values()) == pytest.approx(parameters, rel=0.005)
    cut = qwen_shapes.real_width_config(Qwen2_5_VLConfig(), size, text_layers=2, vision_depth=2, vocab_size=1024)
    assert cut.text_config.num_hidden_layers == 2 and cut.vision_config.fullatt_block_indexes == [1]
    assert cut.text_config.hidden_size == hidden and cut.text_config.vocab_size == 1024


def test_median_batch_is_the_middle_batch_by_positions_fed():
    lengths = [10, 50, 20, 40, 30, 60]
    # batches of 2 in this order: [10, 50] -> 100 padded, [20, 40] -> 80, [30, 60] -> 120
    batches = real_width.fixed_batches([0, 1, 2, 3, 4, 5], 2)
    assert real_width.median_batch(batches, lengths, "padded") == [10, 50]
    assert real_width.median_batch(batches, lengths, "packed") == [20, 40]  # 60, 60, 90: stable sort
    # token-budget packing: batches of any size
    assert real_width.median_batch([[5], [0, 1, 2], [3, 4]], lengths, "packed") == [40, 30]


def test_the_packing_budget_matches_a_batch_on_average_and_holds_the_longest_row():
    import speed

    assert speed.token_budget(200.0, 300, 4) == 832  # 4 x 200, rounded up to 64
    assert speed.token_budget(200.0, 3000, 1) == 3000


@pytest.mark.extended  # about 2 minutes: make test-extended runs it
@pytest.mark.e2e
def test_real_width_benchmark_wiring_on_the_test_shape(tmp_path):
    """The whole command on the small "test" shape: the unit child measures every part for every setup, the parent
    composes and writes the results (the shallow-model check is left out here: it trains real-width models)."""
    import json
    import subprocess

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "real_width.py"), "--sizes", "test", "--check_sizes", "none"]
        + ["--rows", "16", "--unique_rows", "4", "--min_rounds", "1", "--max_rounds", "1", "--data_steps", "1"]
        + ["--workdir", str(tmp_path), "--results", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "cpu_real_width_full.json").read_text())  # every figure, in the work folder
    kept = json.loads((tmp_path / "results" / "cpu_real_width.json").read_text())  # the figures, a few KB
    assert kept["sizes"]["test"]["summary"] == report["sizes"]["test"]["summary"]
    assert "epochs" not in kept["sizes"]["test"]["measured"] and len(json.dumps(kept)) < 40_000
    measured = report["sizes"]["test"]["measured"]
    assert len(measured["rounds"]) == 1 and measured["same_model"]
    units = measured["rounds"][0]
    assert set(units["data"]) == set(units["attention"]) == {setup.name for setup in SETUPS}
    assert not units["vision"]["backward"] and units["vision_trl"]["backward"]  # the frozen tower: package, TRL
    assert len(units["vision"]["blocks"]) == 2 and all(seconds > 0 for seconds in units["vision_trl"]["blocks"])
    epochs = measured["epochs"]
    assert sum(step["rows"] for step in epochs["plain TRL"]) == 16
    assert sum(s["real"] for s in epochs["plain TRL"]) == sum(s["real"] for s in epochs["all features"])
    composed = report["sizes"]["test"]["summary"]["composed"]
    assert composed["plain TRL"]["padding_share"] > composed["package defaults"]["padding_share"]
    assert composed["all features"]["padding_share"] == 0 and composed["token-budget packing"]["padding_share"] == 0
    packing = epochs["token-budget packing"]
    assert (
        sum(step["rows"] for step in packing) == 16
        and max(s["real"] for s in packing) <= report["settings"]["max_tokens_per_batch"]
    )
    assert measured["packed_loss_check"]["max_row_loss_difference"] < 1e-4
    assert any("token-budget packing" in line for line in report["targets"])
    assert (
        composed["plain TRL"]["parts"]["LM head and loss"] > composed["package defaults"]["parts"]["LM head and loss"]
    )
    markdown = (tmp_path / "results" / "cpu_real_width.md").read_text()
    assert "| test | package defaults |" in markdown and "MEASURED" in markdown and "COMPOSED" in markdown
