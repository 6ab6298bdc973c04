"""Multiple choice (MMMU, ScienceQA, AI2D style): the option a free-text answer picks, then accuracy.

The option is read from the answer by MMMU's published rule (MMMU-Benchmark/MMMU, eval/eval_utils.py
`parse_multi_choice_response`, which lmms-eval's mmmu task copies):
1. strip the characters , . ! ? ; : ' from both ends of the answer (one after the other, in that order) and pad it with
   a space on each side;
2. options whose letter appears in brackets, `(B)`, are candidates;
3. else options whose letter appears as a word, ` B `, are candidates (case matters: `b` is not `B`);
4. else, for an answer of more than five words, options whose text appears in it (ignoring case) are candidates;
5. one candidate is the answer; of several, the one whose mark (`(B)`, ` B `, or its text) appears last.
Where that finds nothing, MMMU's script picks a random letter. Here an answer that is one option's text exactly
(ignoring case and the characters of step 1) picks that option, and any other answer is unparsed: counted wrong, and
counted, as `unparsed` (the share of rows). So `accuracy` equals MMMU's verdict on every answer the rule reads, and
never contains a lucky guess.
"""

from typing import Any

from vlm_recipes.tasks.base import RECIPE_PROMPT, Metric, PromptPreset, RowScore, Task, reference_answers


TRIMMED = (",", ".", "!", "?", ";", ":", "'")
TEXT_MATCH_MIN_WORDS = 6  # step 4 applies to answers of more than five words


def option_letters(count: int) -> list[str]:
    return [chr(ord("A") + index) for index in range(count)]


def _trim(answer: str) -> str:
    for char in TRIMMED:
        answer = answer.strip(char)
    return answer


def _last(candidates: list[str], position: dict[str, int]) -> str:
    # The earliest candidate among those whose mark sits furthest right (MMMU takes numpy's argmax).
    return max(candidates, key=lambda letter: position[letter])


def read_choice(answer: str, options: list[str]) -> str | None:
    """The option letter `answer` picks, or None when no option can be read from it."""
    letters = option_letters(len(options))
    text_of = dict(zip(letters, options))
    padded = f" {_trim(answer)} "

    bracketed = [letter for letter in letters if f"({letter})" in padded]
    if bracketed:
        return _last(bracketed, {letter: padded.rfind(f"({letter})") for letter in bracketed})
    standalone = [letter for letter in letters if f" {letter} " in padded]
    if standalone:
        return _last(standalone, {letter: padded.rfind(f" {letter} ") for letter in standalone})
    if len(padded.split()) >= TEXT_MATCH_MIN_WORDS:
        lowered = padded.lower()
        quoted = [letter for letter in letters if text_of[letter].lower() in lowered]
        if quoted:
            return _last(quoted, {letter: lowered.rfind(text_of[letter].lower()) for letter in quoted})
    # Beyond MMMU's rule (which guesses here): the answer is exactly one option's text.
    bare = _trim(answer.strip()).strip().lower()
    return next((letter for letter in letters if bare and _trim(text_of[letter].strip()).lower() == bare), None)


def score(prediction: str, row: dict[str, Any]) -> RowScore:
    picked = read_choice(prediction.strip(), list(row["options"]))
    correct = picked is not None and picked in reference_answers(row)
    return RowScore({"accuracy": float(correct), "unparsed": float(picked is None)}, details={"picked": picked})


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def listed_options(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))


LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def lmms_eval_prompt(row: dict[str, Any]) -> str:
    # lmms-eval, lmms_eval/tasks/ai2d/utils.py ai2d_doc_to_text ("mcq" format) and scienceqa/utils.py sqa_doc_to_text
    # ("default" format, which puts "Context: <hint>" first when the row has a hint); post_prompt of ai2d.yaml and
    # scienceqa_img.yaml.
    context = f"Context: {row['hint']}\n" if row.get("hint") else ""
    return f"{context}{row['question']}\n{listed_options(row['options'])}\n{LETTER_INSTRUCTION}"


def lmms_eval_mmmu_prompt(row: dict[str, Any]) -> str:
    # lmms-eval, lmms_eval/tasks/mmmu/utils.py construct_prompt with mmmu_val.yaml's multiple_choice_prompt.
    return f"{row['question']}\n{listed_options(row['options'])}\n\n{LETTER_INSTRUCTION}"


def vlmevalkit_prompt(row: dict[str, Any]) -> str:
    # VLMEvalKit, vlmeval/dataset/image_mcq.py ImageMCQDataset.build_prompt (AI2D_TEST, ScienceQA_TEST, MMMU_DEV_VAL).
    hint = f"Hint: {row['hint']}\n" if row.get("hint") else ""
    options = "".join(f"{line}\n" for line in listed_options(row["options"]).splitlines())
    return f"{hint}Question: {row['question']}\nOptions:\n{options}Please select the correct answer from the options above. \n"


MULTIPLE_CHOICE = Task(
    name="multiple_choice",
    title="Multiple choice",
    formatter="multiple_choice",
    metrics=(
        Metric(
            "accuracy",
            "the option read from the answer by MMMU's rule is the right one (an answer no option can be read from "
            "counts wrong)",
            "MMMU, ScienceQA-IMG and AI2D accuracy (lmms-eval, VLMEvalKit without a judge model) when the prompt "
            "preset is theirs: equal when `unparsed` is 0; MMMU's script guesses for unparsed answers, which adds "
            "1/#options of them on average",
        ),
        Metric(
            "unparsed",
            "the share of answers from which no option could be read (each also counted wrong in accuracy)",
            "nothing published: a high value means the model does not answer in the format the prompt asks for",
        ),
    ),
    max_new_tokens=16,  # lmms-eval's ai2d, scienceqa_img and mmmu_val generation_kwargs
    presets=(
        RECIPE_PROMPT,
        PromptPreset(
            "lmms_eval",
            source="lmms-eval lmms_eval/tasks/ai2d and scienceqa (scienceqa_img.yaml): question, lettered options, "
            "letter instruction",
            text=lmms_eval_prompt,
        ),
        PromptPreset(
            "lmms_eval_mmmu",
            source="lmms-eval lmms_eval/tasks/mmmu/utils.py construct_prompt (mmmu_val.yaml)",
            text=lmms_eval_mmmu_prompt,
        ),
        PromptPreset(
            "vlmevalkit",
            source="VLMEvalKit vlmeval/dataset/image_mcq.py ImageMCQDataset.build_prompt",
            text=vlmevalkit_prompt,
        ),
    ),
    card_text=(
        "Multiple-choice accuracy: the option is read from each answer by MMMU's published rule; an answer from which "
        "no option can be read counts wrong (MMMU's script guesses a random letter instead) and is reported as "
        "`unparsed`."
    ),
    hub_task_type="visual-question-answering",
    score=score,
)
