"""Everything the `serve` command line configures, in one typed object."""

from __future__ import annotations

from dataclasses import dataclass, field

from configs import BuiltinModel, builtin_model_entry
from server.lora_paths import LoraPathPolicy


@dataclass(frozen=True)
class ServerSettings:
    model: str
    served_model_names: tuple[str, ...]  # what clients may call the model; the first is reported
    host: str = "127.0.0.1"
    port: int = 8091
    api_key: str | None = None
    max_upload_bytes: int = 20 * 2**20
    max_request_bytes: int = 4 * 2**20  # JSON bodies
    read_timeout_s: float = 10.0  # for a request's headers (the HTTP protocol), and again for its JSON body
    url_ttl_s: float = 3600.0
    enable_lora_loading: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    lora_paths: LoraPathPolicy = field(default_factory=lambda: LoraPathPolicy(roots=()))  # what loading may read
    enable_playground: bool = True     # the page at / and /playground
    image_store_dir: str | None = None  # response_format=url images in this (shared) directory, not in memory
    replica_name: str | None = None  # under Ray Serve: sent as x-ditserve-replica on every response

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def builtin(self) -> BuiltinModel | None:
        """The served model's entry in configs/builtin.yaml, if it is one of ours ("builtin/<name>")."""
        return builtin_model_entry(self.model)

    @property
    def model_names(self) -> set[str]:
        """Every name `model` may take: the served names, the path, and "default" (what SGLang's and
        vLLM-Omni's benchmark clients send unless told the name)."""
        return {*self.served_model_names, self.model, "default"}
