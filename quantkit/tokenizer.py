"""A small, offline, deterministic byte-level BPE tokenizer shaped like MiniMax-M2's.

quantkit writes synthetic MiniMax-M2 checkpoints for tests and benchmarks. They need a tokenizer that loads
the way the real one does (``tokenizers`` and ``transformers.AutoTokenizer``), splits text the way the real one
does (the GPT-4o / o200k pre-tokenizer regex), and knows MiniMax-M2's special tokens and chat format, but that
is small, trained in well under a second from a corpus built into this module, and identical byte for byte on every
machine, so fixtures and golden files can be compared across runs.

Usage::

    from quantkit.tokenizer import apply_chat_template, load_tokenizer, write_tokenizer

    ids = write_tokenizer("out/tiny-m2", vocab_size=2048)   # {"bos_token_id": 2028, "eos_token_id": 2014, ...}
    tok = load_tokenizer("out/tiny-m2")                      # a tokenizers.Tokenizer
    prompt = apply_chat_template("out/tiny-m2", [{"role": "user", "content": "Hi!"}])
    tok.encode(prompt).ids                                   # starts with ids["bos_token_id"]

    # or, with transformers installed:
    # AutoTokenizer.from_pretrained("out/tiny-m2").apply_chat_template(messages, tokenize=False)

Vocabulary layout (``vocab_size`` = V, ``n`` = len(SPECIAL_TOKENS) = 54):

* ids ``0 .. 255``: the 256 byte-level symbols, so any text encodes and nothing is ever unknown;
* ids ``256 .. V - n - 1``: learnt BPE merges;
* ids ``V - n .. V - 1``: the special tokens, in MiniMax-M2's order, so MiniMax id ``200000 + k`` is id
  ``V - n + k`` here (the real tokenizer also puts its specials after the ordinary tokens, at 200000..200053).

A model built for this tokenizer may have more embedding rows than ``vocab_size`` (MiniMax-M2 has 200064 rows
for 200054 tokens); the extra rows are simply never produced by the tokenizer.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.errors import QuantkitError

if TYPE_CHECKING:  # imported lazily at run time, so importing this module stays cheap
    from tokenizers import Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "MAX_VOCAB_SIZE",
    "MIN_VOCAB_SIZE",
    "PRE_TOKENIZER_PATTERN",
    "SPECIAL_TOKENS",
    "apply_chat_template",
    "build_corpus",
    "load_tokenizer",
    "special_token_ids",
    "write_tokenizer",
]

# The GPT-4o (tiktoken "o200k_base") split pattern, which MiniMax-M2's tokenizer.json also uses: words keep
# one leading non-letter and English contractions, digits go in runs of at most three, punctuation keeps
# trailing newlines and slashes, and whitespace before a word is left to that word.
PRE_TOKENIZER_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# MiniMax-M2's 54 added tokens in their real order (ids 200000..200053 there), as (name, content, special).
# The name gives the key "<name>_token_id" in write_tokenizer's result. The four thinking / tool-call tags are
# ordinary (special=False) added tokens upstream, so skip_special_tokens keeps them for reasoning and tool-call
# parsers; everything else is special. MiniMax-M2 names no pad token in its tokenizer_config.json; "]!p~["
# (id 200000, the "p" reads as pad, and several serving stacks treat it as pad) is our choice for one.
SPECIAL_TOKENS: tuple[tuple[str, str, bool], ...] = (
    ("pad", "]!p~[", True),
    ("fim_prefix", "<fim_prefix>", True),
    ("fim_middle", "<fim_middle>", True),
    ("fim_suffix", "<fim_suffix>", True),
    ("fim_pad", "<fim_pad>", True),
    ("reponame", "<reponame>", True),
    ("filename", "<filename>", True),
    ("gh_stars", "<gh_stars>", True),
    ("issue_start", "<issue_start>", True),
    ("issue_comment", "<issue_comment>", True),
    ("issue_closed", "<issue_closed>", True),
    ("jupyter_start", "<jupyter_start>", True),
    ("jupyter_text", "<jupyter_text>", True),
    ("jupyter_code", "<jupyter_code>", True),
    ("jupyter_output", "<jupyter_output>", True),
    ("empty_output", "<empty_output>", True),
    ("commit_before", "<commit_before>", True),
    ("commit_msg", "<commit_msg>", True),
    ("commit_after", "<commit_after>", True),
    ("role", "]~b]", True),  # opens every turn: "]~b]" + "system" / "user" / "ai" / "tool" + "\n"
    ("eos", "[e~[", True),  # closes every turn; the end-of-sequence token
    ("unk", "]!d~[", True),  # never produced by a byte-level model; kept as transformers' unk_token
    ("function_call", "<function_call>", True),
    ("code_interpreter", "<code_interpreter>", True),
    ("speech", "]<]speech[>[", True),
    ("image", "]<]image[>[", True),
    ("video", "]<]video[>[", True),
    ("speech_start", "]<]start of speech[>[", True),
    ("speech_end", "]<]end of speech[>[", True),
    ("image_start", "]<]start of image[>[", True),
    ("image_end", "]<]end of image[>[", True),
    ("video_start", "]<]start of video[>[", True),
    ("video_end", "]<]end of video[>[", True),
    ("vision_pad", "]<]vision pad[>[", True),
    ("bos", "]~!b[", True),  # starts a conversation, right before the system turn's "]~b]"
    ("jupyter_error", "<jupyter_error>", True),
    ("add_file", "<add_file>", True),
    ("delete_file", "<delete_file>", True),
    ("rename_file", "<rename_file>", True),
    ("edit_file", "<edit_file>", True),
    ("commit_message", "<commit_message>", True),
    ("empty_source_file", "<empty_source_file>", True),
    ("repo_struct", "<repo_struct>", True),
    ("code_context", "<code_context>", True),
    ("file_content", "<file_content>", True),
    ("source_files", "<source_files>", True),
    ("pr_start", "<pr_start>", True),
    ("review_comment", "<review_comment>", True),
    ("filepath", "<filepath>", True),
    ("file_sep", "<file_sep>", True),
    ("think_start", "<think>", False),
    ("think_end", "</think>", False),
    ("tool_call_start", "<minimax:tool_call>", False),
    ("tool_call_end", "</minimax:tool_call>", False),
)

_BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
# The built-in corpus runs out of pairs to merge a little above 39000 tokens; 32768 leaves a margin and is a
# round number. Models that want more rows than this can still be built: the extra rows are never produced.
MAX_VOCAB_SIZE = 32768
# MiniMax-M2's context length (max_position_embeddings); transformers uses it only to warn on long inputs.
MODEL_MAX_LENGTH = 196608
_CORPUS_SEED = 20251027

# Our own rendering of MiniMax-M2's chat format (the facts: "]~!b[" once, then per turn "]~b]" + role + "\n" +
# text + "[e~[" + "\n", roles system / user / ai / tool, reasoning in <think>..</think>, tool calls as
# <minimax:tool_call><invoke name=..><parameter name=..>..</parameter></invoke></minimax:tool_call>, and a
# generation prompt that opens the assistant's thinking). Every tag trims whitespace itself, so the output is
# the same under plain jinja2 and under transformers' trim_blocks / lstrip_blocks environment.
CHAT_TEMPLATE = r"""{#- MiniMax-M2 chat format, written for quantkit's synthetic tokenizers. -#}
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part["type"] == "text" -%}{{- part["text"] -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set system_text = text_of(messages[0]["content"]) -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_text = "You are a helpful assistant." -%}
    {%- set turns = messages -%}
{%- endif -%}
{#- Reasoning is replayed only for assistant turns after the last user turn (the current tool-use loop). -#}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in turns -%}
    {%- if m["role"] == "user" -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- "]~!b[]~b]system\n" ~ system_text -}}
{%- if tools -%}
    {{- "\n\n# Tools\nThese tools are available, each described by a JSON Schema:\n<tools>\n" -}}
    {%- for tool in tools -%}
        {%- if tool.function is defined -%}
            {%- set spec = tool.function -%}
        {%- else -%}
            {%- set spec = tool -%}
        {%- endif -%}
        {{- "<tool>" ~ (spec | tojson) ~ "</tool>\n" -}}
    {%- endfor -%}
    {{- "</tools>\n\nTo call tools, reply with XML in this shape:\n<minimax:tool_call>\n" -}}
    {{- "<invoke name=\"tool-name\">\n<parameter name=\"argument-name\">value</parameter>\n</invoke>\n" -}}
    {{- "</minimax:tool_call>" -}}
{%- endif -%}
{{- "[e~[\n" -}}
{%- for m in turns -%}
    {%- if m["role"] == "user" -%}
        {{- "]~b]user\n" ~ text_of(m["content"]) ~ "[e~[\n" -}}
    {%- elif m["role"] == "assistant" -%}
        {{- "]~b]ai\n" -}}
        {%- if m["reasoning_content"] and loop.index0 > ns.last_user -%}
            {{- "<think>\n" ~ m["reasoning_content"] ~ "\n</think>\n\n" -}}
        {%- endif -%}
        {%- set body = text_of(m["content"]) -%}
        {{- body -}}
        {%- if m["tool_calls"] -%}
            {%- if body -%}{{- "\n" -}}{%- endif -%}
            {{- "<minimax:tool_call>\n" -}}
            {%- for call in m["tool_calls"] -%}
                {%- if call.function is defined -%}
                    {%- set fn = call.function -%}
                {%- else -%}
                    {%- set fn = call -%}
                {%- endif -%}
                {{- "<invoke name=\"" ~ fn["name"] ~ "\">\n" -}}
                {%- if fn["arguments"] is mapping -%}
                    {%- for key, value in fn["arguments"].items() -%}
                        {{- "<parameter name=\"" ~ key ~ "\">" -}}
                        {%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
                        {{- "</parameter>\n" -}}
                    {%- endfor -%}
                {%- elif fn["arguments"] -%}
                    {{- fn["arguments"] ~ "\n" -}}
                {%- endif -%}
                {{- "</invoke>\n" -}}
            {%- endfor -%}
            {{- "</minimax:tool_call>" -}}
        {%- endif -%}
        {{- "[e~[\n" -}}
    {%- elif m["role"] == "tool" -%}
        {#- Consecutive tool results share one "]~b]tool" turn, one <response> each. -#}
        {%- if loop.first or loop.previtem["role"] != "tool" -%}{{- "]~b]tool" -}}{%- endif -%}
        {{- "\n<response>" ~ text_of(m["content"]) ~ "</response>" -}}
        {%- if loop.last or loop.nextitem["role"] != "tool" -%}{{- "[e~[\n" -}}{%- endif -%}
    {%- else -%}
        {{- raise_exception("unsupported chat role: " ~ m["role"]) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "]~b]ai\n<think>\n" -}}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------------------------
# Training corpus
# --------------------------------------------------------------------------------------------------------------

# Hand-written prose. Contractions, capitals and punctuation are here on purpose: they exercise the regex's
# contraction and case rules, so the learnt merges look like those of a real English-heavy tokenizer.
_PROSE = (
    "Quantization trades a little accuracy for a lot of memory. A weight that was stored in sixteen bits is "
    "rounded to eight, or to four, and a scale factor remembers how large the original numbers were. When the "
    "scales are chosen per block of thirty-two or one hundred and twenty-eight values, the error stays small "
    "and the model's answers barely change.",
    "A mixture-of-experts layer doesn't run every expert for every token. A small router looks at the hidden "
    "state, picks the top few experts, and mixes their outputs with the router's weights. Most of the "
    "parameters sit idle for any given token, which is why such a model can be large and still fast.",
    "It's raining again in the valley, and the river has climbed over the lower path. The farmers say they've "
    "never seen the water this high in October. We'll walk the long way round, past the mill and the old stone "
    "bridge, and we'll be home before the lamps are lit.",
    "To make the soup, soften two onions in butter, add the carrots and a handful of lentils, then pour in the "
    "stock. Let it simmer for forty minutes. Season it at the end, not at the start, because the stock is "
    "already salty and you can't take salt back out.",
    "The library opened in the spring of its first year with four thousand books and one librarian. By the "
    "time the new wing was finished, there were readers queueing at the door each morning, students with "
    "notebooks, retired engineers, and children who'd come for the atlas with the fold-out maps.",
    "Checkpoints are written in shards so that no single file grows too large to copy. An index file maps every "
    "tensor name to the shard that holds it. A converter reads one shard at a time, quantizes the tensors it "
    "finds, and writes them out again, so the whole model never has to fit in memory at once.",
    "She checked the logs twice before she believed them: the job hadn't failed, it had simply never started. "
    "Somebody had set the queue's limit to zero during a test last week and forgot to put it back. I'm sure "
    "they'd meant to; it's the kind of thing everyone does once.",
    "Good tests are fast, deterministic and honest about what they check. A test that passes on one machine "
    "and fails on another teaches the team to ignore failures, and a test that takes ten minutes is a test "
    "that nobody runs before they push.",
    "THE WEATHER SERVICE HAS ISSUED A WIND WARNING FOR THE COAST. Gusts of up to ninety kilometres per hour "
    "are expected after midnight. Ferries are cancelled until Thursday; the Harbour Office will publish an "
    "update at NOON.",
    "Attention lets each position look back at the ones before it. The keys and values of past tokens are kept "
    "in a cache, so generating the next token costs one step instead of a whole pass over the prompt. Long "
    "prompts make that cache the largest thing in memory after the weights themselves.",
)

# A few lines of other scripts (written for this corpus) so common non-Latin byte sequences get merges too.
_MULTILINGUAL = (
    "今天天气很好，我们去公园散步吧。",
    "这个模型有两千三百亿个参数，但每个词只激活一百亿。",
    "量化可以把模型的显存占用减少一半以上。",
    "请把文件保存到输出目录，然后重新运行测试。",
    "東京の朝はとても静かです。駅の近くで温かいコーヒーを飲みました。",
    "Сегодня мы проверяем, как модель работает с длинными текстами.",
    "Der Zug nach München fährt um halb neun vom Gleis vier ab.",
    "Le café était fermé, alors nous avons marché jusqu'à la gare.",
    "¿Dónde está la biblioteca? Está al lado del mercado, cerca de la plaza.",
    "오늘 회의는 오후 세 시에 시작합니다.",
    "مرحبا، كيف حالك اليوم؟",
    "Ελέγχουμε ότι όλα τα αρχεία γράφτηκαν σωστά.",
    "Done ✅  Failed ❌  Warning ⚠️  Rocket 🚀  Thinking 🤔  Party 🎉  Family 👨‍👩‍👧",
    "Math: α + β = γ, ∑ xᵢ ≤ ∞, √2 ≈ 1.414, 30°C → 86°F, £5 ≠ €5 ≠ ¥5.",
)

_WORDS = (
    "model layer expert router token weight scale block shard tensor index cache value key query head hidden "
    "state batch input output config file path name size count offset buffer stream device memory bytes "
    "group rank score prompt answer message tool result error report user system time date city river "
    "table chart record field column row page line word text number list item order price total "
    "account address amount animal apple area argument article attempt balance bank basket bird board boat "
    "body bottle branch bread bridge brother budget building button camera candle captain card carpet castle "
    "chair channel chapter cheese chicken child circle client clock cloud coast coffee colour comment company "
    "contract corner cotton country course cousin credit crowd culture customer cycle danger daughter debate "
    "decision degree design desk detail dinner direction distance doctor document dollar door dream driver "
    "economy edge effect energy engine evening event example factory family farmer feature finger flower "
    "forest frame friend future garden gate glass government grain ground guest habit hammer harbour health "
    "heart history holiday horse hospital hotel house island journey judge kitchen knife ladder language "
    "lawyer leader letter library light limit machine manager market meeting metal method minute mirror "
    "moment money month morning mountain movement museum music nation network night notice ocean office "
    "opinion orange owner package painter parent party pattern payment pencil people pepper picture pocket "
    "policy portion potato power practice pressure problem process product program project promise quality "
    "question rabbit region request resource response review reward river road rocket room route school "
    "season second secret service shadow shelter signal silver sister skill society soldier solution source "
    "speech spring square station stomach stone storm story street student subject summer supply surface "
    "switch teacher theory thought ticket tower traffic train travel treaty trouble truck umbrella uncle "
    "valley vehicle village visitor voice volume wallet water weather window winter witness worker writer "
    "build check create delete enable fetch filter format handle import insert launch load merge parse "
    "quantize render reset resolve return sample select send shuffle split start stop update upload verify "
    "quickly slowly careful empty early final global local large little modern narrow native quiet random "
    "recent simple single sparse stable strong sudden useful valid warm wide young"
).split()
# Pronounceable nonsense words. They are cheap filler that lets a few hundred KB of corpus train large
# vocabularies (up to MAX_VOCAB_SIZE): BPE takes the most frequent pairs first, so the real English, code and
# multilingual pieces above still make up the early merges, and the nonsense only fills the long tail.
_ONSETS = "b br c ch cl d dr f fl g gr h j k l m n p pl pr qu r s sh sk sl st str t th tr v w wh y z".split() + [""]
_VOWELS = "a e i o u ai ea ee oo ou ie".split()
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "x")
_SUFFIXES = ("", "", "", "s", "ing", "ed", "er", "ly", "tion", "ness", "able")
_CITIES = ("Paris", "Shanghai", "Lagos", "Lima", "Oslo", "Toronto", "Nairobi", "Kyoto", "Berlin", "Austin")
_TOOLS = ("get_weather", "search_web", "read_file", "run_python", "list_directory", "send_email", "get_time")


class _Rng:
    """Only Random.random() is promised to give the same sequence for a seed on every Python version
    (choice, randrange and shuffle have changed before), so every draw here is built on it."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed).random

    def below(self, n: int) -> int:
        return min(int(self._random() * n), n - 1)

    def pick(self, items: tuple[str, ...] | list[str]) -> str:
        return items[self.below(len(items))]

    def chance(self, p: float) -> bool:
        return self._random() < p


def _pseudo_word(rng: _Rng) -> str:
    syllables = 1 + rng.below(3)
    word = "".join(rng.pick(_ONSETS) + rng.pick(_VOWELS) + rng.pick(_CODAS) for _ in range(syllables))
    return word + rng.pick(_SUFFIXES)


def _identifier(rng: _Rng, style: str) -> str:
    parts = [rng.pick(_WORDS) if rng.chance(0.7) else _pseudo_word(rng)]
    parts += [rng.pick(_WORDS) for _ in range(rng.below(3))]
    if style == "camel":
        return parts[0] + "".join(p.capitalize() for p in parts[1:])
    if style == "pascal":
        return "".join(p.capitalize() for p in parts)
    if style == "const":
        return "_".join(parts).upper()
    return "_".join(parts)


def _number(rng: _Rng) -> str:
    kind = rng.below(8)
    if kind == 0:
        return str(rng.below(10 ** (1 + rng.below(9))))
    if kind == 1:
        return f"{rng.below(100000) / 1000:.3f}"
    if kind == 2:
        return f"0x{rng.below(1 << 32):08x}"
    if kind == 3:
        return f"{2000 + rng.below(30)}-{1 + rng.below(12):02d}-{1 + rng.below(28):02d}"
    if kind == 4:
        return f"[{rng.below(4096) * 16}, {rng.below(64) * 64}]"
    if kind == 5:
        return f"{rng.below(1000)}e-{1 + rng.below(9)}"
    if kind == 6:
        return f"{rng.below(24):02d}:{rng.below(60):02d}:{rng.below(60):02d}"
    return f"{rng.below(100)}%"


def _code_lines(rng: _Rng) -> list[str]:
    fn, arg, other = _identifier(rng, "snake"), _identifier(rng, "snake"), _identifier(rng, "snake")
    cls, const = _identifier(rng, "pascal"), _identifier(rng, "const")
    kind = rng.below(6)
    if kind == 0:
        return [
            f"def {fn}({arg}: int, {other}: float = {_number(rng)}) -> dict:",
            f'    """Return the {rng.pick(_WORDS)} for each {rng.pick(_WORDS)}."""',
            f"    if {arg} < {rng.below(1000)}:",
            f'        raise ValueError(f"{arg} must be at least {rng.below(1000)}, got {{{arg}}}")',
            f'    return {{"{arg}": {arg}, "{other}": {other} * {const}}}',
            "",
        ]
    if kind == 1:
        return [
            f"class {cls}:",
            f"    def __init__(self, {arg}):",
            f"        self.{arg} = {arg}",
            f"        self._{other} = []",
            "",
            f"    def {fn}(self):",
            f"        for i in range({rng.below(64)}):",
            f"            self._{other}.append(i * self.{arg})",
            "",
        ]
    if kind == 2:
        return [
            f"function {_identifier(rng, 'camel')}({_identifier(rng, 'camel')}) {{",
            f"  const {_identifier(rng, 'camel')} = await fetch(`/api/{fn}/${{id}}`);",
            f"  if (!res.ok) throw new Error('{rng.pick(_WORDS)} failed: ' + res.status);",
            f"  return res.json().then((x) => x.{_identifier(rng, 'camel')} ?? {_number(rng)});",
            "}",
        ]
    if kind == 3:
        return [
            f"for (int {arg[:1] or 'i'} = 0; {arg[:1] or 'i'} < {rng.below(4096)}; ++{arg[:1] or 'i'}) {{",
            f"    {other}[{arg[:1] or 'i'}] = ({cls}*){fn}({const}, {_number(rng)});",
            "}",
        ]
    if kind == 4:
        payload = {
            fn: _number(rng),
            arg: [rng.below(1000), rng.below(1000)],
            "enabled": rng.chance(0.5),
            "name": rng.pick(_CITIES),
        }
        return [json.dumps(payload), json.dumps(payload, indent=2)]
    return [
        f"$ python -m {fn}.{other} --{arg.replace('_', '-')} {_number(rng)} --out /tmp/{other}/",
        f"{rng.pick(['INFO', 'WARN', 'ERROR', 'DEBUG'])} {_number(rng)} {fn}: {rng.pick(_WORDS)}={_number(rng)}",
        f"  - {arg}: {_number(rng)}",
        f'    {other}: "{rng.pick(_CITIES)}"',
    ]


def _chat_lines(rng: _Rng) -> list[str]:
    # Chat- and tool-call-shaped text without the special markers themselves: those get their own ids, and
    # none of them can become an ordinary token anyway (each spans several pre-tokens).
    tool, city, key = rng.pick(_TOOLS), rng.pick(_CITIES), rng.pick(_WORDS)
    schema = {
        "name": tool,
        "description": f"Get the {key} for a {rng.pick(_WORDS)}.",
        "parameters": {"type": "object", "properties": {key: {"type": "string"}}, "required": [key]},
    }
    return [
        f"What's the {rng.pick(_WORDS)} in {city} today? Please answer in {_number(rng)} words or fewer.",
        f"Let me check the {key} for {city} first.",
        f"<tool>{json.dumps(schema)}</tool>",
        f'<invoke name="{tool}">',
        f'<parameter name="{key}">{city}</parameter>',
        f'<parameter name="limit">{rng.below(50)}</parameter>',
        "</invoke>",
        f'<response>{{"{key}": "{_number(rng)}", "city": "{city}", "ok": true}}</response>',
        f"The {key} in {city} is {_number(rng)}, so you'll want a jacket.",
        f"## {key.capitalize()} report\n\n- **{city}**: `{_number(rng)}`\n- *{rng.pick(_WORDS)}*: {_number(rng)}\n",
    ]


def _nonsense_line(rng: _Rng) -> str:
    words = [_pseudo_word(rng) for _ in range(8 + rng.below(8))]
    words = [w.capitalize() if rng.chance(0.15) else w for w in words]
    return " ".join(words) + rng.pick((".", ",", "!", "?", ";")) + "\n"


def _prose_lines(rng: _Rng) -> list[str]:
    paragraph = rng.pick(_PROSE)
    sentences = [s.strip() for s in paragraph.split(". ") if s.strip()]
    start = rng.below(len(sentences))
    return [". ".join(sentences[start:] + sentences[:start])]


def build_corpus(seed: int = _CORPUS_SEED, n_chunks: int = 800, n_nonsense: int = 1200) -> Iterator[str]:
    """Yield the training corpus, one chunk of text at a time (about 380 KB in all for the defaults).

    It depends only on its arguments: no files, no network, nothing from the Python installation, so every
    machine and Python version trains the same tokenizer.
    """
    rng = _Rng(seed)
    yield from _PROSE
    yield from _MULTILINGUAL
    for _ in range(n_chunks):
        kind = rng.below(10)
        if kind < 3:
            lines = _prose_lines(rng)
        elif kind < 6:
            lines = _code_lines(rng)
        elif kind < 8:
            lines = _chat_lines(rng)
        elif kind < 9:
            lines = [" ".join(_number(rng) for _ in range(1 + rng.below(8)))]
        else:
            lines = [rng.pick(_MULTILINGUAL)]
        yield "\n".join(lines) + "\n"
    for _ in range(n_nonsense):
        yield _nonsense_line(rng)


# --------------------------------------------------------------------------------------------------------------
# Building and writing
# --------------------------------------------------------------------------------------------------------------


def _train(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE model and append the special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated", invert=False),
            # use_regex=False: the Split above already did the GPT-style splitting; this only maps bytes.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    n_ordinary = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_ordinary,
        show_progress=False,
        # All 256 byte symbols, seen in the corpus or not, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # added after training so that they land at the end of the vocabulary
    )
    tokenizer.train_from_iterator(build_corpus(), trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=False)
    if trained != n_ordinary:  # only if the corpus were changed and MAX_VOCAB_SIZE not lowered with it
        raise AssertionError(f"BPE training stopped at {trained} of {n_ordinary} ordinary tokens")
    # One call per token keeps MiniMax's order while letting each token carry its own special flag.
    for _name, content, special in SPECIAL_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for offset, (_name, content, _special) in enumerate(SPECIAL_TOKENS):
        # Would only fail if a special string had also been learnt as an ordinary token (it would keep that id).
        if tokenizer.token_to_id(content) != n_ordinary + offset:
            raise AssertionError(f"special token {content!r} did not land at id {n_ordinary + offset}")
    return tokenizer


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """The ids of the special tokens for a given vocab_size, as write_tokenizer returns them."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {f"{name}_token_id": first + offset for offset, (name, _content, _special) in enumerate(SPECIAL_TOKENS)}


def _content(name: str) -> str:
    return next(content for n, content, _special in SPECIAL_TOKENS if n == name)


def _tokenizer_config(vocab_size: int) -> dict[str, Any]:
    first = vocab_size - len(SPECIAL_TOKENS)
    added_tokens_decoder = {
        str(first + offset): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for offset, (_name, content, special) in enumerate(SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": _content("bos"),
        "eos_token": _content("eos"),
        "pad_token": _content("pad"),
        "unk_token": _content("unk"),
        "chat_template": CHAT_TEMPLATE,
        # The chat template already writes "]~!b[", and tokenizer.json has no post-processor: nothing is added.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _write_text(path: Path, text: str) -> None:
    # newline="" keeps "\n" on every OS, so the files are byte-identical everywhere.
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_tokenizer(out_dir: str | Path, vocab_size: int) -> dict[str, int]:
    """Train the tokenizer and write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja into ``out_dir`` (created if needed).

    ``vocab_size`` counts every token, special ones included; the specials take the last 54 ids. Returns the
    special token ids by name: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``unk_token_id``,
    ``role_token_id``, ``think_start_token_id``, ``tool_call_start_token_id`` ... (one per SPECIAL_TOKENS entry).
    The same vocab_size always gives the same bytes.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise QuantkitError(f"vocab_size must be an integer, got {vocab_size!r}")
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise QuantkitError(
            f"vocab_size must be between {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} special "
            f"tokens) and {MAX_VOCAB_SIZE} (what the built-in training corpus supports), got {vocab_size}; "
            "a model may still have more embedding rows than its tokenizer has tokens"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train(vocab_size)
    tokenizer_json = json.loads(tokenizer.to_str())
    _write_text(out / "tokenizer.json", _dump_json(tokenizer_json))
    _write_text(out / "tokenizer_config.json", _dump_json(_tokenizer_config(vocab_size)))
    special_map = {key: _content(key) for key in ("bos", "eos", "pad", "unk")}
    _write_text(out / "special_tokens_map.json", _dump_json({f"{k}_token": v for k, v in special_map.items()}))
    _write_text(out / "chat_template.jinja", CHAT_TEMPLATE)
    return special_token_ids(vocab_size)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load ``folder``/tokenizer.json as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise QuantkitError(f"no tokenizer.json in {Path(folder)}: write one with quantkit.tokenizer.write_tokenizer")
    return Tokenizer.from_file(str(path))


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Like transformers' chat-template filter: no HTML escaping and real UTF-8, unlike jinja2's own tojson.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise QuantkitError(f"chat template: {message}")


def apply_chat_template(
    folder: str | Path,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render ``folder``/chat_template.jinja for ``messages`` (OpenAI-style dicts: role, content, and for
    assistant turns optionally reasoning_content and tool_calls), with the same environment settings that
    transformers uses, so the result matches ``AutoTokenizer.apply_chat_template(..., tokenize=False)``."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = Path(folder) / "chat_template.jinja"
    if not path.is_file():
        raise QuantkitError(
            f"no chat_template.jinja in {Path(folder)}: write one with quantkit.tokenizer.write_tokenizer"
        )
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    template = env.from_string(path.read_text(encoding="utf-8"))
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools)
