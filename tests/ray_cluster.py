"""loramux on Ray Serve for tests: a local Ray (2 CPUs) serving 2 engine replicas on a loopback port.

One per session at most (the `ray_server` fixture in conftest.py), shared by every module marked
`ray`: Ray's start-up is slow on 2 cores. Its settings are the ones test_http_ray.py was written
for, with the admin key and upload bound of the single servers the contract tests compare it with.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tests.server_process import ADMIN_KEY, free_port, refuse_unless_e2e

PER_REPLICA = 6          # Serve's multiplexing LRU: adapters one replica holds at once
UPLOAD_BYTES = 1 << 20   # as `--max-upload-mb 1` (tests.server_process.LOCKED)


@dataclass
class RayServer:
    url: str
    store: Path              # the shared adapter store
    adapters_root: Path      # an allowed root: adapters registered by path come from here
    stopped: bool = False

    def stop(self) -> None:
        if not self.stopped:
            import ray
            from ray import serve

            self.stopped = True
            started = time.monotonic()
            serve.shutdown()
            ray.shutdown()
            print(f"\nray shut down in {time.monotonic() - started:.1f}s")


def start_ray_server(root: Path) -> RayServer:
    import ray
    from ray import serve

    from loramux.server.bootstrap import ServeConfig
    from loramux.server.ray_app import build
    from loramux.server.ray_config import RayConfig

    refuse_unless_e2e()
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    (root / "adapters").mkdir(parents=True)
    cfg = RayConfig(serve=ServeConfig(dtype="float32", max_model_len=256, kv_cache_bytes=32 << 20, max_num_seqs=16,
                                      max_loras=4, max_lora_rank=8, allowed_roots=(root / "adapters",),
                                      data_dir=root / "replicas", admin_key=ADMIN_KEY,
                                      max_upload_bytes=UPLOAD_BYTES),
                    replicas=2, replica_cpus=0.5, store_dir=root / "store", adapters_per_replica=PER_REPLICA)
    serve.run(build(cfg), name="loramux", route_prefix="/")
    print(f"\nray + 2 replicas up in {time.monotonic() - started:.1f}s")
    return RayServer(f"http://127.0.0.1:{port}", root / "store", root / "adapters")
