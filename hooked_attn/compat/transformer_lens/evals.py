"""``transformer_lens.evals``: the evaluations hooked_attn provides under TransformerLens' names."""

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


class IOIDataset(torch.utils.data.Dataset):
    """Indirect-object-identification prompts: two names, the subject ``S`` repeated, the answer the
    other name ``IO``. Each item is ``{"prompt": token ids, "IO": ids, "S": ids}``; ``samples`` holds the
    texts and names. ``symmetric`` makes samples in pairs with the two names swapped; ``seed`` fixes them."""

    def __init__(self, tokenizer, templates: list[str] | None = None, names: list[str] | None = None,  # type: ignore[no-untyped-def]
                 nouns: dict[str, list[str]] | None = None, num_samples: int = 1000, symmetric: bool = False,
                 prepend_bos: bool = True, seed: int | None = None) -> None:
        import random

        self.tokenizer, self.prepend_bos = tokenizer, prepend_bos
        self.templates = templates or _TEMPLATES
        self.names = names or _NAMES
        self.nouns = nouns or {"place": _PLACES, "object": _OBJECTS}
        rng = random.Random(seed)
        self.samples: list[dict[str, str]] = []
        while len(self.samples) < num_samples:
            template = rng.choice(self.templates)
            io, s = rng.sample(self.names, 2)
            fill = {key: rng.choice(values) for key, values in self.nouns.items()}
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


__all__ = ["IOIDataset", "induction_loss"]
