"""EventGPT (event-camera streams): `vlopt.models.eventgpt` builds it and loads the original
release layout."""

from vlopt.hookspecs import hookimpl
from vlopt.models import ModelFamily, Workload

FAMILY = ModelFamily(
    name="eventgpt", module="vlopt.models.eventgpt", model_types=("EventChat_llama", "eventgpt"),
    workloads=(Workload("eventgpt", "eventgpt", "events", 5, 45),
               Workload("eventgpt-1frame", "eventgpt", "events", 1, 45),
               Workload("eventgpt-10q", "eventgpt", "events", 5, 45, questions=10)))


@hookimpl
def register_models(register):
    register(FAMILY)
