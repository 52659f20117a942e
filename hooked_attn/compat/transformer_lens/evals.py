"""``transformer_lens.evals``: the evaluations hooked_attn provides under TransformerLens' names."""

import re

import torch
from torch import Tensor

from hooked_attn.analysis.heads import repeated_random_tokens


@torch.no_grad()
def induction_loss(model, tokenizer=None, batch_size: int = 4, subseq_len: int = 384, prepend_bos: bool | None = None,
                   device=None) -> Tensor:  # type: ignore[no-untyped-def]
    """Mean next-token loss on the second half of random token sequences repeated twice."""
    tokens = repeated_random_tokens(model.cfg.d_vocab, subseq_len, batch=batch_size)
    loss = model(tokens.to(model.device), return_type="loss", loss_per_token=True)
    return loss[:, -subseq_len + 1:].mean()



_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kate", "Liam",
          "Maria", "Noah", "Olivia", "Paul", "Rachel", "Sam", "Tina", "Victor"]
_PLACES = ["store", "park", "station", "library", "market", "beach", "office", "garden"]
_OBJECTS = ["book", "ball", "letter", "bottle", "key", "ticket", "cake", "phone"]
_TEMPLATES = [
    "When {IO} and {S} went to the {place}, {S} gave the {object} to",
    "After {IO} and {S} arrived at the {place}, {S} handed the {object} to",
    "Then, {S} and {IO} were at the {place}. {S} passed the {object} to",
]


def _from_bracket_template(template: str) -> str:
    """TransformerLens' template spelling (``"[A] and [B] went ... [B] gave the [OBJECT] to [A]"``: ``[A]`` the
    indirect object, ``[B]`` the subject, a trailing ``[A]`` the answer) in this module's ``str.format``
    spelling, the answer dropped: the prompt ends where the name is to be predicted."""
    if "[" not in template:
        return template
    text = template.rstrip()
    if text.endswith("[A]"):
        text = text[: -len("[A]")].rstrip()
    text = text.replace("{", "{{").replace("}", "}}")
    return re.sub(r"\[([A-Za-z_]+)\]", lambda m: {"A": "{IO}", "B": "{S}"}.get(m.group(1), "{" + m.group(1) + "}"), text)


class IOIDataset(torch.utils.data.Dataset):
    """Indirect-object-identification prompts: two names, the subject ``S`` repeated, the answer the
    other name ``IO``. Each item is ``{"prompt": token ids, "IO": ids, "S": ids}``; ``samples`` holds the
    texts and names. ``symmetric`` makes samples in pairs with the two names swapped; ``seed`` fixes them."""

    def __init__(self, tokenizer, templates: list[str] | None = None, names: list[str] | None = None,  # type: ignore[no-untyped-def]
                 nouns: dict[str, list[str]] | None = None, num_samples: int = 1000, symmetric: bool = False,
                 prepend_bos: bool = True, seed: int | None = None) -> None:
        import random

        self.tokenizer, self.prepend_bos = tokenizer, prepend_bos
        self.templates = [_from_bracket_template(t) for t in templates] if templates else _TEMPLATES
        self.names = names or _NAMES
        self.nouns = nouns or {"place": _PLACES, "object": _OBJECTS}
        rng = random.Random(seed)
        self.samples: list[dict[str, str]] = []
        while len(self.samples) < num_samples:
            template = rng.choice(self.templates)
            io, s = rng.sample(self.names, 2)
            fill = {key: rng.choice(values) for key, values in self.nouns.items()}
            fill |= {key.upper(): value for key, value in fill.items()}  # "[OBJECT]" and "{object}" alike
            pair = [(io, s), (s, io)] if symmetric else [(io, s)]
            for a, b in pair[: num_samples - len(self.samples)]:
                self.samples.append({"text": template.format(IO=a, S=b, **fill), "IO": " " + a, "S": " " + b})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Tensor]:
        sample = self.samples[idx]
        ids = self.tokenizer.encode(sample["text"])
        if self.prepend_bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        return {"prompt": torch.tensor(ids), "IO": torch.tensor(self.tokenizer.encode(sample["IO"])),
                "S": torch.tensor(self.tokenizer.encode(sample["S"]))}


@torch.no_grad()
def ioi_eval(model, dataset: "IOIDataset | None" = None, batch_size: int = 8, num_samples: int = 1000,  # type: ignore[no-untyped-def]
             tokenizer=None, symmetric: bool = False) -> dict[str, float]:
    """Indirect-object identification: ``{"Logit Difference": mean over prompts of logit(IO) - logit(S),
    "Accuracy": fraction of prompts where IO's logit is the larger}``, read at the first token where
    the two names differ (after feeding their shared leading tokens, so multi-token names work).
    Without ``dataset``, ``num_samples`` prompts of ``IOIDataset`` are made with the model's tokenizer."""
    tokenizer = tokenizer or model.tokenizer
    if dataset is None:
        dataset = IOIDataset(tokenizer, num_samples=num_samples, symmetric=symmetric,
                             prepend_bos=bool(tokenizer.bos_token_id is not None))
    diffs: list[float] = []
    items = [dataset[i] for i in range(len(dataset))]
    for start in range(0, len(items), batch_size):
        rows, targets = [], []
        for item in items[start:start + batch_size]:
            io, s = item["IO"].tolist(), item["S"].tolist()
            shared = next((i for i, (a, b) in enumerate(zip(io, s)) if a != b), None)
            if shared is None:
                raise ValueError(f"IO {io} and S {s} tokenize to a common prefix: their logits cannot be told apart")
            rows.append(item["prompt"].tolist() + io[:shared])
            targets.append((io[shared], s[shared]))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding; each prompt is read at its own last token
            tokens[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = model(tokens.to(model.device), attention_mask=mask.to(model.device))
        last = logits[torch.arange(len(rows)), mask.sum(-1).to(logits.device) - 1]
        diffs += [float(last[i, a] - last[i, b]) for i, (a, b) in enumerate(targets)]
    diff = torch.tensor(diffs)
    return {"Logit Difference": float(diff.mean()), "Accuracy": float((diff > 0).float().mean())}


from hooked_attn.compat.transformer_lens.mmlu import MMLU_SUBJECTS, make_mmlu_data_loader, mmlu_eval  # noqa: E402

__all__ = ["IOIDataset", "MMLU_SUBJECTS", "induction_loss", "ioi_eval", "make_mmlu_data_loader", "mmlu_eval"]
