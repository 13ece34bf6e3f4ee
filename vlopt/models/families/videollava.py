"""Video-LLaVA (video or image): `vlopt.models.videollava` builds it through transformers'
`VideoLlavaForConditionalGeneration` and loads Video-LLaVA-hf folders."""

from vlopt.hookspecs import hookimpl
from vlopt.models import ModelFamily, Workload

FAMILY = ModelFamily(
    name="videollava", module="vlopt.models.videollava", model_types=("video_llava",),
    workloads=(Workload("videollava", "videollava", "video", 8, 90),
               Workload("videollava-image", "videollava", "image", 1, 90),
               Workload("videollava-10q", "videollava", "video", 8, 90, questions=10)))


@hookimpl
def register_models(register):
    register(FAMILY)
