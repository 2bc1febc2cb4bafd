#!/usr/bin/env python3
"""Renders chat templates the way Hugging Face transformers does
(apply_chat_template, tokenize=False): jinja2 ImmutableSandboxedEnvironment
with trim_blocks=True, lstrip_blocks=True, a raise_exception global.

stdin:  {"template": str, "bos_token": str, "eos_token": str,
         "add_generation_prompt": bool, "conversations": [[{"role","content"}...]...]}
stdout: a JSON list with, per conversation, {"text": str} or {"error": str}.
Exit 3 when jinja2 is not installed (the C++ test then skips)."""
import json
import sys

try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    sys.exit(3)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


req = json.load(sys.stdin)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
tmpl = env.from_string(req["template"])
out = []
for conv in req["conversations"]:
    try:
        out.append({"text": tmpl.render(messages=conv, bos_token=req["bos_token"],
                                        eos_token=req["eos_token"],
                                        add_generation_prompt=req.get("add_generation_prompt", False))})
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.append({"error": str(e)})
json.dump(out, sys.stdout)
