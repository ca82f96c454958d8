"""Small random models of the attention-bearing families that prunespec is checked on, built offline.

Start with `FAMILIES`: a name for each family and a function that builds the model (random weights, float64) and
its example inputs. The Hugging Face configurations are tiny (two layers, 64 channels, 8 heads in 2 key/value
groups where the family has them) so that the test suite can plan, apply and compare every family in seconds;
`make zoo` runs the same families. transformers, timm and torchvision are imported only by the builders that need
them: they are test and zoo extras, never dependencies of prunespec.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunespec.applier import MockPrunedModel

VOCABULARY = 64
TOKENS = 7


@dataclass
class Family:
    """How to build one family's model, and what kind of model it is."""

    build: Callable[[], tuple[nn.Module, list[torch.Tensor]]]
    causal_lm: bool = False  # a decoder with a key/value cache, checked by greedy generation too


def _ids(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCABULARY, (2, TOKENS), generator=generator)]


def _lm(model_class: str, config_class: str, **options) -> Callable[[], tuple[nn.Module, list[torch.Tensor]]]:
    def build():
        import transformers

        settings = dict(
            vocab_size=VOCABULARY, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        settings.update(options)
        config = getattr(transformers, config_class)(**settings)
        torch.manual_seed(0)
        return getattr(transformers, model_class)(config).eval().double(), _ids()

    return build


def _gpt2():
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCABULARY, n_embd=64, n_layer=2, n_head=8, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval().double(), _ids()


def _bert():
    import transformers

    config = transformers.BertConfig(vocab_size=VOCABULARY, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                     intermediate_size=96, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval().double(), _ids()


def _hf_vit():
    import transformers

    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96,
                                    image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval().double(), [_image(32)]


def _image(size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _timm(name: str, size: int = 224, **options):
    def build():
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, **options).eval().double(), [_image(size)]

    return build


def _torchvision(name: str, size: int = 224, **options):
    def build():
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **options)
        for module in model.modules():  # vit_b_16's classifier starts at zero, and a zero output shows no mistake
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.reset_parameters()
        return model.eval().double(), [_image(size)]

    return build


class AttentionBlock(nn.Module):
    """A user model with `nn.MultiheadAttention` between two linear layers, attending with a key padding mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        padding[:, -1] = True
        a, _ = self.attn(h, h, h, key_padding_mask=padding)
        return self.head(a + h)


def _multihead():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return AttentionBlock().eval().double(), [x]


FAMILIES: dict[str, Family] = {
    "llama": Family(_lm("LlamaForCausalLM", "LlamaConfig", head_dim=8), causal_lm=True),
    "qwen2": Family(_lm("Qwen2ForCausalLM", "Qwen2Config"), causal_lm=True),
    "mistral": Family(_lm("MistralForCausalLM", "MistralConfig", head_dim=8), causal_lm=True),
    "gemma": Family(_lm("GemmaForCausalLM", "GemmaConfig", head_dim=16), causal_lm=True),
    "phi3": Family(_lm("Phi3ForCausalLM", "Phi3Config"), causal_lm=True),
    "gpt2": Family(_gpt2, causal_lm=True),
    "bert": Family(_bert),
    "hf-vit": Family(_hf_vit),
    "timm-vit": Family(_timm("vit_tiny_patch16_224", 64, img_size=64)),
    "timm-deit": Family(_timm("deit_tiny_patch16_224", 64, img_size=64)),
    "timm-eva02": Family(_timm("eva02_tiny_patch14_224", 56, img_size=56)),
    "torch-mha": Family(_multihead),
    "tv-vit_b_16": Family(_torchvision("vit_b_16", 64, image_size=64)),
    "tv-swin_t": Family(_torchvision("swin_t", 64)),
}

# Residual networks without attention, for the hidden width (ConvNeXt's stream runs through layer norms) and blocks.
RESIDUAL: dict[str, Family] = {
    "timm-convnext": Family(_timm("convnext_atto", 64)),
    "tv-convnext_tiny": Family(_torchvision("convnext_tiny", 64)),
    "tv-resnet50": Family(_torchvision("resnet50", 64)),
}


# ------------------------------------------------------------------------------------------ random seeded patterns
# Shared by the tests and by `scripts/zoo_transformers.py`, so that a pattern that fails in the sweep reproduces in
# a test.

def random_heads(model, inputs, seed: int) -> tuple[list, list]:
    """For each traced attention: with even odds, drop one key/value head (not the last) or some query heads
    (the same number from each key/value group, as grouped-query attention needs)."""
    from prunespec.planner.trace import trace  # here: the zoo's apply worker must run without the planner

    rng = random.Random(seed)
    heads, kv_heads = [], []
    for record in trace(model, inputs).heads:
        groups = len(record.key_value)
        per_group = len(record.query) // groups
        if rng.random() < 0.5 and groups > 1:
            kv_heads.append((record.module, rng.randrange(groups)))
        elif per_group > 1 or groups > 1:
            drop = rng.randint(1, per_group - 1) if per_group > 1 else 1
            for g in range(groups if per_group > 1 else 1):
                chosen = rng.sample(range(per_group), drop) if per_group > 1 else [rng.randrange(len(record.query))]
                heads += [(record.module, g * per_group + j) for j in chosen]
    return heads, kv_heads


# The layer whose output columns carry each family's stream (the embedding, the patch embedding).
STREAM = {
    "llama": "model.embed_tokens.weight", "qwen2": "model.embed_tokens.weight", "mistral": "model.embed_tokens.weight",
    "gemma": "model.embed_tokens.weight", "phi3": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight",
    "bert": "bert.embeddings.word_embeddings.weight", "hf-vit": "vit.embeddings.patch_embeddings.projection.weight",
    "timm-vit": "patch_embed.proj.weight", "timm-deit": "patch_embed.proj.weight",
    "timm-eva02": "patch_embed.proj.weight", "tv-vit_b_16": "conv_proj.weight", "tv-swin_t": "features.0.0.weight",
    "torch-mha": "embed.weight",
}  # fmt: skip


def stream_request(model, inputs, family: str, seed: int) -> list[tuple[str, int]]:
    """A quarter of the stream's channels, drawn with `seed`."""
    weight = STREAM[family]
    module = model.get_submodule(weight.rsplit(".", 1)[0])
    width = module.embedding_dim if isinstance(module, nn.Embedding) else module.weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return [(weight, int(c)) for c in torch.randperm(width, generator=generator)[: width // 4]]


def droppable(model, inputs) -> list[str]:
    """The smallest modules the trace shows are residual blocks (a stack of blocks is one too)."""
    from prunespec.planner.trace import trace
    found = [name for name, why in trace(model, inputs).blocks.items() if why is None]
    return [b for b in found if not any(o.startswith(f"{b}.") for o in found)]


def greedy(model, ids: torch.Tensor, steps: int):
    """Greedy decoding with the key/value cache: the prompt once, then one token at a time."""
    from transformers import DynamicCache

    network = model.model if isinstance(model, MockPrunedModel) else model
    name = "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"
    cache = DynamicCache()
    out = model(input_ids=ids, use_cache=True, **{name: cache})
    tokens = []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        out = model(input_ids=token, use_cache=True, **{name: cache})
    return torch.cat(tokens, dim=1), cache
