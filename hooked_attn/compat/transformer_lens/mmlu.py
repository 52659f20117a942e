"""MMLU (Hendrycks et al.) multiple-choice evaluation under TransformerLens' names (``transformer_lens.evals``)."""

from typing import Any

import torch

MMLU_SUBJECTS: tuple[str, ...] = tuple("""
abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence
logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes
moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine
professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions
""".split())
LETTERS = ("A", "B", "C", "D")


def _subjects(subjects: str | list[str] | None) -> list[str]:
    chosen = list(MMLU_SUBJECTS) if subjects is None else [subjects] if isinstance(subjects, str) else list(subjects)
    bad = [s for s in chosen if s not in MMLU_SUBJECTS]
    if bad:
        raise ValueError(f"Invalid subject(s) {bad}: MMLU's subjects are {list(MMLU_SUBJECTS)}")
    return chosen


def make_mmlu_data_loader(subjects: str | list[str] | None = None, split: str = "test",
                          num_samples: int | None = None) -> list[dict[str, Any]]:
    """MMLU questions as ``{"question", "choices" (4 strings), "answer" (0-3), "subject"}``, the first
    ``num_samples`` of each subject (all of them when None), read with ``datasets`` from ``cais/mmlu``."""
    chosen = _subjects(subjects)  # checked before anything is downloaded
    from datasets import load_dataset

    data: list[dict[str, Any]] = []
    for subject in chosen:
        rows = load_dataset("cais/mmlu", subject, split=split)
        count = len(rows) if num_samples is None else min(num_samples, len(rows))
        data += [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"]),
                  "subject": subject} for r in rows.select(range(count))]
    return data


def format_mmlu_prompt(item: dict[str, Any]) -> str:
    """Question, the four lettered choices, and ``Answer:``; the model's next token is read as its choice."""
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"]))
    return f"{item['question'].strip()}\n{choices}\nAnswer:"


@torch.no_grad()
def mmlu_eval(model: Any, subjects: str | list[str] | None = None, split: str = "test",
              num_samples: int | None = None, data: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Zero-shot MMLU: the choice is the letter (`` A``..`` D``) with the largest next-token logit.
    Returns ``accuracy``, ``num_correct``, ``num_total`` and ``subject_scores`` (accuracy per subject)."""
    data = make_mmlu_data_loader(subjects, split, num_samples) if data is None else data
    letter_ids = [model.to_single_token(" " + letter) for letter in LETTERS]
    correct: dict[str, list[bool]] = {}
    for item in data:
        logits = model(format_mmlu_prompt(item), return_type="logits")[0, -1]
        picked = int(torch.stack([logits[i] for i in letter_ids]).argmax())
        correct.setdefault(item["subject"], []).append(picked == item["answer"])
    flat = [c for marks in correct.values() for c in marks]
    return {"accuracy": sum(flat) / len(flat) if flat else 0.0, "num_correct": sum(flat), "num_total": len(flat),
            "subject_scores": {s: sum(m) / len(m) for s, m in correct.items()}}


__all__ = ["MMLU_SUBJECTS", "format_mmlu_prompt", "make_mmlu_data_loader", "mmlu_eval"]
