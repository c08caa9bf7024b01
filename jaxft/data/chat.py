"""Chat templates (the jinja strings shipped in GGUF / tokenizer_config.json).

  text = render(meta['chat_template'], [{'role': 'user', 'content': 'Hi'}],
                add_generation_prompt=True)
  prompt_text, full_text = sft_strings(meta['chat_template'], prompt, response)

Rendered as HF transformers' `apply_chat_template(tokenize=False)` does: a
sandboxed jinja2 environment with trim_blocks / lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and
the `{% generation %}` tag accepted (rendered as its body). Special-token
variables (`bos_token`, `eos_token`, ...) are whatever the caller passes; unset
ones render empty. Pass `bos_token=''` (the default) when the tokenizer adds a
bos itself, or the text would carry it twice.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Optional

Message = dict[str, Any]
JINJA_INSTALL = 'pip install "jinja2>=3.1"'


def _jinja():
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    import jinja2.ext  # pylint: disable=g-import-not-at-top
    import jinja2.sandbox  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"chat templates need jinja2: {JINJA_INSTALL}") from e
  return jinja2


def _raise_exception(message: str):
  raise _jinja().exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _generation_extension(jinja2):
  """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tag) as a no-op block."""

  class Generation(jinja2.ext.Extension):
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  return Generation


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
  """The compiled jinja2 template (cached per template string)."""
  jinja2 = _jinja()
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[jinja2.ext.loopcontrols, _generation_extension(jinja2)])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render(template: str, messages: list[Message], *, add_generation_prompt: bool = False,
           bos_token: str = '', eos_token: str = '', **variables) -> str:
  """The conversation as text, through `template`.

  Args:
    template: a jinja chat template.
    messages: [{'role': 'system' | 'user' | 'assistant', 'content': str}, ...].
    add_generation_prompt: append the header that starts the assistant's turn.
    bos_token, eos_token: strings the template may insert.
    **variables: other template variables (e.g. tools, unk_token).

  Returns:
    The rendered string. A template's `raise_exception(...)` raises
    jinja2.exceptions.TemplateError.
  """
  if not template:
    raise ValueError("no chat template (the model's metadata has none)")
  for m in messages:
    if not isinstance(m, dict) or 'role' not in m:
      raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
  return compile_template(template).render(
      messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
      bos_token=bos_token, eos_token=eos_token, **variables)


def sft_strings(template: str, prompt: str, response: str, *, system: Optional[str] = None,
                **variables) -> tuple[str, str]:
  """(prompt_text, full_text) for supervised fine-tuning on one exchange.

  prompt_text renders [system?, user] with the generation prompt; full_text
  renders [system?, user, assistant]. The loss goes on full_text's tokens after
  prompt_text, so full_text must start with prompt_text (true for ChatML and
  Gemma templates); otherwise ValueError.
  """
  head = [{'role': 'system', 'content': system}] if system is not None else []
  head.append({'role': 'user', 'content': prompt})
  prompt_text = render(template, head, add_generation_prompt=True, **variables)
  full_text = render(template, head + [{'role': 'assistant', 'content': response}],
                     add_generation_prompt=False, **variables)
  if not full_text.startswith(prompt_text):
    raise ValueError("chat template renders the conversation with a different prefix than the "
                     f"prompt alone:\nprompt: {prompt_text!r}\nfull:   {full_text!r}")
  return prompt_text, full_text
