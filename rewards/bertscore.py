"""BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT"), idf off.

Each text is embedded token by token with a transformers encoder (the hidden states of one
layer), embeddings unit-normalised. With reference tokens x_i and candidate tokens x̂_j, greedy
matching on cosine similarity gives (Eq. 3 of the paper)

    R = 1/|x| Σ_i max_j x_iᵀ x̂_j     (each reference token's best match in the candidate)
    P = 1/|x̂| Σ_j max_i x_iᵀ x̂_j     (each candidate token's best match in the reference)
    F = 2 P R / (P + R)

Special tokens ([CLS], [SEP], ...) are not scored: the sums and counts run over the other tokens,
while the max may still pick a special token, exactly as the `bert_score` package (which the
DDPO paper's reward used) does with idf off. A text with no other tokens scores 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer


class BERTScorer:
    """BERTScore with an encoder from a local path or hub id; `layer` indexes the hidden states
    (0 = embeddings, k = output of the k-th layer, None = the last), as `bert_score`'s
    `num_layers` does (it takes layer 40 of microsoft/deberta-xlarge-mnli)."""

    def __init__(self, model: str, layer: int | None = None, device: str = "cpu", batch_size: int = 64):
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model, dtype=torch.float32).to(device).eval()
        self.num_layers = self.model.config.num_hidden_layers
        self.layer = self.num_layers if layer is None else layer
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each text's unit-normalised token embeddings at `layer`, [n, d], and which of those
        tokens are scored, [n] bool (all but the special tokens)."""
        embeddings = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   return_special_tokens_mask=True, return_tensors="pt")
            scored = ~batch.pop("special_tokens_mask").bool()
            hidden = self.model(**batch.to(self.device), output_hidden_states=True).hidden_states[self.layer]
            hidden = F.normalize(hidden.float(), dim=-1).cpu()
            for tokens, mask, scored_tokens in zip(hidden, batch["attention_mask"].bool().cpu(), scored):
                embeddings.append((tokens[mask], scored_tokens[mask]))
        return embeddings

    def score(self, candidates: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F1), each [B], of candidate i against reference i."""
        embeddings = self.embed(list(candidates) + list(references))
        n = len(candidates)
        scores = np.zeros((3, n), dtype=np.float32)
        for i, ((candidate, candidate_scored), (reference, reference_scored)) in enumerate(
                zip(embeddings[:n], embeddings[n:])):
            if not candidate_scored.any() or not reference_scored.any():
                continue
            similarity = reference @ candidate.T  # [reference tokens, candidate tokens], cosines
            precision = similarity.max(dim=0).values[candidate_scored].mean().item()
            recall = similarity.max(dim=1).values[reference_scored].mean().item()
            f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
            scores[:, i] = precision, recall, f1
        return scores[0], scores[1], scores[2]
