"""LLaVA-1.5 (one image, or one event frame as the original comparison ran it): `vlopt.models.llava`
builds it through transformers' `LlavaForConditionalGeneration` and loads llava-hf folders."""

from vlopt.hookspecs import hookimpl
from vlopt.models import ModelFamily, Workload

FAMILY = ModelFamily(
    name="llava", module="vlopt.models.llava", model_types=("llava",),
    workloads=(Workload("llava-event", "llava", "events", 1, 90),   # the original's shape: 576 image rows, 90 tokens
               Workload("llava", "llava", "image", 1, 90)))


@hookimpl
def register_models(register):
    register(FAMILY)
