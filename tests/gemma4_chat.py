"""Test helper: a chat template and a tokenizer in Gemma 4's chat format, written for the tests.

The format (as the real checkpoint's template writes it): `<|turn>ROLE\\n...<turn|>\\n` turns, the assistant as
`model`; a system turn holding the system prompt, `<|think|>` when thinking is on, and one
`<|tool>declaration:NAME{...}<tool|>` block per tool; calls `<|tool_call>call:NAME{key:value}<tool_call|>` with keys
sorted and strings between `<|"|>`; results `<|tool_response>response:NAME{value:...}<tool_response|>` in the same
model turn, which the model then continues; thinking `<|channel>thought\\n...<channel|>`, and with thinking off the
generation prompt pre-fills an empty thinking channel. The markers are special tokens of the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from bpe import build_bpe_tokenizer

MARKERS = [
    "<|turn>",
    "<turn|>",
    "<|tool_call>",
    "<tool_call|>",
    '<|"|>',
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|think|>",
]

GEMMA4_TEMPLATE = r"""
{%- macro arg(v, quote_keys=true) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is none -%}null
{%- elif v is mapping -%}{{ '{' }}{%- for k, x in v | dictsort -%}{{ ',' if not loop.first }}
{{- '<|"|>' ~ k ~ '<|"|>' if quote_keys else k }}:{{ arg(x, quote_keys) }}{%- endfor -%}{{ '}' }}
{%- elif v is iterable -%}[{%- for x in v -%}{{ ',' if not loop.first }}{{ arg(x, quote_keys) }}{%- endfor -%}]
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set think = enable_thinking is defined and enable_thinking -%}
{%- set msgs = messages -%}
{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if think or tools or has_system -%}
{{- '<|turn>system\n' -}}
{%- if think -%}{{- '<|think|>\n' -}}{%- endif -%}
{%- if has_system -%}{{- messages[0]['content'] | trim -}}{%- set msgs = messages[1:] -%}{%- endif -%}
{%- for t in tools or [] -%}
{{- '<|tool>declaration:' + t['function']['name'] -}}
{{- '{description:<|"|>' + (t['function']['description'] or '') + '<|"|>,parameters:' -}}
{{- arg(t['function']['parameters'], false) + '}<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1, open=false) -%}
{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in msgs -%}
{%- if m['role'] == 'tool' -%}
{{- '<|tool_response>response:' + (m['name'] or 'unknown') + '{value:' + arg(m['content']) + '}<tool_response|>' -}}
{%- elif m['role'] == 'assistant' -%}
{%- if not ns.open -%}{{- '<|turn>model\n' -}}{%- endif -%}
{%- set thought = m['reasoning_content'] or m['reasoning'] -%}
{%- if thought and m['tool_calls'] and loop.index0 > ns.last_user -%}
{{- '<|channel>thought\n' + thought + '\n<channel|>' -}}
{%- endif -%}
{%- for c in m['tool_calls'] or [] -%}
{{- '<|tool_call>call:' + c['function']['name'] + arg(c['function']['arguments'], false) + '<tool_call|>' -}}
{%- endfor -%}
{{- m['content'] | trim -}}
{%- set ns.open = m['tool_calls'] and loop.nextitem is defined and loop.nextitem['role'] == 'tool' -%}
{%- if not ns.open -%}{{- '<turn|>\n' -}}{%- endif -%}
{%- else -%}
{{- '<|turn>' + m['role'] + '\n' + m['content'] | trim + '<turn|>\n' -}}
{%- set ns.open = false -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open -%}
{{- '<|turn>model\n' -}}
{%- if not think -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


def build_gemma4_tokenizer(dir: Path, vocab_size: int = 300) -> tuple[Path, dict[str, int]]:
    """tests/bpe.py's byte-level BPE plus Gemma 4's markers as special tokens (ids vocab_size, vocab_size+1, ...)
    and the template above; returns the directory and each marker's id."""
    dir = build_bpe_tokenizer(Path(dir), vocab_size=vocab_size, chat_template=GEMMA4_TEMPLATE)
    tok = Tokenizer.from_file(str(dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    tok.save(str(dir / "tokenizer.json"))
    return dir, {m: tok.token_to_id(m) for m in MARKERS}
