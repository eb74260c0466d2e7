"""Build the embedded model's tokenizer: a 2048-token byte-level BPE trained on a corpus made in code."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .tokenizer import builtin_template

TINY_VOCAB_SIZE = 2048
TINY_EOS_TOKENS = ("<|im_end|>", "</s>")
# Ids 0..11, in this order.
TINY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
)

_NOUNS = (
    "agent tool model order truck warehouse price customer report city river market file table query "
    "result answer budget token plan route package invoice account server request reply weather forecast "
    "record list value number string object array schema function error message user system assistant"
).split()
_VERBS = (
    "checks sends reads writes finds moves returns computes ships counts sorts loads opens closes asks "
    "answers calls fetches updates deletes creates plans"
).split()
_ADJECTIVES = "quick small large late early red blue open closed valid empty full new old next last".split()
_NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy".split()
_CITIES = "Paris Berlin Tokyo Lagos Lima Oslo Cairo Delhi Quebec Zürich São_Paulo Kraków 東京 Москва".split()
_TOOLS = "get_weather search_web run_sql send_email book_truck lookup_price python add_numbers".split()
_COMMON = (
    "the a an and or but if then so to of in on at for with from by about as is are was were be been have has "
    "had do does did not no yes can will would should could may must I you he she it we they this that these "
    "those there here what which who when where why how all some any each more most other new good first last "
    "long great little own same right big high small large next early young important few public bad able "
    "hello hi thanks please sorry okay sure let me check call tool result answer question because however"
).split()
_SYMBOLS = "é ü ñ ç ø € £ ° × ÷ → ✓ — “ ” 😀 🚚 中 文 ß".split()


def _sentence(rng: random.Random) -> str:
    a, n1, v, n2 = rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)
    shapes = (
        f"The {a} {n1} {v} the {n2} in {rng.choice(_CITIES)}.",
        f"{rng.choice(_NAMES)} {v} {rng.randint(2, 999)} {n2}s before {rng.randint(1, 12)} pm.",
        f"Why does the {n1} need a {a} {n2}? Because it {v} it.",
        f"I think the {n1} is {a}, so I will call {rng.choice(_TOOLS)} next.",
        f"Price: {rng.uniform(0, 500):.2f} {rng.choice(_SYMBOLS)}, weight {rng.randint(1, 90)} kg.",
    )
    return rng.choice(shapes)


def _prose(rng: random.Random) -> str:
    words = [rng.choice(_COMMON) for _ in range(rng.randint(4, 16))]
    return " ".join(words).capitalize() + rng.choice((".", ".", "?", "!", ",", ":"))


def _tool_call(rng: random.Random) -> str:
    args = {
        rng.choice(_NOUNS): rng.choice((rng.randint(-50, 5000), round(rng.uniform(0, 100), 3), rng.choice(_CITIES))),
        rng.choice(_NOUNS): rng.choice((True, False, None, [rng.randint(0, 9) for _ in range(3)])),
    }
    return json.dumps({"name": rng.choice(_TOOLS), "arguments": args}, ensure_ascii=False)


def _code(rng: random.Random) -> str:
    f, x, y = rng.choice(_TOOLS), rng.choice(_NOUNS), rng.choice(_NOUNS)
    shapes = (
        f"def {f}({x}, {y}=None):\n    return {x} + {rng.randint(0, 99)}\n",
        f"for i in range({rng.randint(1, 64)}):\n    {x}[i] = {y}.get(i, 0)\n",
        f"SELECT {x}, COUNT(*) FROM {y} WHERE id > {rng.randint(0, 999)} GROUP BY {x};",
        f'if {x} is not None and len({y}) >= {rng.randint(0, 9)}:\n    print(f"{{{x}}}")\n',
    )
    return rng.choice(shapes)


def _numbers(rng: random.Random) -> str:
    return (
        f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} {rng.randint(0, 10**6)} {rng.random():.4f}"
    )


def tiny_corpus(lines: int = 7000) -> list[str]:
    """The training corpus: English-ish prose and sentences, JSON tool calls, code and numbers, seeded with 0."""
    rng = random.Random(0)
    makers = (_prose, _prose, _sentence, _sentence, _tool_call, _code, _numbers)
    return [rng.choice(makers)(rng) for _ in range(lines)]


def build_tiny_tokenizer() -> HFTokenizer:
    """Train the byte-level BPE; special tokens take ids 0..11 in `TINY_SPECIAL_TOKENS` order."""
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {size} tokens, expected {TINY_VOCAB_SIZE}; enlarge the corpus")
    return tok


def write_tiny_tokenizer(directory: Path, model_max_length: int = 4096) -> None:
    """Write the embedded model's tokenizer files into `directory` (created if missing); same bytes every run.

    >>> write_tiny_tokenizer(Path("/tmp/tiny"))
    >>> Tokenizer.from_dir("/tmp/tiny").vocab_size
    2048
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    (directory / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    special = dict(bos_token="<s>", eos_token=TINY_EOS_TOKENS[0], pad_token="<pad>", unk_token="<unk>")
    config = {
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(TINY_SPECIAL_TOKENS)
        },
        "agentrt_chat_format": "json",
        **special,
        "additional_special_tokens": list(TINY_SPECIAL_TOKENS[4:]),
        "chat_template": builtin_template("tiny"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    specials_map = {**special, "additional_special_tokens": list(TINY_SPECIAL_TOKENS[4:])}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials_map)):
        text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        (directory / name).write_text(text, encoding="utf-8")
