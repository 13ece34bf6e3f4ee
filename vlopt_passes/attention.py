"""`attention`: choose the decoder's attention implementation.

`eager` and `sdpa` run everywhere. `flash` needs CUDA: it uses the flash-attn package
(`flash_attention_2`) when installed, else PyTorch SDPA restricted to its flash kernel. The outcome
records which kernel actually ran."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome
from vlopt.stage4 import TRANSFORMERS_FORWARD, Wrapper


class Config(PassConfig):
    type: Literal["attention"] = "attention"
    implementation: Literal["eager", "sdpa", "flash"] = "sdpa"
    lossless: ClassVar[bool] = True   # same math; differences are rounding only

    def preflight(self, facts, plan) -> list[str]:
        if self.implementation == "flash" and facts.device != "cuda":
            return ["attention implementation 'flash' needs a CUDA GPU; on CPU use 'sdpa' or 'eager'"]
        return []


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    import importlib.util

    impl, kernel = cfg.implementation, cfg.implementation
    if impl == "flash":
        if vlm.device.type != "cuda":
            raise VloptError("attention implementation 'flash' needs a CUDA GPU; on CPU use 'sdpa' or 'eager'")
        if importlib.util.find_spec("flash_attn") is not None:
            impl, kernel = "flash_attention_2", "flash_attention_2 (flash-attn package)"
        else:
            impl, kernel = "sdpa", "sdpa restricted to the flash kernel (flash-attn not installed)"
            vlm.decoding.wrap(SdpaFlashOnly())
    vlm.text_model.config._attn_implementation = impl
    return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers.*.self_attn"], skipped=list(vlm.vision_modules),
                       info={"implementation": impl, "kernel": kernel},
                       notes=[f"decoder attention: {kernel}"])


class SdpaFlashOnly(Wrapper):
    """Every stage-4 call inside `sdpa_kernel(FLASH_ATTENTION)`: transformers' SDPA attention then
    has to take the flash kernel."""

    name = "sdpa_flash"
    needs = TRANSFORMERS_FORWARD
    batches = True          # a kernel choice, the same for every input
    why = ("attention flash (SDPA restricted to its flash kernel) acts on transformers' attention calls; it does "
           "not carry into this engine's own attention calls, which use SDPA's default kernel choice")

    def around(self, inp):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


@hookimpl
def register_passes(register):
    register(Config, apply)
