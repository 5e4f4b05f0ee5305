"""A tiny random-weight Llama built locally, so the server and its tests run without a model hub.

Its output is gibberish, but it exercises the whole path a real model takes: a byte-level BPE
tokenizer, a chat template, sampling, stop conditions and logprobs. Builds are byte-identical
(for the same torch and transformers versions), so greedy results are reproducible.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import uuid
from pathlib import Path

DEMO_MODEL_NAME = "demo-tiny-llama"

_SEED = 1234
_VOCAB_SIZE = 512
_BOS, _EOS, _PAD, _END_OF_TURN = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|end|>"
_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
_SPECIAL_TOKENS = [_BOS, _EOS, _PAD, _END_OF_TURN, *_ROLE_TOKENS]  # ids 0..6, in this order

# Tools, an assistant's tool calls and tool results are rendered in the Hermes format, which
# vLLM's `hermes` tool parser reads back; a conversation without them renders as plain turns.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nYou may call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "<tool_call>{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a an of to in and or is are was be it that this with for on as by at from batch "
    "request model token prompt answer question reply server queue worker engine result "
    "file line job time hello world please tell me about write short story poem list "
    "one two three four five six seven eight nine ten red green blue small large fast slow "
    "cat dog bird tree river city house book code data test value number text word"
).split()

_REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "model.safetensors")


def build_demo_model(target_dir: Path) -> Path:
    """Build the demo model into target_dir, unless a complete build is already there."""
    target_dir = Path(target_dir)
    if _is_complete(target_dir):
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent reader never sees half a model.
    staging = target_dir.parent / f".{target_dir.name}.{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        _write_tokenizer(staging)
        _write_model(staging)
        try:
            staging.rename(target_dir)
        except OSError:
            if not _is_complete(target_dir):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def _is_complete(directory: Path) -> bool:
    if not all((directory / name).is_file() for name in _REQUIRED_FILES):
        return False
    # A build from before the template learned tools gets this template (the weights are the same).
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config.get("chat_template") != _CHAT_TEMPLATE:
        staging = directory / f".tokenizer_config.{uuid.uuid4().hex}"
        _write_json(staging, {**config, "chat_template": _CHAT_TEMPLATE})
        staging.replace(directory / "tokenizer_config.json")
    return True


def _training_text() -> list[str]:
    rng = random.Random(_SEED)
    lines = []
    for _ in range(3000):
        words = rng.choices(_WORDS, k=rng.randint(3, 14))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        lines.append(sentence + (f" {rng.randint(0, 999)}" if rng.random() < 0.2 else ""))
    return lines


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = tokenizer.token_to_id(_BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, bos_id)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": _CHAT_TEMPLATE,
    })


def _write_model(directory: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos_id, eos_id, pad_id, end_of_turn_id = range(4)
    config = LlamaConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention needs a head size of 32 or more
        max_position_embeddings=512,
        # Wider than the usual 0.02 so logits have clear gaps and greedy decoding is stable
        # under the small numeric differences between batch shapes.
        initializer_range=0.2,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, end_of_turn_id], pad_token_id=pad_id
    )
    model.save_pretrained(directory, safe_serialization=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    # The folder is the caller's to name (start-all.sh names DATA_DIR's): this module reads no
    # settings, so config.py -> models.py -> demo_model.py imports nothing back.
    if len(sys.argv) != 2:
        sys.exit("usage: python -m core.batch_app.demo_model DIR")
    print(build_demo_model(Path(sys.argv[1])))
