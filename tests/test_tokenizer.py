"""Tests for quantkit.tokenizer: the offline, deterministic MiniMax-M2-style BPE tokenizer."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.tokenizer import (
    MAX_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    PRE_TOKENIZER_PATTERN,
    SPECIAL_TOKENS,
    apply_chat_template,
    load_tokenizer,
    special_token_ids,
    write_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
N_SPECIAL = len(SPECIAL_TOKENS)

TWO_TURNS = [
    {"role": "user", "content": "What's 12345 + 678?"},
    {"role": "assistant", "content": "It's 13023.", "reasoning_content": "Add the numbers."},
    {"role": "user", "content": "Thanks! 🎉"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """A local folder never needs the Hub: any accidental Hub call in these tests fails fast instead of hanging.
    Set per test, not at import, so that other test files (the local Hub server's) keep the Hub reachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, dict[str, int]]]:
    """One trained tokenizer per tested size, shared by the module (training takes well under a second)."""
    out = {}
    for size in (1024, 2048):
        folder = tmp_path_factory.mktemp(f"tok{size}")
        out[size] = (folder, write_tokenizer(folder, size))
    return out


@pytest.fixture(scope="module")
def folder(folders: dict[int, tuple[Path, dict[str, int]]]) -> Path:
    return folders[2048][0]


@pytest.fixture(scope="module")
def ids(folders: dict[int, tuple[Path, dict[str, int]]]) -> dict[str, int]:
    return folders[2048][1]


def test_output_is_byte_identical_across_runs_and_processes(tmp_path: Path, folder: Path) -> None:
    write_tokenizer(tmp_path / "again", 2048)
    # A fresh interpreter with another hash seed and one worker thread: neither may change a byte.
    script = "import sys; from quantkit.tokenizer import write_tokenizer; write_tokenizer(sys.argv[1], 2048)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], check=True, env=env, cwd=REPO_ROOT)
    for name in OUTPUT_FILES:
        expected = (folder / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == expected, name
        assert (tmp_path / "other" / name).read_bytes() == expected, name


@pytest.mark.parametrize("size", [1024, 2048])
def test_vocab_size_is_exact_and_specials_are_last(folders: dict, size: int) -> None:
    folder, returned = folders[size]
    tok = load_tokenizer(folder)
    assert tok.get_vocab_size(with_added_tokens=True) == size
    assert tok.get_vocab_size(with_added_tokens=False) == size - N_SPECIAL
    assert sorted(tok.get_vocab(with_added_tokens=True).values()) == list(range(size))
    assert returned == special_token_ids(size)
    for offset, (name, content, _special) in enumerate(SPECIAL_TOKENS):
        assert returned[f"{name}_token_id"] == size - N_SPECIAL + offset
        assert tok.token_to_id(content) == size - N_SPECIAL + offset
    assert returned["bos_token_id"] == tok.token_to_id("]~!b[")
    assert returned["eos_token_id"] == tok.token_to_id("[e~[")
    assert returned["pad_token_id"] == tok.token_to_id("]!p~[")
    assert returned["role_token_id"] == tok.token_to_id("]~b]")


def test_specials_encode_to_single_ids_even_inside_text(folder: Path, ids: dict[str, int]) -> None:
    tok = load_tokenizer(folder)
    for name, content, _special in SPECIAL_TOKENS:
        assert tok.encode(content).ids == [ids[f"{name}_token_id"]], content
        # Glued to ordinary text on both sides, the special still comes out whole.
        encoded = tok.encode(f"abc{content}xyz").ids
        assert ids[f"{name}_token_id"] in encoded, content
    # Ordinary text never produces a special id.
    assert all(i < 2048 - N_SPECIAL for i in tok.encode("plain text, ]~ b] [e ~[ <think >").ids)


ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "line one\nline two\r\nline three\n\n\n",
    "\ttabs\tand  double  spaces   and trailing   ",
    "emoji 🚀🎉 flags 🇫🇷 skin tone 👍🏽 family 👨‍👩‍👧‍👦 keycap 1️⃣",
    "中文，日本語のテキスト、한국어, русский, العربية, עברית",
    "combining: e\u0301 n\u0303 a\u030a, zero width:\u200b|\u200d|, bom \ufeff",
    "control \x00\x01\x7f chars and a NUL",
    "math ∑∫√∞ ≤ ≥ ≠ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 𐍈",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "1234567890 3.14159 -0.5e-10 0xDEADBEEF",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(folder: Path, text: str) -> None:
    tok = load_tokenizer(folder)
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_round_trip_random_unicode(folder: Path) -> None:
    tok = load_tokenizer(folder)
    rng = random.Random(0)
    for _ in range(200):
        chars = []
        for _ in range(rng.randrange(1, 40)):
            # Printable ASCII, the BMP below the surrogates, and the rest of Unicode (astral planes included).
            low, high = rng.choice([(0x20, 0x7F), (0xA0, 0xD800), (0xE000, 0x110000)])
            point = rng.randrange(low, high)
            chars.append(chr(point))
        text = "".join(chars)
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_round_trip_with_specials(folder: Path) -> None:
    tok = load_tokenizer(folder)
    text = "]~!b[]~b]user\nhi 👋[e~[\n]~b]ai\n<think>\nhmm\n</think>\n\n<minimax:tool_call>x</minimax:tool_call>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    # Like MiniMax-M2, the thinking and tool-call tags are not "special": parsers still see them.
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == (
        "user\nhi 👋\nai\n<think>\nhmm\n</think>\n\n<minimax:tool_call>x</minimax:tool_call>"
    )


def test_pre_tokenizer_splits_digits_in_groups_of_at_most_three(folder: Path) -> None:
    tok = load_tokenizer(folder)
    pieces = [piece for piece, _offsets in tok.pre_tokenizer.pre_tokenize_str("1234567890 and 12345")]
    assert pieces == ["123", "456", "789", "0", "Ġand", "Ġ", "123", "45"]
    for token in tok.encode("99999999999999 and 2025-10-27 at 200064").tokens:
        digits = token.lstrip("Ġ")
        if digits.isdigit():
            assert len(digits) <= 3, token


def test_tokenizer_json_structure(folder: Path) -> None:
    import json

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] is None
    assert data["model"]["type"] == "BPE" and data["model"]["byte_fallback"] is False
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": PRE_TOKENIZER_PATTERN}
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level == {**byte_level, "type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    assert data["decoder"]["type"] == "ByteLevel"
    # All 256 byte symbols are in the vocabulary, whatever the corpus contained.
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(data["model"]["vocab"])


def test_autotokenizer_matches_load_tokenizer(folder: Path, ids: dict[str, int]) -> None:
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = load_tokenizer(folder)
    assert len(auto) == 2048
    assert auto.bos_token_id == ids["bos_token_id"]
    assert auto.eos_token_id == ids["eos_token_id"]
    assert auto.pad_token_id == ids["pad_token_id"]
    assert auto.unk_token_id == ids["unk_token_id"]
    prompt = apply_chat_template(folder, TWO_TURNS)
    for text in [*ROUND_TRIP_TEXTS, prompt]:
        assert auto.encode(text, add_special_tokens=True) == tok.encode(text).ids, text
    assert auto.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True) == prompt


def test_chat_template_renders_minimax_format(folder: Path, ids: dict[str, int]) -> None:
    prompt = apply_chat_template(folder, TWO_TURNS)
    assert prompt.startswith("]~!b[]~b]system\n")
    assert "]~b]user\nWhat's 12345 + 678?[e~[\n" in prompt
    assert "]~b]ai\nYou're welcome.[e~[\n" in prompt
    # Reasoning before the last user turn is dropped; the generation prompt opens a new thinking block.
    assert "Add the numbers." not in prompt
    assert prompt.endswith("[e~[\n]~b]ai\n<think>\n")
    assert not apply_chat_template(folder, TWO_TURNS, add_generation_prompt=False).endswith("<think>\n")

    encoded = load_tokenizer(folder).encode(prompt).ids
    assert encoded[:2] == [ids["bos_token_id"], ids["role_token_id"]]
    assert encoded.count(ids["bos_token_id"]) == 1
    assert encoded.count(ids["role_token_id"]) == 1 + len(TWO_TURNS) + 1  # system, the turns, generation prompt
    assert encoded.count(ids["eos_token_id"]) == 1 + len(TWO_TURNS)
    assert encoded[-2] == ids["think_start_token_id"]


def test_chat_template_tool_calls(folder: Path, ids: dict[str, int]) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I need the tool.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompt = apply_chat_template(folder, messages, tools=tools)
    assert prompt.startswith("]~!b[]~b]system\nBe brief.\n\n# Tools\n")
    assert '<tool>{"name": "get_weather", "parameters": {"type": "object"}}</tool>' in prompt
    assert (
        ']~b]ai\n<think>\nI need the tool.\n</think>\n\n<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n'
        "</minimax:tool_call>[e~[\n"
    ) in prompt
    assert ']~b]tool\n<response>{"temp": 21}</response>\n<response>sunny</response>[e~[\n' in prompt
    encoded = load_tokenizer(folder).encode(prompt).ids
    assert encoded.count(ids["tool_call_start_token_id"]) == 2  # the format example in the system turn, the call
    with pytest.raises(QuantkitError, match="unsupported chat role"):
        apply_chat_template(folder, [{"role": "narrator", "content": "x"}])


def test_missing_files_give_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(QuantkitError, match="no chat_template.jinja"):
        apply_chat_template(tmp_path, TWO_TURNS)


@pytest.mark.parametrize("size", [MIN_VOCAB_SIZE - 1, MAX_VOCAB_SIZE + 1, 2048.0, True])
def test_bad_vocab_size_is_rejected(tmp_path: Path, size: object) -> None:
    with pytest.raises(QuantkitError, match="vocab_size"):
        write_tokenizer(tmp_path, size)  # type: ignore[arg-type]
    assert not (tmp_path / "tokenizer.json").exists()
