"""BERT with pre-training heads (Devlin et al., 2019), in plain torch with the parameter layout
and names of Hugging Face's ``BertForPreTraining``.

BERT-base has 110,106,428 parameters and BERT-large 336,226,108, counting the masked-LM
decoder once: its weight is the word-embedding matrix. Two differences from the Hugging Face
module: the decoder bias lives only in ``cls.predictions.decoder.bias`` (Hugging Face also
exposes the same tensor as ``cls.predictions.bias``), and there is no attention mask, since
the synthetic batches this library trains on have no padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

# Labels with this value are not masked positions and do not count in the masked-LM loss.
IGNORE_INDEX = -100
# The [MASK] token of the uncased WordPiece vocabulary.
MASK_TOKEN_ID = 103


@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT model; the defaults are BERT-base."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12


BERT_BASE = BertConfig()
BERT_LARGE = BertConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)


class BertEmbeddings(nn.Module):
    """Sum of word, position and token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over all positions (no mask)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q, k, v = (
            proj(x).view(batch, seq_len, self.num_heads, -1).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(batch, seq_len, hidden)


class BertResidualOutput(nn.Module):
    """Projection, dropout, residual add and LayerNorm (Hugging Face's BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """Self-attention followed by its output projection and residual LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    """Feed-forward expansion with exact GELU."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """One post-LayerNorm transformer encoder layer."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertPooler(nn.Module):
    """Dense + tanh on the first ([CLS]) position: the sentence representation for NSP."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    """Embeddings, encoder and pooler; returns (sequence output, pooled output)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() != 2:
            raise ValueError(
                f"BERT takes token ids of shape (batch, seq_len), got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; use shorter sequences"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        sequence_output = self.encoder(self.embeddings(input_ids, token_type_ids))
        return sequence_output, self.pooler(sequence_output)


class BertPredictionHeadTransform(nn.Module):
    """Dense, GELU and LayerNorm applied before the masked-LM decoder."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Masked-LM head; the decoder weight is tied to the word embeddings by BertForPreTraining."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertPreTrainingHeads(nn.Module):
    """Masked-LM predictions for every position, next-sentence logits from the pooled output."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(
        self, sequence_output: torch.Tensor, pooled_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class BertForPreTraining(nn.Module):
    """BERT with masked-LM and next-sentence-prediction heads.

    ``forward(input_ids, token_type_ids=None)`` takes int64 ids of shape (batch, seq_len) and
    returns (prediction_scores (batch, seq_len, vocab), seq_relationship_score (batch, 2)).
    """

    def __init__(self, config: BertConfig = BERT_BASE) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}"
            )
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.apply(_init_weights)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(*self.bert(input_ids, token_type_ids))


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases; LayerNorm keeps ones and zeros."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def pretraining_loss(
    output: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Masked-LM cross-entropy (positions labelled IGNORE_INDEX skipped) plus NSP cross-entropy.

    `output` is the model's (prediction_scores, seq_relationship_score); `target` is
    (mlm_labels (batch, seq_len), nsp_labels (batch,)), as made by ``models.data.bert_batch``.
    """
    prediction_scores, seq_relationship_score = output
    mlm_labels, nsp_labels = target
    mlm = F.cross_entropy(
        prediction_scores.reshape(-1, prediction_scores.shape[-1]),
        mlm_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    return mlm + F.cross_entropy(seq_relationship_score, nsp_labels)


def bert_base(**overrides: int | float) -> BertForPreTraining:
    """BERT-base (12 layers, hidden 768, 12 heads); keyword arguments override BertConfig fields."""
    return BertForPreTraining(replace(BERT_BASE, **overrides))


def bert_large(**overrides: int | float) -> BertForPreTraining:
    """BERT-large (24 layers, hidden 1024, 16 heads); keyword arguments override BertConfig fields."""
    return BertForPreTraining(replace(BERT_LARGE, **overrides))
