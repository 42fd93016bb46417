"""Chat templates for exported and imported models.

mmbridge renders a conversation with the LM's own template after turning each message into one string:
the parts of a message joined by newlines, an image part written as `<image>` (as `mmbridge chat` and
`mmbridge serve` do), and the recipe's `system_prompt` inserted when the conversation has none. An
exported model gets one template that does the same in Jinja, so transformers' processors, vLLM and our
own processor render the same text from plain-string and list-of-parts messages alike.
"""

from __future__ import annotations

import json

from mmbridge.models.language import IMAGE_TOKEN

_HEAD = "{%- set _mm_system ="
# Jinja prepended to the LM's template: rebuilds `messages` with string contents (and the system prompt).
_PREAMBLE = """{%- set _ns = namespace(msgs=[]) -%}
{%- if _mm_system is not none and (messages | length == 0 or messages[0]['role'] != 'system') -%}
{%- set _ns.msgs = [{'role': 'system', 'content': _mm_system}] -%}
{%- endif -%}
{%- for _m in messages -%}
{%- if _m['content'] is string -%}
{%- set _ns.msgs = _ns.msgs + [{'role': _m['role'], 'content': _m['content']}] -%}
{%- else -%}
{%- set _parts = namespace(text=[]) -%}
{%- for _p in _m['content'] -%}
{%- if _p['type'] in ('image', 'image_url') -%}
{%- set _parts.text = _parts.text + [_mm_image] -%}
{%- elif _p['type'] == 'text' -%}
{%- set _parts.text = _parts.text + [_p['text']] -%}
{%- endif -%}
{%- endfor -%}
{%- set _ns.msgs = _ns.msgs + [{'role': _m['role'], 'content': _parts.text | join('\\n')}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = _ns.msgs -%}
"""


def _literal(value) -> str:
    """A Python value as a Jinja literal (JSON strings are Jinja strings; None is `none`)."""
    return "none" if value is None else json.dumps(value)


def multimodal_template(lm_template: str, system_prompt: str | None) -> str:
    """`lm_template` wrapped so that it renders list-of-parts and plain-string contents as mmbridge does."""
    if system_prompt is None and lm_template.startswith(_HEAD):
        return lm_template  # already ours (a run imported from an export): wrapping again changes nothing
    head = f"{_HEAD} {_literal(system_prompt)} -%}}\n{{%- set _mm_image = {_literal(IMAGE_TOKEN)} -%}}\n"
    return head + _PREAMBLE + lm_template


def string_content_template(template: str) -> str:
    """A template that takes plain-string contents: `template` itself if it already does, else `template`
    behind a preamble that turns each string into one text part (LLaVA-1.5's template iterates the parts)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    probe = [{"role": "user", "content": "\ue000probe\ue001"}]
    try:
        text = render_jinja_template(conversations=[probe], chat_template=template)[0][0]
    except Exception:  # noqa: BLE001 - a template that fails on strings is wrapped below
        text = ""
    if text.count("\ue000probe\ue001") == 1:
        return template
    wrap = """{%- set _ns = namespace(msgs=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is string -%}
{%- set _ns.msgs = _ns.msgs + [{'role': _m['role'], 'content': [{'type': 'text', 'text': _m['content']}]}] -%}
{%- else -%}
{%- set _ns.msgs = _ns.msgs + [_m] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = _ns.msgs -%}
"""
    return wrap + template
