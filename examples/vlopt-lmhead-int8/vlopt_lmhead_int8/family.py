"""A model family from a plugin: `eventgpt_short`, EventGPT on two-frame event clips with short
answers. It shows the whole of adding a family: this file (a declaration, a `build`, a
`load_checkpoint`) and one entry-point line. The model is vlopt's EventGPT adapter under its own
name, so its workloads are its own; torch is imported only when a model is built."""

from __future__ import annotations

import functools

import vlopt
from vlopt.models import ModelFamily, Workload

FAMILY = ModelFamily(
    name="eventgpt_short", module=__name__,
    model_types=(),                 # presets only: no checkpoint folder is recognised as this family
    workloads=(Workload("eventgpt-short", "eventgpt_short", "events", 2, 16),))


@functools.cache
def _adapter():
    from vlopt.models.eventgpt import EventGPT

    class EventGPTShort(EventGPT):
        name = "eventgpt_short"
        default_workload = "eventgpt-short"

    return EventGPTShort


def build(preset: str, *, dtype, device: str, meta: bool = False):
    from vlopt.models import eventgpt

    base = eventgpt.build(preset, dtype=dtype, device=device, meta=meta)
    return _adapter()(base.hf, base.tokenizer, source=base.source)


def load_checkpoint(path, config: dict, *, dtype, device: str):
    raise vlopt.VloptError(f"{path}: the eventgpt_short family has presets only; load it as eventgpt")


@vlopt.hookimpl
def register_models(register):
    register(FAMILY)
